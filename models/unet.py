"""pix2pix (Isola et al. 2017): a U-Net generator and a PatchGAN discriminator that sees the input.

Paired image-to-image translation: G maps an input image (an edge sketch, a low-resolution
photo) to a target-like image; D scores overlapping patches of concat(input, image) as real
pairs or generated ones. Deviations from the paper: GroupNorm instead of BatchNorm in both
networks (per-sample statistics: an R1 penalty sees each sample's own gradient, and the
networks behave the same at batch size 1 in `gentrain translate`), and an optional bicubic
upsampling of the input first (`scale` > 1), so the same U-Net can do super-resolution.

Both take images in [-1, 1]; G returns images in [-1, 1] (tanh); D returns patch logits
(N, 1, h, w). The input of G must have sides divisible by ``size_multiple`` (2**depth / scale);
`gentrain translate` pads other sizes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import EDGE_MAX_CHANNELS, EdgeConv2d, GroupNorm, to_image
from models.registry import register


def pix2pix_init(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix's init_weights('normal'): conv weights N(0, gain), biases 0, norm scales N(1, gain)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return module


def _norm(channels: int) -> nn.Module:
    return GroupNorm(min(32, channels // 4) or 1, channels)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int) -> nn.Module:
    conv = EdgeConv2d if in_ch <= EDGE_MAX_CHANNELS else nn.Conv2d
    return conv(in_ch, out_ch, kernel, stride=stride, padding=padding)


class UNetGenerator(nn.Module):
    """pix2pix's U-Net: `depth` stride-2 4x4 convs down, as many transposed convs up, each level's
    encoder features concatenated onto its decoder's input (the skip connections).

    Widths: base * 2**i at level i, capped at 8 * base (pix2pix: 64, 128, 256, 512, 512, ...).
    Encoder: LeakyReLU(0.2) -> conv -> norm (the outermost has no norm, the innermost none either);
    decoder: ReLU -> transposed conv -> norm (-> dropout on the `dropout_levels` innermost ones,
    pix2pix's noise), the last one into the image's channels and tanh.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64, depth: int = 5,
                 scale: int = 1, dropout: float = 0.0, dropout_levels: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be >= 1, got {depth}")
        self.in_channels, self.out_channels, self.scale, self.depth = in_channels, out_channels, scale, depth
        # The input's sides must make the upsampled sides divisible by 2**depth.
        self.size_multiple = 2 ** depth // math.gcd(2 ** depth, scale)
        chans = [base_channels * min(2 ** i, 8) for i in range(depth)]
        downs = [nn.Sequential(_conv(in_channels, chans[0], 4, 2, 1))]
        for i in range(1, depth):
            layers = [nn.LeakyReLU(0.2), nn.Conv2d(chans[i - 1], chans[i], 4, stride=2, padding=1)]
            if i < depth - 1:
                layers.append(_norm(chans[i]))
            downs.append(nn.Sequential(*layers))
        self.downs = nn.ModuleList(downs)
        ups = []
        for i in range(depth - 1, 0, -1):  # from the innermost level out; level i's output joins level i-1's skip
            in_ch = chans[i] if i == depth - 1 else 2 * chans[i]
            layers = [nn.ReLU(), nn.ConvTranspose2d(in_ch, chans[i - 1], 4, stride=2, padding=1), _norm(chans[i - 1])]
            if dropout > 0 and depth - 1 - i < dropout_levels:
                layers.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*layers))
        last_in = chans[0] if depth == 1 else 2 * chans[0]
        ups.append(nn.Sequential(nn.ReLU(), to_image(last_in, out_channels), nn.Tanh()))
        self.ups = nn.ModuleList(ups)
        pix2pix_init(self)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            x_bchw = F.interpolate(x_bchw, scale_factor=self.scale, mode="bicubic", align_corners=False)
        skips = []
        h = x_bchw
        for down in self.downs:
            h = down(h)
            skips.append(h)
        skips.pop()  # the innermost features go straight up
        for up in self.ups[:-1]:
            h = torch.cat([up(h), skips.pop()], 1)
        return self.ups[-1](h)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: 4x4 convs, `layers` of them stride 2 (widths base * 2**i, capped at 8x),
    then one stride-1 conv and a 1-channel conv: a grid of logits, each judging one patch
    (layers=3: 70x70 pixels). Conditional (pix2pix): D(image, source) runs on
    concat(source resized nearest to the image's size, image)."""

    def __init__(self, image_channels: int = 3, source_channels: int = 3, base_channels: int = 64, layers: int = 3,
                 condition: bool = True):
        super().__init__()
        self.condition = condition
        in_ch = image_channels + (source_channels if condition else 0)
        mults = [min(2 ** i, 8) for i in range(layers + 1)]
        body = [_conv(in_ch, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers):
            body += [nn.Conv2d(base_channels * mults[i - 1], base_channels * mults[i], 4, stride=2, padding=1),
                     _norm(base_channels * mults[i]), nn.LeakyReLU(0.2)]
        top = base_channels * mults[layers]
        body += [nn.Conv2d(base_channels * mults[layers - 1], top, 4, stride=1, padding=1), _norm(top), nn.LeakyReLU(0.2),
                 nn.Conv2d(top, 1, 4, stride=1, padding=1)]
        self.body = nn.Sequential(*body)
        pix2pix_init(self)

    def forward(self, image_bchw: torch.Tensor, source_bchw: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(condition_on(image_bchw, source_bchw if self.condition else None))


def condition_on(image_bchw: torch.Tensor, source_bchw: torch.Tensor | None) -> torch.Tensor:
    """concat(source resized nearest to the image's size, image), or the image alone."""
    if source_bchw is None:
        return image_bchw
    if source_bchw.shape[-2:] != image_bchw.shape[-2:]:
        source_bchw = F.interpolate(source_bchw, size=image_bchw.shape[-2:], mode="nearest")
    return torch.cat([source_bchw.to(image_bchw.dtype), image_bchw], 1)


@register("paired", "pix2pix")
def build_pix2pix(model, data):
    channels = data.channels
    return (UNetGenerator(channels, channels, model.g_channels, model.depth, model.scale, model.dropout),
            PatchDiscriminator(channels, channels, model.d_channels, model.d_layers, model.d_condition))
