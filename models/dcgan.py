"""DCGAN (Radford et al. 2016): transposed-conv generator and strided-conv discriminator."""
from __future__ import annotations

import torch
from torch import nn

from models.blocks import down_block, num_resolution_steps, up_block, widths
from models.registry import register


class DCGANGenerator(nn.Module):
    """z -> 4x4 feature map -> transposed convs doubling to image_size -> tanh image in [-1, 1]."""

    def __init__(self, z_dim: int = 64, image_size: int = 32, channels: int = 1, base_channels: int = 64,
                 num_classes: int = 0):
        super().__init__()
        steps = num_resolution_steps(image_size)
        chans = widths(base_channels, steps)
        self.z_dim, self.image_size, self.channels = z_dim, image_size, channels
        self._top = chans[-1]
        # Conditional: a learned class code concatenated to z (Mirza & Osindero 2014).
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes > 0 else None
        self.project = nn.Sequential(nn.Linear(z_dim * (2 if self.embed is not None else 1), chans[-1] * 16), nn.ReLU())
        ups = [up_block(chans[i], chans[i - 1]) for i in range(steps - 1, 0, -1)]
        self.body = nn.Sequential(*ups, nn.ConvTranspose2d(chans[0], channels, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, z_bz: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z_bz = torch.cat([z_bz, self.embed(c).to(z_bz.dtype)], 1)
        return self.body(self.project(z_bz).view(-1, self._top, 4, 4))


class DCGANDiscriminator(nn.Module):
    """Strided convs down to 4x4, then one logit. No batch norm, so R1 sees per-sample gradients."""

    def __init__(self, image_size: int = 32, channels: int = 1, base_channels: int = 64, num_classes: int = 0):
        super().__init__()
        steps = num_resolution_steps(image_size)
        chans = widths(base_channels, steps)
        blocks = [down_block(channels, chans[0], norm=False)]
        blocks += [down_block(chans[i - 1], chans[i], norm=False) for i in range(1, steps)]
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(chans[-1] * 16, 1))
        # Conditional: projection discriminator (Miyato & Koyama 2018), logit += <embed(c), features>.
        self.embed = nn.Embedding(num_classes, chans[-1] * 16) if num_classes > 0 else None

    def forward(self, x_bchw: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.body(x_bchw).squeeze(1)
        features = self.body[:-1](x_bchw)
        return self.body[-1](features).squeeze(1) + (self.embed(c).to(features.dtype) * features).sum(1)


@register("gan", "dcgan")
def build_dcgan(model, data):
    classes = model.get("num_classes", 0)
    return (DCGANGenerator(model.z_dim, data.image_size, data.channels, model.g_channels, classes),
            DCGANDiscriminator(data.image_size, data.channels, model.d_channels, classes))
