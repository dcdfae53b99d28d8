"""Convolutional building blocks shared by the VAE and the GAN networks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Edge convolutions (an image's few channels in or out) with at most this many channels on the
# image side run as one GEMM in channels_last mode (see EdgeConv2d).
EDGE_MAX_CHANNELS = 4


class EdgeConv2d(nn.Conv2d):
    """A Conv2d reading an image (1 to 4 channels). Same parameters and function as nn.Conv2d;
    with ``gemm`` on (set by :func:`to_channels_last`) it runs as im2col + one matrix product
    whose result is already channels_last. oneDNN's direct kernels are slow for so few input
    channels (fwd+bwd of the 1->32 4x4/2 conv on 64x32x32: 7.8 ms vs 2.8 ms, one AVX2 core)."""

    gemm = False
    channels_last = False  # GEMM output in channels_last memory (set by to_channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.gemm and x.dim() == 4 and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return super().forward(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (N, C*kh*kw, L)
        weight = self.weight.reshape(self.out_channels, -1)
        if self.channels_last:  # (N*L, O) rows: channels_last memory, what the next conv wants
            out = torch.mm(cols.transpose(1, 2).reshape(n * oh * ow, -1), weight.t())
            if self.bias is not None:
                out = out + self.bias
            return out.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)
        out = torch.matmul(weight, cols)  # (N, O, L): NCHW
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(n, self.out_channels, oh, ow)


class EdgeConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d writing an image (1 to 4 channels). Same parameters and function as
    nn.ConvTranspose2d; with ``gemm`` on it runs as one matrix product over the channels_last
    input (every input pixel's k x k output patch) and col2im (fold): 6.4 ms vs 9.1 ms fwd+bwd for
    32->1 4x4/2 on 64x32x16x16, one AVX2 core."""

    gemm = False

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if not (self.gemm and output_size is None and x.dim() == 4 and self.groups == 1
                and self.dilation == (1, 1) and self.output_padding == (0, 0) and self.padding_mode == "zeros"):
            return super().forward(x, output_size)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw
        weight = self.weight.reshape(c, -1)  # (C, O*kh*kw)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view of channels_last memory
            cols = torch.mm(rows, weight).view(n, h * w, -1).transpose(1, 2)
        else:
            cols = torch.matmul(weight.t(), x.reshape(n, c, h * w))  # (N, O*kh*kw, L)
        out = F.fold(cols, (oh, ow), self.kernel_size, padding=self.padding, stride=self.stride)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class _GroupNormNHWC(torch.autograd.Function):
    """GroupNorm of a channels_last fp32 tensor through its (N, H*W, C) view: per-channel
    statistics are reductions over a contiguous-inner view, the normalisation one broadcast
    multiply-add. The ATen channels_last kernel handles groups of 4 channels poorly on AVX2 (5.5 ms
    vs 1.4 ms fwd+bwd for 64x32x16x16). The backward is ATen's formula (GroupNormKernel.cpp)."""

    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float):
        n, c, h, w = x.shape
        d = c // groups
        xv = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        mean_c = xv.mean(1)  # (N, C); two passes: torch.var_mean's Welford kernel is 10x slower here
        var_c = (xv - mean_c.unsqueeze(1)).square().mean(1)
        mean_g = mean_c.view(n, groups, d).mean(-1)
        # Within-channel plus between-channel variance: no E[x^2] - E[x]^2 cancellation.
        var_g = var_c.view(n, groups, d).mean(-1) + (mean_c.view(n, groups, d) - mean_g.unsqueeze(-1)).square().mean(-1)
        rstd_g = torch.rsqrt(var_g + eps)
        scale = rstd_g.repeat_interleave(d, dim=1)  # (N, C)
        if weight is not None:
            scale = scale * weight
        shift = -mean_g.repeat_interleave(d, dim=1) * scale
        if bias is not None:
            shift = shift + bias
        y = torch.addcmul(shift.unsqueeze(1), xv, scale.unsqueeze(1))
        ctx.save_for_backward(xv, mean_g, rstd_g, weight)
        ctx.shape, ctx.groups, ctx.has_bias = (n, c, h, w), groups, bias is not None
        return y.view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xv, mean_g, rstd_g, weight = ctx.saved_tensors
        (n, c, h, w), groups = ctx.shape, ctx.groups
        d = c // groups
        dyv = dy.permute(0, 2, 3, 1).reshape(n, h * w, c)
        db_c = dyv.sum(1)  # (N, C)
        ds_c = (dyv * xv).sum(1)
        mean_c, rstd_c = mean_g.repeat_interleave(d, dim=1), rstd_g.repeat_interleave(d, dim=1)
        grad_w = ((ds_c - mean_c * db_c) * rstd_c).sum(0) if weight is not None and ctx.needs_input_grad[2] else None
        grad_b = db_c.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            gamma = weight if weight is not None else torch.ones_like(db_c[0])
            ds_g = (ds_c * gamma).view(n, groups, d).sum(-1)
            db_g = (db_c * gamma).view(n, groups, d).sum(-1)
            s = 1.0 / (d * h * w)
            c2 = (db_g * mean_g - ds_g) * rstd_g.pow(3) * s
            c3 = -c2 * mean_g - db_g * rstd_g * s
            c1 = rstd_c * gamma
            gx = torch.addcmul(c3.repeat_interleave(d, dim=1).unsqueeze(1), xv, c2.repeat_interleave(d, dim=1).unsqueeze(1))
            gx.addcmul_(dyv, c1.unsqueeze(1))
            grad_x = gx.view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_x, None, grad_w, grad_b, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters) with a fast path for channels_last fp32 inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            return _GroupNormNHWC.apply(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def edge_convs_as_gemm(module: nn.Module, on: bool = True) -> nn.Module:
    """Switch a network's edge convolutions (EdgeConv2d, EdgeConvTranspose2d) to their GEMM path."""
    for m in module.modules():
        if isinstance(m, (EdgeConv2d, EdgeConvTranspose2d)):
            m.gemm = on
    return module


def to_channels_last(module: nn.Module, weights: bool = True) -> nn.Module:
    """Run a network in channels_last (in place): its edge convolutions' GEMM output in that
    layout and, with ``weights``, its 4-D weights too. Inputs must be channels_last as well
    (trainers.runtime.engines does that with a forward pre-hook); a channels_last input alone is enough
    for oneDNN to pick its channels_last kernels."""
    for m in module.modules():
        if isinstance(m, EdgeConv2d):
            m.channels_last = True
    return module.to(memory_format=torch.channels_last) if weights else module


def num_resolution_steps(image_size: int, min_size: int = 4) -> int:
    """How many 2x up/down-samplings separate `image_size` from the 4x4 base; the size must be 4 * 2^k."""
    steps = int(round(math.log2(image_size / min_size)))
    if image_size < 8 or min_size * 2**steps != image_size:
        raise ValueError(f"image size {image_size} is not 4 x a power of two (8, 16, 32, 64, 128, 256 ...)")
    return steps


def down_block(in_ch: int, out_ch: int, norm: bool = True) -> nn.Sequential:
    """Stride-2 conv halving the resolution, with LeakyReLU (and BatchNorm-free group norm if asked)."""
    conv = EdgeConv2d if in_ch <= EDGE_MAX_CHANNELS else nn.Conv2d
    layers = [conv(in_ch, out_ch, 4, stride=2, padding=1)]
    if norm:
        layers.append(GroupNorm(min(32, out_ch // 4) or 1, out_ch))
    layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Transposed conv doubling the resolution, with normalisation and ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1),
        GroupNorm(min(32, out_ch // 4) or 1, out_ch),
        nn.ReLU(),
    )


def to_image(in_ch: int, out_ch: int) -> nn.Module:
    """The last transposed conv, doubling the resolution into the image's channels."""
    conv = EdgeConvTranspose2d if out_ch <= EDGE_MAX_CHANNELS else nn.ConvTranspose2d
    return conv(in_ch, out_ch, 4, stride=2, padding=1)


def widths(base: int, steps: int, cap: int = 512) -> list[int]:
    """Channel widths from the highest resolution (base) doubling towards 4x4, capped."""
    return [min(base * 2**i, cap) for i in range(steps)]
