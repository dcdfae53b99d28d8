"""GAN objectives and gradient penalties, computed in fp32 whatever precision the networks run in.

Losses take logits (any dtype) and return fp32 scalars:

    loss           discriminator                        generator
    nonsaturating  softplus(-D(x)) + softplus(D(G(z)))   softplus(-D(G(z)))
    hinge          relu(1 - D(x)) + relu(1 + D(G(z)))    -D(G(z))
    wasserstein    D(G(z)) - D(x)                        -D(G(z))
    relativistic   softplus(D(G(z)) - D(x))              softplus(D(x) - D(G(z)))

The relativistic pairing loss (RpGAN; Jolicoeur-Martineau 2019, R3GAN: Huang et al. 2024) pairs
each real sample with one generated sample; its generator loss also reads D on real data
(RELATIVISTIC_G_LOSSES take (fake_logits, real_logits)).

Penalties (R1 on real data, R2 on generated data, WGAN-GP on interpolates) evaluate the
discriminator on fp32 copies of its parameters, so the input gradient and its square are exact
in fp32 and need no loss scaling, even when the engine trains in bf16/fp16 (the AMP WGAN-GP NaN
that StudioGAN users meet comes from squaring a low-precision gradient norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

LOSSES = ("nonsaturating", "hinge", "wasserstein", "relativistic")


def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: -log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(G(z))."""
    return F.softplus(-fake_logits.float()).mean()


def d_loss_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (SAGAN, BigGAN): relu(1 - D(x)) + relu(1 + D(G(z)))."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def d_loss_wasserstein(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Critic loss of WGAN: E D(G(z)) - E D(x) (needs a Lipschitz constraint, e.g. WGAN-GP)."""
    return fake_logits.float().mean() - real_logits.float().mean()


def g_loss_linear(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss of hinge and Wasserstein GANs: -E D(G(z))."""
    return -fake_logits.float().mean()


def d_loss_relativistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """RpGAN discriminator loss: softplus(-(D(x) - D(G(z)))), real and generated samples paired."""
    return F.softplus(fake_logits.float() - real_logits.float()).mean()


def g_loss_relativistic(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """RpGAN generator loss: softplus(-(D(G(z)) - D(x))); D(x) is a constant for G."""
    return F.softplus(real_logits.float().detach() - fake_logits.float()).mean()


D_LOSSES = {"nonsaturating": d_loss_nonsaturating, "hinge": d_loss_hinge, "wasserstein": d_loss_wasserstein,
            "relativistic": d_loss_relativistic}
RELATIVISTIC_G_LOSSES = {"relativistic": g_loss_relativistic}
G_LOSSES = {"nonsaturating": g_loss_nonsaturating, "hinge": g_loss_linear, "wasserstein": g_loss_linear}


def _input_grad(discriminator: nn.Module, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x sum D(x, c), in fp32, with a graph back to the discriminator's real parameters.

    The discriminator is run on fp32 copies of its (possibly bf16/fp16) parameters; the casts
    are differentiable, so the penalty's gradient still reaches the real parameters. This calls
    the raw module, not the DeepSpeed engine: a second autograd pass through the engine's
    forward is refused by DeepSpeed.
    """
    params = {n: p.float() for n, p in discriminator.named_parameters()}
    buffers = {n: b.float() if b.is_floating_point() else b for n, b in discriminator.named_buffers()}
    x = x.detach().float().requires_grad_(True)
    logits = functional_call(discriminator, (params, buffers), (x,) if c is None else (x, c))
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.flatten(1)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real data (with its labels c, if any), in fp32."""
    return _input_grad(discriminator, real, c).square().sum(1).mean()


def r2_penalty(discriminator: nn.Module, fake: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """R2: the same zero-centred penalty, E ||grad_x D(x)||^2, on generated data (detached)."""
    return _input_grad(discriminator, fake, c).square().sum(1).mean()


def wgan_gp_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                    generator: torch.Generator | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E (||grad D(x_hat)||_2 - 1)^2, x_hat = e*x + (1-e)*G(z).

    e ~ U[0, 1] per sample, drawn from `generator` (the task's noise stream, so a resumed run
    draws the same). All in fp32; the norm has a tiny floor so its gradient stays finite at 0.
    """
    real, fake = real.detach().float(), fake.detach().float()
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator, device=real.device)
    x_hat = eps * real + (1.0 - eps) * fake
    grad = _input_grad(discriminator, x_hat, c)  # conditional: interpolates keep the real sample's label
    norm = (grad.square().sum(1) + 1e-12).sqrt()
    return (norm - 1.0).square().mean()


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """MSGAN's term (Mao et al. 2019) over the pairs (i, i + B/2) of a batch whose halves share
    labels: 1 / (ratio + eps), ratio = mean |G(z_a) - G(z_b)| / mean |z_a - z_b| per pair, averaged.
    Returns (loss, ratio), the ratio detached for logging."""
    half = fake.shape[0] // 2
    image_gap = (fake[:half] - fake[half:2 * half]).abs().float().flatten(1).mean(1)
    latent_gap = (z[:half] - z[half:2 * half]).abs().float().flatten(1).mean(1)
    ratio = (image_gap / latent_gap).mean()
    return 1.0 / (ratio + eps), ratio.detach()


def lazy_adam_compensation(lr: float, betas: tuple[float, float], every: int) -> tuple[float, tuple[float, float]]:
    """StyleGAN2's correction for a regulariser that runs every `every` steps.

    With c = k/(k+1), Adam gets lr*c and betas**c: k+1 gradient evaluations (k plain, one
    regularised) then move the weights as far as k would have without lazy regularisation.
    """
    if every <= 1:
        return lr, tuple(betas)
    c = every / (every + 1)
    return lr * c, tuple(b ** c for b in betas)
