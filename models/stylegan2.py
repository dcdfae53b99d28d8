"""StyleGAN2-style networks (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN"), in plain PyTorch ops (no custom CUDA kernels).

Generator: a mapping network (z, and the label embedding when conditional, each normalised to
unit second moment -> `mapping_layers` leaky-ReLU FC layers at 1/100 learning rate -> w); a
synthesis network from a learned constant 4x4 input through modulated 3x3 convolutions with
weight demodulation, per-pixel noise of learned strength and a bias at each layer, 2x upsampling
by a stride-2 transposed modulated conv followed by a [1, 3, 3, 1] blur; skip outputs: each
resolution's 1x1 modulated toRGB (no demodulation) is added to the [1, 3, 3, 1]-upsampled sum of
the lower ones; tanh last (the project's contract: images in [-1, 1]).

Modulation runs in the "non-fused" form: scale the input's channels by the style, convolve with
the shared weight, scale the output's channels by the demodulation coefficients
rsqrt(sum_{i,k} (w_oik s_i)^2 + eps). It equals convolving each sample with its own modulated,
demodulated weight (StyleGAN2's grouped-conv form), but is one ordinary batched convolution.

Discriminator: residual ('resnet') blocks, each two 3x3 convs with a [1, 3, 3, 1] blur-and-
decimate between them plus a 1x1 skip on the decimated input, the sum scaled by sqrt(1/2);
then the minibatch standard deviation layer (group 4, one channel), a 3x3 conv, an FC layer and
the output FC; class-conditional as a projection discriminator (logit += <embed(c), features> /
sqrt(dim)). Every weight has an equalized learning rate: stored N(0, 1) and scaled by
1/sqrt(fan_in) at run time.

Widths follow DCGAN's here (models.blocks.widths): `base` channels at half the image size,
doubling at each halving down to 4x4 (capped), and base / 2 at the image size (as StyleGAN's,
inversely proportional to the resolution). Per-layer noise is drawn from
`noise_generator` when one is set (a torch.Generator on the output's device), else from torch's
global generator; `noise_mode="const"` uses fixed per-layer noise buffers, "none" none.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.r3gan import downsample2d, fir_filter, require_labels, stage_widths, upsample2d
from models.registry import register

SQRT2 = math.sqrt(2.0)
BLUR = [1.0, 3.0, 3.0, 1.0]
NOISE_MODES = ("random", "const", "none")


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """leaky ReLU (0.2) scaled by sqrt(2), StyleGAN's unit-gain activation."""
    return F.leaky_relu(x, 0.2) * SQRT2


