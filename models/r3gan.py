"""R3GAN-style networks (Huang et al. 2024, "The GAN is dead; long live the GAN!"), in plain ops.

Both networks are stacks of ResNeXt-like residual blocks, one stage per resolution:

    block(x) = x + conv1x1(lrelu(conv3x3_grouped(lrelu(conv1x1(x)))))

with no normalisation layer anywhere. The last conv of every residual branch starts at zero (a
fresh block is the identity) and the other two are initialised at N(0, gain^2 / fan_in) with
gain = lrelu_gain * L^(-1/4), L = the number of blocks in the network (fix-up variance scaling,
so the residual stream's variance stays bounded however deep the network). Resolution changes are
[1, 2, 1] (binomial) FIR up/down-sampling with a 1x1 conv where the width changes.

Generator: a learned 4x4 basis modulated per channel by a linear map of z (and of the label
embedding, concatenated to z), stages up to the image size, a 1x1 conv to the image's channels,
then tanh (the contract of this project's generators: images in [-1, 1]; R3GAN itself leaves the
output unbounded). Discriminator: the mirror image, a 1x1 conv from the image, stages down to
4x4, a depthwise 4x4 "basis" conv to a feature vector, a linear head; class-conditional as a
projection discriminator (logit += <embed(c), features>, Miyato & Koyama 2018), or, as R3GAN's own
D, the projection alone (`projection_only`: no class-agnostic head, so every logit is class evidence).

Widths follow DCGAN's here (models.blocks.widths): `base` channels at half the image size,
doubling at each halving down to 4x4 (capped), and base / 2 in the stage at the image size.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import num_resolution_steps
from models.cpu import has_amx_bf16
from models.registry import register

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0 / (1.0 + LRELU_SLOPE**2))  # keeps unit variance through leaky ReLU

# ---------------------------------------------------------------------------------------------
# FIR resampling as depthwise (groups = channels) convolutions with a fixed separable kernel:
# plain, twice-differentiable ops, and much faster on CPU than slicing or a (B*C, 1, H, W) view.
# Shared with models.stylegan2.


def _kernel(taps, x: torch.Tensor, gain: float) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32, device=x.device)
    k = torch.outer(f, f) * (gain / f.sum() ** 2)
    return k.to(x.dtype if x.is_floating_point() else torch.float32).expand(x.shape[1], 1, *k.shape)


def _in_fp32_on_cpu(fn):
    """Run a depthwise resampling op in fp32 on CPU (its output in the input's dtype): oneDNN has
    no fast bf16 depthwise kernel there (stride-2 3x3 on 32x32x32x32: 23 ms vs 2.4 ms fwd+bwd)."""
    @functools.wraps(fn)
    def wrapped(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.device.type == "cpu" and (x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")):
            with torch.autocast("cpu", enabled=False):
                return fn(x.float(), *args, **kwargs).to(x.dtype)
        return fn(x, *args, **kwargs)
    return wrapped


@_in_fp32_on_cpu
def fir_filter(x: torch.Tensor, taps, pad: int, gain: float = 1.0) -> torch.Tensor:
    """Correlate each channel of an NCHW tensor with the separable kernel taps x taps (normalised
    to sum to `gain`), zero padding `pad` on every side, stride 1."""
    return F.conv2d(x, _kernel(taps, x, gain), padding=pad, groups=x.shape[1])


@_in_fp32_on_cpu
def upsample2d(x: torch.Tensor, taps) -> torch.Tensor:
    """2x upsampling: zero insertion then the normalised FIR taps (gain 4 in all). [1, 2, 1] is
    linear interpolation at the half-pixel positions; [1, 3, 3, 1] is bilinear
    (align_corners=False) with zero borders (StyleGAN2's upfirdn2d with up=2)."""
    k = len(taps)
    p = (k - 1) // 2  # even outputs centred on the input pixels for odd filters
    return F.conv_transpose2d(x, _kernel(taps, x, 4.0), stride=2, padding=p, output_padding=2 + 2 * p - k,
                              groups=x.shape[1])


@_in_fp32_on_cpu
def downsample2d(x: torch.Tensor, taps) -> torch.Tensor:
    """2x downsampling: the normalised FIR filter, then every second pixel."""
    return F.conv2d(x, _kernel(taps, x, 1.0), stride=2, padding=(len(taps) - 1) // 2, groups=x.shape[1])


# ---------------------------------------------------------------------------------------------


def msr_init_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """N(0, gain^2 / fan_in) (fan_in = in_channels / groups x kernel area); gain 0 -> zeros."""
    with torch.no_grad():
        if gain == 0:
            return weight.zero_()
        return weight.normal_(0.0, gain / math.sqrt(weight[0].numel()))


class Conv1x1(nn.Conv2d):
    """A bias-free 1x1 nn.Conv2d (same parameters) run as matrix products: (N*H*W, C) rows for
    channels_last inputs, (O, C) @ (C, H*W) per sample for NCHW ones. oneDNN's 1x1 kernels are
    up to 2.5x slower fwd+bwd at these sizes on CPU (32x32x32x32: 7.5 ms vs 3.1 ms, one core)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weight = self.weight.reshape(self.out_channels, c).to(x.dtype)  # autocast casts both further
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            return (rows @ weight.t()).view(n, h, w, -1).permute(0, 3, 1, 2)
        x = x.reshape(n, c, h * w)
        if h * w >= 64:  # a batch of (O, C) @ (C, HW) products: no transposed copies of x
            return torch.bmm(weight.unsqueeze(0).expand(n, -1, -1), x).view(n, -1, h, w)
        return torch.matmul(weight, x).view(n, -1, h, w)


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's (O, I/groups, kh, kw) weight as the dense (O, I, kh, kw) weight of the
    same convolution: group g's filters in its own input channels, zeros elsewhere."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    per_group = weight.view(groups, out_ch // groups, in_per_group, *weight.shape[2:])
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    return torch.einsum("goikl,gh->gohikl", per_group, eye).reshape(out_ch, groups * in_per_group, *weight.shape[2:])


class GroupedConv2d(nn.Conv2d):
    """A grouped nn.Conv2d (same parameters). In bf16 on an AMX CPU, groups of fewer than 8 input
    channels run as one dense conv with the block-diagonal weight: groups x the multiply-adds, but
    oneDNN's grouped kernels are slow for such narrow groups and AMX's dense ones are not (a
    32-channel 3x3 conv in 8 groups on 32x32x32x32, fwd+bwd, one core, channels_last: 4.7 ms
    grouped, 2.7 ms dense; from 8 channels a group up, grouped is faster). fp32 (R1 and R2 run in
    it) keeps the grouped kernel: there dense costs 1.7x."""

    NARROW_GROUP = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.groups > 1 and self.in_channels // self.groups < self.NARROW_GROUP and x.dtype == torch.bfloat16
                and x.device.type == "cpu" and has_amx_bf16()):
            return F.conv2d(x, block_diagonal(self.weight.to(x.dtype), self.groups), self.bias, self.stride,
                            self.padding, self.dilation)
        return super().forward(x)


def _conv(in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    if kernel == 1 and groups == 1:
        conv = Conv1x1(in_ch, out_ch)
    elif groups > 1:
        conv = GroupedConv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    msr_init_(conv.weight, gain)
    return conv


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2) with a learned per-channel bias (R3GAN's BiasedActivation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), LRELU_SLOPE)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))); the last conv starts at zero."""

    def __init__(self, channels: int, cardinality: int, expansion: int, variance_scale: int, kernel: int = 3):
        super().__init__()
        hidden = channels * expansion
        groups = math.gcd(hidden, max(1, cardinality))
        gain = LRELU_GAIN * variance_scale ** (-1.0 / (2 * 3 - 2))  # 3 linear layers per branch
        self.conv1 = _conv(channels, hidden, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(hidden)
        self.conv2 = _conv(hidden, hidden, kernel, groups=groups, gain=gain)
        self.act2 = BiasedLeakyReLU(hidden)
        self.conv3 = _conv(hidden, channels, 1, gain=0.0)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Upsample(nn.Module):
    """1x1 conv to the new width (at the low resolution, where it is cheap), then FIR 2x up."""

    def __init__(self, in_ch: int, out_ch: int, taps: list[float]):
        super().__init__()
        self.taps = list(taps)
        self.proj = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2d(self.proj(x), self.taps)


class Downsample(nn.Module):
    """FIR 2x down, then a 1x1 conv to the new width (at the low resolution)."""

    def __init__(self, in_ch: int, out_ch: int, taps: list[float]):
        super().__init__()
        self.taps = list(taps)
        self.proj = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(downsample2d(x, self.taps))


class GenerativeBasis(nn.Module):
    """A learned (C, 4, 4) basis, each channel scaled by a linear map of the input vector."""

    def __init__(self, in_dim: int, channels: int):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, 4, 4))
        self.linear = nn.Linear(in_dim, channels, bias=False)
        msr_init_(self.linear.weight)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.basis.to(v.dtype).unsqueeze(0) * self.linear(v).unsqueeze(-1).unsqueeze(-1)


class DiscriminativeBasis(nn.Module):
    """Depthwise 4x4 conv (no padding): a (B, C, 4, 4) map -> a (B, C) feature vector."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 4, groups=channels, bias=False)
        msr_init_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the conv as a product and a sum: faster on CPU
        return (x * self.conv.weight.to(x.dtype).view(1, -1, 4, 4)).sum(dim=(2, 3))


def stage_widths(base: int, image_size: int, cap: int = 512, floor: int = 1) -> list[int]:
    """Widths of the stages from 4x4 up to image_size: base x image_size / (2 x resolution),
    capped. As DCGAN's feature maps (models.blocks.widths: `base` at half the image size,
    doubling at each halving) with one more stage at the image size, at half the width (width
    inversely proportional to resolution, as StyleGAN's), and no stage below `floor` (R3GAN's own
    configs keep every stage equally wide)."""
    steps = num_resolution_steps(image_size)
    return [max(floor, 1, min(cap, base * image_size // (2 * 4 * 2**i))) for i in range(steps + 1)]


def require_labels(c: torch.Tensor | None, num_classes: int, who: str) -> torch.Tensor:
    """The labels of a class-conditional network as int64; refuses None (no silent unconditional
    fallback: a conditional D scored without labels would be a different function)."""
    if c is None:
        raise ValueError(f"this {who} is class-conditional (num_classes={num_classes}): pass labels c")
    return c.long()


class R3GANGenerator(nn.Module):
    """G(z, c=None) -> (B, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, z_dim: int = 64, image_size: int = 32, channels: int = 3, base_channels: int = 64,
                 blocks_per_stage: int = 1, cardinality: int = 4, expansion: int = 1, num_classes: int = 0,
                 max_channels: int = 512, min_channels: int = 1, taps: tuple[float, ...] = (1, 2, 1)):
        super().__init__()
        self.z_dim, self.image_size, self.channels, self.num_classes = z_dim, image_size, channels, num_classes
        chans = stage_widths(base_channels, image_size, max_channels, min_channels)
        scale = blocks_per_stage * len(chans)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes > 0 else None
        self.basis = GenerativeBasis(z_dim * (2 if num_classes > 0 else 1), chans[0])
        stages = []
        for i, ch in enumerate(chans):
            layers = [] if i == 0 else [Upsample(chans[i - 1], ch, list(taps))]
            layers += [ResidualBlock(ch, cardinality, expansion, scale) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.to_image = _conv(chans[-1], channels, 1)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(require_labels(c, self.num_classes, "generator")).to(z.dtype)], dim=1)
        return torch.tanh(self.to_image(self.stages(self.basis(z))))


