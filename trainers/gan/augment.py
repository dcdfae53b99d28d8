"""Differentiable augmentation for GANs on small data sets (DiffAugment, Zhao et al. 2020).

The same random transforms are applied to real and generated images before the discriminator,
in both the D and the G phase; every op is differentiable, so G's gradient passes through the
augmentation and G does not learn to produce augmented images. Random draws come from the
caller's torch.Generator (the GAN task's noise stream), so a resumed run draws the same.

Images are [B, C, H, W] in [-1, 1]. Ops, as in the DiffAugment reference:
  color        brightness (+U[-0.5, 0.5)), saturation (x U[0, 2)), contrast (x U[0.5, 1.5))
  translation  shift by up to 1/8 of the side, zero padding
  cutout       zero one square of half the side at a random place
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from configs.checks import AUGMENT_OPS as OPS
from configs.checks import parse_ops  # noqa: F401 - the config's op names, checked


def _rand(gen: torch.Generator | None, *shape, device) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=device)


def color(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    b, dev = x.shape[0], x.device
    x = x + (_rand(gen, b, 1, 1, 1, device=dev).to(x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(gen, b, 1, 1, 1, device=dev).to(x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(gen, b, 1, 1, 1, device=dev).to(x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, gen: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dev = x.device
    tx = (_rand(gen, b, 1, 1, device=dev) * (2 * sh + 1)).long() - sh
    ty = (_rand(gen, b, 1, 1, device=dev) * (2 * sw + 1)).long() - sw
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=dev), torch.arange(h, device=dev),
                                torch.arange(w, device=dev), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # shifted-in pixels are 0 (mid-grey in [-1, 1]), as in DiffAugment
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, gen: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dev = x.device
    ox = (_rand(gen, b, 1, 1, device=dev) * (h + (1 - ch % 2))).long()
    oy = (_rand(gen, b, 1, 1, device=dev) * (w + (1 - cw % 2))).long()
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=dev), torch.arange(ch, device=dev),
                                torch.arange(cw, device=dev), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=dev)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_FNS = {"color": color, "translation": translation, "cutout": cutout}
assert tuple(_FNS) == OPS, "configs.checks.AUGMENT_OPS must name exactly the ops implemented here"


def diff_augment(x: torch.Tensor, ops, gen: torch.Generator | None = None) -> torch.Tensor:
    """Apply `ops` (names from OPS, in the order given) to a batch of images."""
    for op in ops:
        x = _FNS[op](x, gen)
    return x.contiguous()