class EqualLinear(nn.Module):
    """Linear layer with an equalized learning rate (weights N(0, 1/lr_mul^2) x lr_mul/sqrt(fan_in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain, self.lr_mul, self.activation = lr_mul / math.sqrt(in_features), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias * self.lr_mul
        x = F.linear(x, self.weight * self.weight_gain, b)
        return lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """Conv2d (stride 1, 'same' padding) with an equalized learning rate and optional lrelu."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.activation, self.padding = activation, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)
        return lrelu(x) if self.activation else x


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by a style (an affine map of w, bias 1),
    with optional demodulation; `up` doubles the resolution (transposed stride-2 conv + blur)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate, self.up, self.padding = demodulate, up, kernel // 2

    def modulated(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """The convolution for given styles (B, in_ch); split from forward for testing."""
        weight = self.weight * self.weight_gain
        x = x * styles.to(x.dtype).unsqueeze(-1).unsqueeze(-1)
        if self.up:  # StyleGAN2's upsampling conv: transposed stride-2 conv (2H+1), then blur to 2H
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            x = fir_filter(x, BLUR, 1, gain=4.0)
        else:
            x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            coef = (styles.float().square() @ weight.float().square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
            x = x * coef.to(x.dtype).unsqueeze(-1).unsqueeze(-1)
        return x

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.affine(w))


class SynthesisLayer(nn.Module):
    """Modulated conv, + noise x learned strength (starts at 0), + bias, lrelu."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, up=up)
        # shape (1,), not (): DeepSpeed broadcasts parameters as bytes, which a 0-d bf16 tensor cannot be viewed as
        self.noise_strength = nn.Parameter(torch.zeros([1]))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], generator=generator, device=x.device)
            x = x + (noise * self.noise_strength).to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        return lrelu(x + self.bias.to(x.dtype).view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, + bias: a resolution's skip output."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias.to(x.dtype).view(1, -1, 1, 1)


class MappingNetwork(nn.Module):
    """z (and c) -> w: normalised inputs, `num_layers` FC + lrelu at lr_mul (0.01 as in StyleGAN)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 2, num_classes: int = 0, lr_mul: float = 0.01):
        super().__init__()
        if num_layers < 1:
            raise ValueError("the mapping network needs at least one layer (model.mapping_layers >= 1)")
        self.num_classes = num_classes
        self.embed = EqualLinear(num_classes, w_dim) if num_classes > 0 else None
        dims = [z_dim + (w_dim if num_classes > 0 else 0)] + [w_dim] * num_layers
        self.layers = nn.Sequential(*[EqualLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activation=True)
                                      for i in range(num_layers)])

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            onehot = F.one_hot(require_labels(c, self.num_classes, "generator"), self.num_classes).to(z.dtype)
            x = torch.cat([x, normalize_2nd_moment(self.embed(onehot)).to(x.dtype)], dim=1)
        return self.layers(x)


class SynthesisNetwork(nn.Module):
    """ws (B, num_ws, w_dim) -> the summed skip outputs (B, channels, image_size, image_size), unbounded."""

    def __init__(self, w_dim: int, image_size: int, channels: int, base_channels: int, max_channels: int = 512):
        super().__init__()
        chans = stage_widths(base_channels, image_size, max_channels)  # 4x4 ... image_size
        self.const = nn.Parameter(torch.randn(chans[0], 4, 4))
        self.convs = nn.ModuleList([SynthesisLayer(chans[0], chans[0], w_dim, 4)])
        self.torgbs = nn.ModuleList([ToRGB(chans[0], channels, w_dim)])
        for i in range(1, len(chans)):
            res = 4 * 2**i
            self.convs.append(SynthesisLayer(chans[i - 1], chans[i], w_dim, res, up=True))
            self.convs.append(SynthesisLayer(chans[i], chans[i], w_dim, res))
            self.torgbs.append(ToRGB(chans[i], channels, w_dim))
        # ws index: conv j uses ws[j]; the toRGB after conv j uses ws[j + 1] (as StyleGAN2).
        self.num_ws = len(self.convs) + 1

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", generator: torch.Generator | None = None):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
        x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        x = self.convs[0](x, ws[:, 0], noise_mode, generator)
        img = self.torgbs[0](x, ws[:, 1])
        for i in range(1, len(self.torgbs)):
            j = 2 * i - 1
            x = self.convs[j](x, ws[:, j], noise_mode, generator)
            x = self.convs[j + 1](x, ws[:, j + 1], noise_mode, generator)
            img = upsample2d(img, BLUR) + self.torgbs[i](x, ws[:, j + 2])
        return img