class R3GANDiscriminator(nn.Module):
    """D(x, c=None) -> (B,) logits; a projection discriminator when num_classes > 0."""

    def __init__(self, image_size: int = 32, channels: int = 3, base_channels: int = 64, blocks_per_stage: int = 1,
                 cardinality: int = 4, expansion: int = 1, num_classes: int = 0, max_channels: int = 512,
                 min_channels: int = 1, taps: tuple[float, ...] = (1, 2, 1), projection_only: bool = False):
        super().__init__()
        if projection_only and num_classes == 0:
            raise ValueError("projection_only needs a class-conditional discriminator (num_classes > 0)")
        self.num_classes = num_classes
        chans = stage_widths(base_channels, image_size, max_channels, min_channels)[::-1]  # image_size ... 4x4
        scale = blocks_per_stage * len(chans)
        self.from_image = _conv(channels, chans[0], 1)
        stages = []
        for i, ch in enumerate(chans):
            layers = [ResidualBlock(ch, cardinality, expansion, scale) for _ in range(blocks_per_stage)]
            if i + 1 < len(chans):
                layers.append(Downsample(ch, chans[i + 1], list(taps)))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.basis = DiscriminativeBasis(chans[-1])
        self.head = None
        if not projection_only:
            self.head = nn.Linear(chans[-1], 1, bias=False)
            msr_init_(self.head.weight)
        self.embed = None
        if num_classes > 0:
            self.embed = nn.Embedding(num_classes, chans[-1])
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(chans[-1]))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        feat = self.basis(self.stages(self.from_image(x)))
        logits = self.head(feat).squeeze(1) if self.head is not None else 0.0
        if self.embed is not None:
            embedded = self.embed(require_labels(c, self.num_classes, "discriminator")).to(feat.dtype)
            logits = logits + (embedded * feat).sum(1)
        return logits


@register("gan", "r3gan")
def build_r3gan(model, data, **options):
    common = dict(image_size=data.image_size, channels=data.channels, blocks_per_stage=model.blocks_per_stage,
                  cardinality=model.cardinality, expansion=model.expansion, min_channels=model.min_channels,
                  num_classes=getattr(model, "num_classes", 0))
    return (R3GANGenerator(model.z_dim, base_channels=model.g_channels, **common),
            R3GANDiscriminator(base_channels=model.d_channels, projection_only=model.projection_only, **common))
