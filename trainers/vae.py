"""The VAE step: reconstruction NLL + beta(step) * KL, with free bits, posterior diagnostics
and latent interpolations."""
from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig

from models import ConvVAE
from trainers.distributed import DistInfo
from trainers.engines import make_engine, module_dtype
from trainers.guard import all_finite
from trainers.images import make_grid, to_uint8
from trainers.vae_objective import (LIKELIHOODS, active_units, beta_at, kl_per_dim, kl_term, mutual_information,
                                    reconstruction_nll)

INTERP_STEPS = 10


def build_vae(cfg: DictConfig) -> ConvVAE:
    return ConvVAE(cfg.data.image_size, cfg.data.channels, cfg.model.latent_dim, cfg.model.base_channels,
                   learn_scale=cfg.loss.likelihood == "gaussian" and cfg.loss.learn_scale,
                   init_scale=cfg.loss.gaussian_scale)


def log_scale_of(vae: ConvVAE, cfg: DictConfig):
    """The Gaussian decoder's log standard deviation: learned, or the fixed one from the config."""
    return vae.log_scale if vae.log_scale is not None else math.log(cfg.loss.gaussian_scale)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (T,) -> (T, B, Z)."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((a_n * b_n).sum(-1).clamp(-1 + 1e-7, 1 - 1e-7))  # (B,)
    t = t.view(-1, 1)
    return (torch.sin((1 - t) * omega).unsqueeze(-1) * a + torch.sin(t * omega).unsqueeze(-1) * b) / torch.sin(omega).unsqueeze(-1)


def interpolation_smoothness(frames_tbchw: torch.Tensor) -> float:
    """How evenly decoded images change along a path: coefficient of variation of the distances
    between consecutive frames (0 = perfectly even steps), averaged over paths."""
    steps = (frames_tbchw[1:] - frames_tbchw[:-1]).flatten(2).norm(dim=-1)  # (T-1, B)
    return float((steps.std(0) / steps.mean(0).clamp(min=1e-8)).mean())


class VAETask:
    """Owns the VAE engine; the shared loop calls train_step() and samples()."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        self.engine = make_engine(build_vae(cfg), cfg.optim, cfg, dist_info, precision)
        self.engines = {"vae": self.engine}
        self.dtype = module_dtype(self.engine.module)
        self.noise = torch.Generator(device=dist_info.device).manual_seed(cfg.run.seed * 1000 + dist_info.rank)
        fixed = torch.Generator().manual_seed(cfg.run.seed)  # same latents on every rank and resume
        self.fixed_z = torch.randn(64, cfg.model.latent_dim, generator=fixed).to(dist_info.device)
        self.num_dims = cfg.data.channels * cfg.data.image_size**2
        self.num_steps = 0
        self._last_batch: torch.Tensor | None = None

    def train_step(self, batch: dict) -> dict[str, float]:
        loss_cfg = self.cfg.loss
        x = batch["image"].to(self.dist.device, non_blocking=True).float().div_(255.0)
        self._last_batch = x[:16]
        beta = beta_at(self.num_steps, loss_cfg.beta, loss_cfg.beta_schedule, loss_cfg.beta_warmup_steps,
                       loss_cfg.beta_cycle_steps, loss_cfg.beta_cycle_ramp)
        self.num_steps += 1
        vae = self.engine.module
        out = self.engine(x.to(self.dtype), generator=self.noise)
        nll_b = reconstruction_nll(out.logits_bchw, x, loss_cfg.likelihood, log_scale_of(vae, self.cfg))
        kl_bz = kl_per_dim(out.mean_bz, out.logvar_bz)
        loss = nll_b.mean() + beta * kl_term(kl_bz, loss_cfg.free_bits)
        if batch.get("poison"):  # fault injection (trainers.faults): a real NaN through the real guard
            loss = loss * float("nan")
        if not all_finite(self.dist.device, loss):
            return {"nonfinite_skipped": 1.0}  # no backward, no step: the weights stay as they were
        self.engine.backward(loss)
        self.engine.step()

        kl_b = kl_bz.sum(1)
        scalars = {"loss": loss.item(), "recon_nll": nll_b.mean().item(), "kl": kl_b.mean().item(),
                   "beta": beta, "lr": self.engine.get_lr()[0]}
        if loss_cfg.likelihood in LIKELIHOODS:
            scalars["neg_elbo_nats_per_dim"] = (nll_b + kl_b).mean().item() / self.num_dims
        if vae.log_scale is not None:
            scalars["decoder_scale"] = float(vae.log_scale.detach().float().exp())
        if self.num_steps % loss_cfg.diagnostics_every == 0:
            scalars.update(self.diagnostics(out.mean_bz, out.logvar_bz, kl_bz))
        return scalars

    @torch.no_grad()
    def diagnostics(self, mean_bz, logvar_bz, kl_bz) -> dict[str, float]:
        """Posterior health on this batch: KL per dimension, active units, mutual information,
        interpolation smoothness; and the collapse alert."""
        units = active_units(mean_bz)
        out = {f"kl_dim/{d:02d}": v for d, v in enumerate(kl_bz.mean(0).tolist())}
        out.update({"active_units": units, "mutual_info": mutual_information(mean_bz, logvar_bz, self.noise)})
        _, frames = self.interpolations()
        out.update({f"interp/smoothness_cv_{kind}": interpolation_smoothness(f) for kind, f in frames.items()})
        out["alert/posterior_collapse"] = float(units <= self.cfg.loss.collapse_active_units)
        return out

    @torch.no_grad()
    def interpolations(self) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Linear and spherical paths between the posterior means of pairs of recent inputs."""
        vae = self.engine.module
        x = self._last_batch
        mean, _ = vae.encode(x.to(self.dtype))
        a, b = mean[0::2][:4].float(), mean[1::2][:4].float()
        t = torch.linspace(0, 1, INTERP_STEPS, device=mean.device)
        paths = {"linear": torch.lerp(a.unsqueeze(0), b.unsqueeze(0), t.view(-1, 1, 1)), "slerp": slerp(a, b, t)}
        frames, grids = {}, {}
        for kind, z_tbz in paths.items():
            t_, b_, z = z_tbz.shape
            images = torch.sigmoid(vae.decode(z_tbz.reshape(t_ * b_, z).to(self.dtype)).float())
            frames[kind] = images.view(t_, b_, *images.shape[1:])
            rows = frames[kind].transpose(0, 1).flatten(0, 1)  # one path per row
            grids[f"interpolation_{kind}"] = make_grid(to_uint8(rows, (0, 1)), nrow=INTERP_STEPS)
        return grids, frames

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        """Prior samples from fixed latents, reconstructions (input | output), interpolations."""
        vae = self.engine.module
        prior = torch.sigmoid(vae.decode(self.fixed_z.to(self.dtype)).float())
        grids = {"samples": make_grid(to_uint8(prior, (0, 1)), nrow=8)}
        if self._last_batch is not None:
            x = self._last_batch
            # The posterior mean, not a sample: grids must not draw from the training noise stream.
            recon = torch.sigmoid(vae.decode(vae.encode(x.to(self.dtype))[0]).float())
            pairs = torch.stack([x, recon], 1).flatten(0, 1)
            grids["reconstructions"] = make_grid(to_uint8(pairs, (0, 1)), nrow=8)
            grids.update(self.interpolations()[0])
        return grids

    def state(self) -> dict:
        return {"noise": self.noise.get_state(), "num_steps": self.num_steps}

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        self.noise.set_state(state["noise"])
        self.num_steps = int(state.get("num_steps", 0))

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"vae.{k}": v for k, v in self.engine.module.state_dict().items()}