class StyleGAN2Generator(nn.Module):
    """G(z, c=None) -> (B, channels, image_size, image_size) in [-1, 1].

    `mapping(z, c)` -> w (B, w_dim); `synthesize(ws)` -> image for ws (B, num_ws, w_dim) (the
    path-length penalty differentiates it); `noise_generator` (attribute, default None) is the
    torch.Generator the per-layer noise is drawn from."""

    def __init__(self, z_dim: int = 64, image_size: int = 32, channels: int = 3, base_channels: int = 64,
                 w_dim: int = 128, mapping_layers: int = 2, num_classes: int = 0, max_channels: int = 512):
        super().__init__()
        self.z_dim, self.w_dim, self.image_size, self.channels = z_dim, w_dim, image_size, channels
        self.num_classes = num_classes
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes)
        self.synthesis = SynthesisNetwork(w_dim, image_size, channels, base_channels, max_channels)
        self.num_ws = self.synthesis.num_ws
        self.noise_generator: torch.Generator | None = None

    def synthesize(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        return torch.tanh(self.synthesis(ws, noise_mode, self.noise_generator))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, noise_mode: str = "random") -> torch.Tensor:
        w = self.mapping(z, c)
        return self.synthesize(w.unsqueeze(1).expand(-1, self.num_ws, -1), noise_mode)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """Append `num_channels` feature maps holding the mean (over features and pixels) standard
    deviation across each group of samples. The group is the largest divisor of the batch not
    above group_size, and groups are runs of consecutive samples (StyleGAN2 strides them, i,
    i + B/G, ...): a batch that concatenates real and generated halves keeps them apart whenever
    the half is a multiple of the group size."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    f = num_channels
    y = x.float().reshape(b // g, g, f, c // f, h, w)
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1).add(1e-8).sqrt()  # (B/G, F, C/F, H, W)
    y = y.mean(dim=(2, 3, 4)).repeat_interleave(g, dim=0)  # (B, F)
    return torch.cat([x, y.to(x.dtype).view(b, f, 1, 1).expand(b, f, h, w)], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: (conv3x3 -> blur/decimate -> conv3x3) + 1x1(blur/decimate(x)), x sqrt(1/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3, activation=True)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, activation=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(downsample2d(x, BLUR))
        x = self.conv1(downsample2d(self.conv0(x), BLUR))
        return (x + y) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """D(x, c=None) -> (B,) logits; a projection discriminator when num_classes > 0."""

    def __init__(self, image_size: int = 32, channels: int = 3, base_channels: int = 64, num_classes: int = 0,
                 max_channels: int = 512, mbstd_group: int = 4):
        super().__init__()
        self.num_classes, self.mbstd_group = num_classes, mbstd_group
        chans = stage_widths(base_channels, image_size, max_channels)[::-1]  # image_size ... 4x4
        self.from_image = EqualConv2d(channels, chans[0], 1, activation=True)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(chans[i], chans[i + 1]) for i in range(len(chans) - 1)])
        top = chans[-1]
        self.conv = EqualConv2d(top + 1, top, 3, activation=True)
        self.fc = EqualLinear(top * 16, top, activation=True)
        self.out = EqualLinear(top, 1)
        self.embed = EqualLinear(num_classes, top, bias=False) if num_classes > 0 else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.blocks(self.from_image(x))
        feat = self.fc(self.conv(minibatch_stddev(x, self.mbstd_group)).flatten(1))
        logits = self.out(feat).squeeze(1)
        if self.embed is not None:
            onehot = F.one_hot(require_labels(c, self.num_classes, "discriminator"), self.num_classes).to(feat.dtype)
            logits = logits + (self.embed(onehot) * feat).sum(1) / math.sqrt(feat.shape[1])
        return logits


@contextmanager
def noise_from(net: nn.Module, generator: torch.Generator):
    """Inside the block a StyleGAN2 generator draws its per-layer noise from `generator` (other
    networks have none): samples seeded by it are then the same each time, and a sampler that
    shares the training noise stream does not consume it."""
    if not hasattr(net, "noise_generator"):
        yield
        return
    saved, net.noise_generator = net.noise_generator, generator
    try:
        yield
    finally:
        net.noise_generator = saved


@register("gan", "stylegan2")
def build_stylegan2(model, data, **options):
    num_classes = getattr(model, "num_classes", 0)
    return (StyleGAN2Generator(model.z_dim, data.image_size, data.channels, model.g_channels, model.w_dim,
                               model.mapping_layers, num_classes),
            StyleGAN2Discriminator(data.image_size, data.channels, model.d_channels, num_classes))
