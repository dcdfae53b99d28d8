"""ESRGAN-style super-resolution (Wang et al. 2018): a residual-in-residual dense block (RRDB)
generator and a VGG-style discriminator for the relativistic average loss.

Generator: conv -> `num_blocks` RRDBs (3 residual dense blocks of 5 convs each, growth
`growth_channels`, residuals scaled by 0.2, no batch norm) -> conv, added to the first conv's
features -> log2(scale) x2 upsamplings (nearest + conv as ESRGAN, or sub-pixel conv) -> two convs
to the image. Weights start at 0.1x the He init (ESRGAN's trick for deep RRDB stacks).
Deviation: with ``global_skip`` the output is bicubic(input) + the network's residual, with the
last conv started near zero, so a fresh network already matches bicubic upsampling and every
step of a short CPU run goes into detail (SRResNet/ESRGAN learn the whole image).

Discriminator: ESRGAN's VGG-style stack (3x3 stride-1 and 4x4 stride-2 convs per stage, widths
doubling, capped at 8x) down to 4x4, then two linear layers to one logit per image; GroupNorm
instead of BatchNorm (R1 needs per-sample gradients). D(image, source): with ``condition`` it
sees concat(source resized nearest, image) as pix2pix's does; ESRGAN's own is unconditional.
Its logits feed the relativistic average loss (trainers.paired.losses) or any other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import EDGE_MAX_CHANNELS, EdgeConv2d, GroupNorm, num_resolution_steps
from models.registry import register
from models.unet import condition_on

UPSAMPLERS = ("nearest", "pixelshuffle")


def _scaled_init(module: nn.Module, factor: float) -> None:
    """He-normal init scaled by `factor`, biases zero (ESRGAN's initialize_weights)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            m.weight.data.mul_(factor)
            if m.bias is not None:
                m.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """5 densely connected 3x3 convs (each sees the block input and every earlier output)."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels + i * growth, growth if i < 4 else channels, 3, padding=1)
                                   for i in range(5))
        self.act = nn.LeakyReLU(0.2)
        _scaled_init(self, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.convs[-1](torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in residual: three dense blocks, their sum scaled by 0.2 onto the input."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBGenerator(nn.Module):
    """ESRGAN's RRDBNet for images in [-1, 1] (output unclamped, as ESRGAN's); any input size."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64, num_blocks: int = 23,
                 growth_channels: int = 32, scale: int = 4, upsample: str = "nearest", global_skip: bool = True):
        super().__init__()
        steps = int(round(math.log2(scale))) if scale >= 1 else -1
        if steps < 0 or 2 ** steps != scale:
            raise ValueError(f"RRDB generator scale must be 1, 2, 4, 8 ..., got {scale}")
        if upsample not in UPSAMPLERS:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLERS)}, got {upsample!r}")
        nf = base_channels
        self.in_channels, self.out_channels, self.scale = in_channels, out_channels, scale
        self.size_multiple = 1
        self.global_skip = global_skip
        conv_first = EdgeConv2d if in_channels <= EDGE_MAX_CHANNELS else nn.Conv2d
        self.conv_first = conv_first(in_channels, nf, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(nf, growth_channels) for _ in range(num_blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        ups = []
        for _ in range(steps):
            if upsample == "nearest":
                ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.2)]
            else:
                ups += [nn.Conv2d(nf, nf * 4, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.2)]
        self.upsample = nn.Sequential(*ups)
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        if global_skip:  # start as bicubic upsampling: the residual begins near zero
            with torch.no_grad():
                self.conv_last.weight.mul_(0.1)
                self.conv_last.bias.zero_()

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x_bchw)
        feat = feat + self.conv_body(self.body(feat))
        out = self.conv_last(self.act(self.conv_hr(self.upsample(feat))))
        if self.global_skip:
            base = x_bchw if self.scale == 1 else F.interpolate(x_bchw, scale_factor=self.scale, mode="bicubic",
                                                                align_corners=False)
            if base.shape[1] != out.shape[1]:
                base = base.mean(1, keepdim=True).expand_as(out)
            out = out + base.to(out.dtype)
        return out


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's discriminator: per stage a 3x3 stride-1 conv and a 4x4 stride-2 conv (widths base,
    2 base, ... capped at 8 base) down to 4x4, then Linear(100) and Linear(1). Images of
    `image_size` only (4 x a power of two)."""

    def __init__(self, image_channels: int = 3, source_channels: int = 3, image_size: int = 64,
                 base_channels: int = 64, condition: bool = False):
        super().__init__()
        self.condition = condition
        steps = num_resolution_steps(image_size)
        in_ch = image_channels + (source_channels if condition else 0)
        first = EdgeConv2d if in_ch <= EDGE_MAX_CHANNELS else nn.Conv2d
        widths = [base_channels * min(2 ** i, 8) for i in range(steps)]
        layers: list[nn.Module] = [first(in_ch, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        prev = widths[0]
        for i, w in enumerate(widths):
            if i:
                layers += [nn.Conv2d(prev, w, 3, padding=1), GroupNorm(min(32, w // 4) or 1, w), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(w, w, 4, stride=2, padding=1), GroupNorm(min(32, w // 4) or 1, w), nn.LeakyReLU(0.2)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(prev * 16, 100), nn.LeakyReLU(0.2), nn.Linear(100, 1))

    def forward(self, image_bchw: torch.Tensor, source_bchw: torch.Tensor | None = None) -> torch.Tensor:
        x = condition_on(image_bchw, source_bchw if self.condition else None)
        return self.head(self.features(x)).squeeze(1)


@register("paired", "esrgan")
def build_esrgan(model, data):
    channels = data.channels
    return (RRDBGenerator(channels, channels, model.g_channels, model.num_blocks, model.growth_channels, model.scale,
                          model.upsample, model.global_skip),
            VGGStyleDiscriminator(channels, channels, data.image_size, model.d_channels, model.d_condition))
