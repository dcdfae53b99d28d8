"""Adversarial objectives of the paired task, on logits of any shape (PatchGAN maps or one per image).

Each is a pair (D loss(real, fake), G loss(fake, real)), fp32 scalars:

    loss           discriminator                                    generator
    nonsaturating  softplus(-r) + softplus(f)                        softplus(-f)
    hinge          relu(1 - r) + relu(1 + f)                         -f
    relativistic   [softplus(-(r - E f)) + softplus(f - E r)] / 2    [softplus(r - E f) + softplus(-(f - E r))] / 2

`relativistic` is the relativistic average GAN (Jolicoeur-Martineau 2018) as ESRGAN uses it:
D estimates how much more realistic the real image is than the average generated one; G's loss
takes gradients from both the real and the generated logits (the real ones detached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.gan.losses import D_LOSSES, G_LOSSES


def d_loss_relativistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    r, f = real_logits.float(), fake_logits.float()
    return 0.5 * (F.softplus(-(r - f.mean())).mean() + F.softplus(f - r.mean()).mean())


def g_loss_relativistic(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    r, f = real_logits.float().detach(), fake_logits.float()
    return 0.5 * (F.softplus(r - f.mean()).mean() + F.softplus(-(f - r.mean())).mean())


def _g_ignoring_real(name: str):
    g = G_LOSSES[name]
    return lambda fake_logits, real_logits=None: g(fake_logits)


ADV_LOSSES = {
    "nonsaturating": (D_LOSSES["nonsaturating"], _g_ignoring_real("nonsaturating")),
    "hinge": (D_LOSSES["hinge"], _g_ignoring_real("hinge")),
    "relativistic": (d_loss_relativistic, g_loss_relativistic),
}
# G losses that read D's logits on the real images too.
NEEDS_REAL_LOGITS = ("relativistic",)
