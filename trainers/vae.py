"""The VAE step: reconstruction negative log-likelihood + beta * KL(q(z|x) || N(0, I))."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from models import ConvVAE
from trainers.distributed import DistInfo
from trainers.engines import make_engine, module_dtype
from trainers.guard import all_finite
from trainers.images import make_grid, to_uint8

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def reconstruction_nll(logits_bchw: torch.Tensor, x_bchw: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Per-sample negative log-likelihood of x in [0, 1] (summed over pixels), in fp32."""
    logits = logits_bchw.float()
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x_bchw, reduction="none")
    elif likelihood == "gaussian":  # unit variance around sigmoid(logits): a proper density
        per_pixel = 0.5 * (torch.sigmoid(logits) - x_bchw).square() + HALF_LOG_2PI
    else:  # l2: squared error, not a likelihood
        per_pixel = (torch.sigmoid(logits) - x_bchw).square()
    return per_pixel.flatten(1).sum(1)


def kl_to_standard_normal(mean_bz: torch.Tensor, logvar_bz: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per latent dimension, (B, Z), in fp32."""
    mean, logvar = mean_bz.float(), logvar_bz.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


class VAETask:
    """Owns the VAE engine; the shared loop calls train_step() and samples()."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        model = ConvVAE(cfg.data.image_size, cfg.data.channels, cfg.model.latent_dim, cfg.model.base_channels)
        self.engine = make_engine(model, cfg.optim, cfg, dist_info, precision)
        self.engines = {"vae": self.engine}
        self.dtype = module_dtype(self.engine.module)
        self.noise = torch.Generator(device=dist_info.device).manual_seed(cfg.run.seed * 1000 + dist_info.rank)
        fixed = torch.Generator().manual_seed(cfg.run.seed)  # same latents on every rank and resume
        self.fixed_z = torch.randn(64, cfg.model.latent_dim, generator=fixed).to(dist_info.device)
        self.num_dims = cfg.data.channels * cfg.data.image_size**2
        self._last_batch: torch.Tensor | None = None

    def train_step(self, batch: dict) -> dict[str, float]:
        x = batch["image"].to(self.dist.device, non_blocking=True).float().div_(255.0)
        self._last_batch = x[:32]
        out = self.engine(x.to(self.dtype), generator=self.noise)
        nll_b = reconstruction_nll(out.logits_bchw, x, self.cfg.loss.likelihood)
        kl_b = kl_to_standard_normal(out.mean_bz, out.logvar_bz).sum(1)
        loss = (nll_b + self.cfg.loss.beta * kl_b).mean()
        if batch.get("poison"):  # fault injection (trainers.faults): a real NaN through the real guard
            loss = loss * float("nan")
        if not all_finite(self.dist.device, loss):
            return {"nonfinite_skipped": 1.0}  # no backward, no step: the weights stay as they were
        self.engine.backward(loss)
        self.engine.step()
        neg_elbo = (nll_b + kl_b).mean().item()
        return {
            "loss": loss.item(),
            "recon_nll": nll_b.mean().item(),
            "kl": kl_b.mean().item(),
            "neg_elbo_nats_per_dim": neg_elbo / self.num_dims,
            "lr": self.engine.get_lr()[0],
        }

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        """Prior samples from fixed latents, and reconstructions of the last batch (input | output)."""
        vae = self.engine.module
        prior = torch.sigmoid(vae.decode(self.fixed_z.to(self.dtype)).float())
        grids = {"samples": make_grid(to_uint8(prior, (0, 1)), nrow=8)}
        if self._last_batch is not None:
            x = self._last_batch
            # The posterior mean, not a sample: grids must not draw from the training noise stream.
            recon = torch.sigmoid(vae.decode(vae.encode(x.to(self.dtype))[0]).float())
            pairs = torch.stack([x, recon], 1).flatten(0, 1)
            grids["reconstructions"] = make_grid(to_uint8(pairs, (0, 1)), nrow=8)
        return grids

    def state(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        if "noise" in state:
            self.noise.set_state(state["noise"])

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"vae.{k}": v for k, v in self.engine.module.state_dict().items()}
