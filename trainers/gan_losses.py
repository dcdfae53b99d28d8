"""GAN objectives and the R1 penalty, computed in fp32 whatever precision the networks run in."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: -log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(G(z))."""
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 on real data, in fp32.

    The discriminator is run on fp32 copies of its (possibly bf16/fp16) parameters, so the
    input gradient and its square are exact in fp32 and need no loss scaling; the casts are
    differentiable, so the penalty's gradient still reaches the real parameters. This calls
    the raw module, not the DeepSpeed engine: a second autograd pass through the engine's
    forward is refused by DeepSpeed.
    """
    params = {n: p.float() for n, p in discriminator.named_parameters()}
    buffers = {n: b.float() if b.is_floating_point() else b for n, b in discriminator.named_buffers()}
    x = real.detach().float().requires_grad_(True)
    logits = functional_call(discriminator, (params, buffers), (x,))
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
