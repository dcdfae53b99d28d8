"""Convolutional building blocks shared by the VAE and the GAN networks."""
from __future__ import annotations

import math

from torch import nn


def num_resolution_steps(image_size: int, min_size: int = 4) -> int:
    """How many 2x up/down-samplings separate `image_size` from the 4x4 base; the size must be 4 * 2^k."""
    steps = int(round(math.log2(image_size / min_size)))
    if image_size < 8 or min_size * 2**steps != image_size:
        raise ValueError(f"image size {image_size} is not 4 x a power of two (8, 16, 32, 64, 128, 256 ...)")
    return steps


def down_block(in_ch: int, out_ch: int, norm: bool = True) -> nn.Sequential:
    """Stride-2 conv halving the resolution, with LeakyReLU (and BatchNorm-free group norm if asked)."""
    layers = [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1)]
    if norm:
        layers.append(nn.GroupNorm(min(32, out_ch // 4) or 1, out_ch))
    layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Transposed conv doubling the resolution, with normalisation and ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1),
        nn.GroupNorm(min(32, out_ch // 4) or 1, out_ch),
        nn.ReLU(),
    )


def widths(base: int, steps: int, cap: int = 512) -> list[int]:
    """Channel widths from the highest resolution (base) doubling towards 4x4, capped."""
    return [min(base * 2**i, cap) for i in range(steps)]
