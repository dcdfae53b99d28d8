"""Small MLPs that generate and judge 2-D points (the ring8 / grid25 mode-collapse benchmarks)."""
from __future__ import annotations

import torch
from torch import nn

from models.registry import register


class MLPGenerator(nn.Module):
    """z -> 2-D point, for the ring8 / grid25 mode-collapse benchmarks."""

    def __init__(self, z_dim: int = 64, hidden: int = 128, out_dim: int = 2, depth: int = 3):
        super().__init__()
        self.z_dim = z_dim
        layers, width = [], z_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers, nn.Linear(width, out_dim))

    def forward(self, z_bz: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(z_bz)  # unconditional: c is ignored


class MLPDiscriminator(nn.Module):
    """2-D point -> one logit."""

    def __init__(self, hidden: int = 128, in_dim: int = 2, depth: int = 3):
        super().__init__()
        layers, width = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.body = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x_bd: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x_bd).squeeze(1)  # unconditional: c is ignored


@register("gan", "mlp")
def build_mlp(model, data):
    return MLPGenerator(model.z_dim, model.g_channels), MLPDiscriminator(model.d_channels)
