"""What a VAE is trained and judged on: likelihoods, the KL term and its schedules, free bits,
and the posterior diagnostics (KL per dimension, active units, mutual information)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
LIKELIHOODS = ("bernoulli", "gaussian")  # the ones whose NLL is in nats; l1/l2 are plain errors


LINKS = ("sigmoid", "pm1")
"""How a decoder's output y maps to pixels in [0, 1]: sigmoid (y are logits; the conv VAE) or
pm1 (y is an image in [-1, 1], x = (y + 1) / 2; diffusers' AutoencoderKL convention)."""


def decoder_mean(y_bchw: torch.Tensor, link: str = "sigmoid") -> torch.Tensor:
    """The decoder's mean image in pixel units (fp32; pm1 is not clamped, so it stays a density's mean)."""
    y = y_bchw.float()
    return torch.sigmoid(y) if link == "sigmoid" else (y + 1.0) * 0.5


def to_pixels(y_bchw: torch.Tensor, link: str = "sigmoid") -> torch.Tensor:
    """Decoder output as a displayable image in [0, 1]."""
    return decoder_mean(y_bchw, link).clamp(0.0, 1.0)


def reconstruction_nll(logits_bchw: torch.Tensor, x_bchw: torch.Tensor, likelihood: str,
                       log_scale: torch.Tensor | float = 0.0, link: str = "sigmoid") -> torch.Tensor:
    """Per-sample reconstruction loss of x in [0, 1], summed over pixels, in fp32.

    With m = decoder_mean(decoder output, link):
    bernoulli: -log p(x | logits), pixel intensities read as probabilities (sigmoid link only).
    gaussian:  -log N(x; m, exp(log_scale)^2), a proper density in nats.
    l1 / l2:   absolute / squared error of m; not likelihoods.
    """
    if likelihood == "bernoulli":
        if link != "sigmoid":
            raise ValueError("the bernoulli likelihood needs logits (sigmoid link)")
        per_pixel = F.binary_cross_entropy_with_logits(logits_bchw.float(), x_bchw, reduction="none")
        return per_pixel.flatten(1).sum(1)
    mean = decoder_mean(logits_bchw, link)
    if likelihood == "gaussian":
        log_scale = torch.as_tensor(log_scale, dtype=torch.float32, device=mean.device)
        per_pixel = 0.5 * ((mean - x_bchw) * torch.exp(-log_scale)).square() + log_scale + 0.5 * LOG_2PI
    elif likelihood == "l1":
        per_pixel = (mean - x_bchw).abs()
    else:
        per_pixel = (mean - x_bchw).square()
    return per_pixel.flatten(1).sum(1)


def kl_per_dim(mean_bz: torch.Tensor, logvar_bz: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample and latent dimension, (B, Z), in fp32."""
    mean, logvar = mean_bz.float(), logvar_bz.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def kl_term(kl_bz: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL the loss pays per sample: with free bits, each dimension's minibatch-average KL is
    clamped from below at `free_bits` nats (clamping after the average, as Kingma et al. 2016)."""
    if free_bits <= 0:
        return kl_bz.sum(1).mean()
    return kl_bz.mean(0).clamp(min=free_bits).sum()


def beta_at(step: int, beta: float, schedule: str, warmup_steps: int, cycle_steps: int, ramp: float) -> float:
    """KL weight at a (0-based) step under the configured schedule."""
    if schedule == "warmup":
        return beta * min(1.0, step / max(1, warmup_steps))
    if schedule == "cyclical":
        phase = (step % max(1, cycle_steps)) / max(1, cycle_steps)
        return beta * min(1.0, phase / max(ramp, 1e-8))
    return beta


@torch.no_grad()
def active_units(mean_nz: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x E[z_d | x] > threshold."""
    return int((mean_nz.float().var(0) > threshold).sum())


@torch.no_grad()
def mutual_information(mean_bz: torch.Tensor, logvar_bz: torch.Tensor, generator=None) -> float:
    """I(x; z) under q, estimated on a minibatch as in He et al. 2019 (lagging inference networks):
    E_x[-H(q(z|x))] - E_z[log q(z)], with q(z) the minibatch mixture of posteriors."""
    mean, logvar = mean_bz.float(), logvar_bz.float()
    b, d = mean.shape
    neg_entropy = (-0.5 * d * LOG_2PI - 0.5 * (1 + logvar).sum(1)).mean()
    z = mean + torch.randn(mean.shape, generator=generator, device=mean.device) * torch.exp(0.5 * logvar)
    dev = z.unsqueeze(1) - mean.unsqueeze(0)  # (B, B, D): every sample under every posterior
    log_density = -0.5 * (dev.square() / logvar.exp().unsqueeze(0)).sum(-1) - 0.5 * (d * LOG_2PI + logvar.sum(-1).unsqueeze(0))
    log_qz = torch.logsumexp(log_density, dim=1) - math.log(b)
    return float(neg_entropy - log_qz.mean())


def log_normal_standard(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) summed over the last dimension."""
    return -0.5 * ((z - mean).square() / logvar.exp() + logvar + LOG_2PI).sum(-1)
