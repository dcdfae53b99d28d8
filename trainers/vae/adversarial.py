"""The VAE's optional adversarial term, as in the latent-diffusion autoencoder (taming-transformers'
LPIPSWithDiscriminator, without the perceptual loss, whose weights cannot be downloaded here).

The discriminator, its losses and R1 are the GAN trainer's (models.gan, trainers.gan.losses),
wrapped in a DeepSpeed engine of its own by the same make_engine. From `start_step` on, each
step adds lambda * L_adv to the VAE loss, with the adaptive weight

    lambda = clamp(||grad_w L_rec|| / (||grad_w L_adv|| + 1e-4), 0, max_weight) * weight

measured on the weight w of the decoder's last layer and detached, then trains the
discriminator on the batch and its reconstructions.

Why the norms come from a side graph: DeepSpeed hooks the outputs of an engine's forward to
start *its* backward (ZeRO's prologue runs once per forward, on the first gradient that flows
through them); an autograd.grad through those outputs would run it early. So the two norms are
taken through the raw decoder applied again to the same (detached) latents: w reaches the loss
only through the last layer, whose input and output are the same numbers in both graphs, so
grad_w is the same, and the engine's single backward is left alone.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn

from models import DCGANDiscriminator
from trainers.runtime.distributed import DistInfo
from trainers.runtime.engines import make_engine, module_dtype
from trainers.gan.losses import D_LOSSES, G_LOSSES, r1_penalty
from trainers.runtime.guard import all_finite
from trainers.vae.objective import decoder_mean

EPS = 1e-4  # taming-transformers' denominator guard


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_weight: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||grad_w rec_loss|| / (||grad_w adv_loss|| + 1e-4), clamped to [0, max_weight], detached (fp32).

    Both losses must depend on `last_weight`; their graphs are kept (retain_graph) so the caller
    can still backpropagate through them.
    """
    (g_rec,) = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv_loss, last_weight, retain_graph=True)
    ratio = g_rec.float().norm() / (g_adv.float().norm() + EPS)
    return ratio.clamp(0.0, max_weight).detach()


def to_pm1(y_bchw: torch.Tensor, link: str) -> torch.Tensor:
    """Decoder output as the discriminator sees images: in [-1, 1] like the GAN's (fp32)."""
    return decoder_mean(y_bchw, link) * 2.0 - 1.0


class VAEAdversary:
    """The discriminator engine of a VAE run and the two halves of its step."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg = cfg.loss.adversarial
        disc = DCGANDiscriminator(cfg.data.image_size, cfg.data.channels, self.cfg.d_channels)
        self.engine = make_engine(disc, self.cfg.optim, cfg, dist_info, precision)
        self.dtype = module_dtype(self.engine.module)
        self.device = dist_info.device
        self.d_loss_fn, self.g_loss_fn = D_LOSSES[self.cfg.loss], G_LOSSES[self.cfg.loss]

    def active(self, step: int) -> bool:
        """Whether the term is on at this 0-based step (taming's adopt_weight)."""
        return step >= self.cfg.start_step

    def _g_loss(self, fake_pm1: torch.Tensor) -> torch.Tensor:
        return self.g_loss_fn(self.engine.module(fake_pm1.to(self.dtype)))

    def generator_term(self, vae: nn.Module, last_layer: nn.Module, y_bchw: torch.Tensor, z_bz: torch.Tensor,
                       rec_loss_fn, link: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_adv on the engine's graph, lambda): the VAE adds lambda * L_adv to its loss. The
        discriminator must be frozen (see frozen()) so its engine gets no gradient from that loss."""
        g_loss = self._g_loss(to_pm1(y_bchw, link))
        y_side = vae.decode(z_bz.detach())  # the side graph: see the module docstring
        weight = adaptive_weight(rec_loss_fn(y_side), self._g_loss(to_pm1(y_side, link)), last_layer.weight,
                                 self.cfg.max_weight) * self.cfg.weight
        return g_loss, weight

    @contextmanager
    def frozen(self):
        """The discriminator's parameters need no gradient while the VAE trains against it."""
        self.engine.module.requires_grad_(False)
        try:
            yield
        finally:
            self.engine.module.requires_grad_(True)

    def discriminator_step(self, real_pm1: torch.Tensor, fake_pm1: torch.Tensor) -> dict[str, float] | None:
        """One discriminator update on real images and (detached) reconstructions, both in [-1, 1].
        Returns its scalars, or None when its loss was not finite on some rank (step skipped)."""
        m = real_pm1.shape[0]
        logits = self.engine(torch.cat([real_pm1, fake_pm1.detach()]).to(self.dtype)).float()
        real_logits, fake_logits = logits[:m], logits[m:]
        d_loss = self.d_loss_fn(real_logits, fake_logits)
        total, out = d_loss, {}
        if self.cfg.r1_gamma > 0:
            r1 = r1_penalty(self.engine.module, real_pm1)
            total = total + r1 * (self.cfg.r1_gamma / 2)
            out["adv/r1"] = r1.item()
        if not all_finite(self.device, total):
            return None
        self.engine.backward(total)
        self.engine.step()
        out.update({"adv/d_loss": d_loss.item(), "adv/logits_real": real_logits.mean().item(),
                    "adv/logits_fake": fake_logits.mean().item()})
        return out

