"""Exponential moving average of the generator, with the half-life in images (StyleGAN2-ADA)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An fp32 shadow copy of a module, updated after each optimizer step.

    beta = 0.5 ** (images_per_step / halflife_images): the half-life does not change when the
    batch size or the world size does. During ramp-up the half-life is capped at
    `rampup * images_seen`, so the early, fast-moving weights are not averaged in for long.
    """

    def __init__(self, module: nn.Module, halflife_kimg: float, rampup: float):
        self.halflife_images = halflife_kimg * 1000.0
        self.rampup = rampup
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    def beta(self, images_per_step: int, images_seen: int) -> float:
        halflife = self.halflife_images
        if self.rampup > 0:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (images_per_step / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, module: nn.Module, images_per_step: int, images_seen: int) -> None:
        beta = self.beta(images_per_step, images_seen)
        for p_ema, p in zip(self.module.parameters(), module.parameters()):
            p_ema.lerp_(p.detach().float(), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)
