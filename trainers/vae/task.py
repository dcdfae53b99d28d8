"""The VAE step: reconstruction NLL + beta(step) * KL, with free bits, posterior diagnostics
and latent interpolations; optionally an adversarial term (trainers.vae.adversarial).

Two architectures: the small convolutional VAE (models.vae, Bernoulli logits out) and diffusers'
AutoencoderKL (models.autoencoder_kl, an image in [-1, 1] out); `decoder_link` says which."""
from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from configs.checks import check_vae
import models
from models import AutoencoderKLVAE
from trainers.runtime.clock import Clock
from trainers.runtime.distributed import DistInfo
from trainers.runtime.engines import make_engine, module_dtype
from trainers.runtime.guard import all_finite
from trainers.runtime.images import make_grid, to_uint8
from trainers.vae.adversarial import VAEAdversary, to_pm1
from trainers.vae.objective import (LIKELIHOODS, active_units, beta_at, kl_per_dim, kl_term, mutual_information,
                                    reconstruction_nll, to_pixels)

INTERP_STEPS = 10
MAX_KL_DIMS_LOGGED = 64  # above this, KL is logged per latent channel (autoencoder_kl), not per dimension


def build_vae(cfg: DictConfig) -> nn.Module:
    """The configured VAE: encode(x in [0, 1]) -> (mean, logvar), decode(z) -> decoder output."""
    check_vae(cfg)  # load_config ran it already; a config built by hand may not have been
    return models.build("vae", cfg.model, cfg.data, learn_scale=cfg.loss.likelihood == "gaussian" and cfg.loss.learn_scale,
                        init_scale=cfg.loss.gaussian_scale)


def decoder_link(cfg: DictConfig) -> str:
    """How the configured VAE's decoder output maps to pixels (trainers.vae.objective.LINKS)."""
    return "pm1" if cfg.model.arch == "autoencoder_kl" else "sigmoid"


def last_decoder_layer(vae: nn.Module) -> nn.Module:
    """The layer whose output is the decoder output: where the adversarial weight is measured."""
    if isinstance(vae, AutoencoderKLVAE):
        return vae.last_decoder_layer
    return vae.decoder[-1]  # ConvVAE: the final transposed convolution gives the logits


def log_scale_of(vae: nn.Module, cfg: DictConfig):
    """The Gaussian decoder's log standard deviation: learned, or the fixed one from the config."""
    learned = getattr(vae, "log_scale", None)
    return learned if learned is not None else math.log(cfg.loss.gaussian_scale)


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


def kl_breakdown(kl_z: torch.Tensor, vae: nn.Module) -> dict[str, float]:
    """Minibatch KL per latent dimension (`kl_dim/NN`); for a large spatial latent (autoencoder_kl),
    per latent channel summed over positions (`kl_channel/N`) instead of hundreds of series."""
    shape = getattr(vae, "latent_shape", None)
    if kl_z.numel() > MAX_KL_DIMS_LOGGED and shape is not None:
        return {f"kl_channel/{c}": v for c, v in enumerate(kl_z.view(shape).flatten(1).sum(1).tolist())}
    return {f"kl_dim/{d:02d}": v for d, v in enumerate(kl_z.tolist())}


class VAETask:
    """Owns the VAE engine (and the discriminator's, with the adversarial term); the shared loop
    calls train_step() and samples()."""

    progress_keys = ("loss", "kl")
    # Switching the adversarial term on in a run that trained without it: its discriminator
    # has nothing to resume from and starts as initialised (the VAE resumes exactly).
    may_start_fresh = ("disc",)

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        self.engine = make_engine(build_vae(cfg), cfg.optim, cfg, dist_info, precision)
        self.engines = {"vae": self.engine}
        self.adversary = VAEAdversary(cfg, dist_info, precision) if cfg.loss.adversarial.enabled else None
        if self.adversary is not None:
            self.engines["disc"] = self.adversary.engine  # checkpointed beside the VAE, resumed exactly
        self.link = decoder_link(cfg)
        self.dtype = module_dtype(self.engine.module)
        self.noise = torch.Generator(device=dist_info.device).manual_seed(cfg.run.seed * 1000 + dist_info.rank)
        fixed = torch.Generator().manual_seed(cfg.run.seed)  # same latents on every rank and resume
        self.fixed_z = torch.randn(64, self.engine.module.latent_dim, generator=fixed).to(dist_info.device)
        self.num_dims = cfg.data.channels * cfg.data.image_size**2
        self._last_batch: torch.Tensor | None = None

    def _recon_nll(self, y_bchw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_nll(y_bchw, x, self.cfg.loss.likelihood, log_scale_of(self.engine.module, self.cfg),
                                  self.link)

    def train_step(self, batch: dict, clock: Clock) -> dict[str, float]:
        loss_cfg = self.cfg.loss
        x = batch["image"].to(self.dist.device, non_blocking=True).float().div_(255.0)
        self._last_batch = x[:16]
        beta = beta_at(clock.step, loss_cfg.beta, loss_cfg.beta_schedule, loss_cfg.beta_warmup_steps,
                       loss_cfg.beta_cycle_steps, loss_cfg.beta_cycle_ramp)
        adversarial = self.adversary is not None and self.adversary.active(clock.step)
        vae = self.engine.module
        out = self.engine(x.to(self.dtype), generator=self.noise)
        nll_b = self._recon_nll(out.logits_bchw, x)
        kl_bz = kl_per_dim(out.mean_bz, out.logvar_bz)
        loss = nll_b.mean() + beta * kl_term(kl_bz, loss_cfg.free_bits)
        scalars: dict[str, float] = {}
        if adversarial:
            with self.adversary.frozen():
                g_loss, weight = self.adversary.generator_term(vae, last_decoder_layer(vae), out.logits_bchw,
                                                               out.z_bz, lambda y: self._recon_nll(y, x).mean(), self.link)
            loss = loss + weight * g_loss
            scalars.update({"adv/g_loss": g_loss.item(), "adv/weight": weight.item()})
        if batch.get("poison"):  # fault injection (trainers.runtime.faults): a real NaN through the real guard
            loss = loss * float("nan")
        if not all_finite(self.dist.device, loss):
            return {"nonfinite_skipped": 1.0}  # no backward, no step: the weights stay as they were
        self.engine.backward(loss)
        self.engine.step()
        if adversarial:
            d_scalars = self.adversary.discriminator_step(x * 2 - 1, to_pm1(out.logits_bchw.detach(), self.link))
            scalars.update(d_scalars if d_scalars is not None else {"nonfinite_skipped": 1.0})

        kl_b = kl_bz.sum(1)
        scalars.update({"loss": loss.item(), "recon_nll": nll_b.mean().item(), "kl": kl_b.mean().item(),
                        "beta": beta, "lr": self.engine.get_lr()[0]})
        if loss_cfg.likelihood in LIKELIHOODS:
            scalars["neg_elbo_nats_per_dim"] = (nll_b + kl_b).mean().item() / self.num_dims
        if getattr(vae, "log_scale", None) is not None:
            scalars["decoder_scale"] = float(vae.log_scale.detach().float().exp())
        if clock.on_every(loss_cfg.diagnostics_every):
            scalars.update(self.diagnostics(out.mean_bz, out.logvar_bz, kl_bz))
        return scalars

    @torch.no_grad()
    def diagnostics(self, mean_bz, logvar_bz, kl_bz) -> dict[str, float]:
        """Posterior health on this batch: KL per dimension, active units, mutual information,
        interpolation smoothness; and the collapse alert."""
        units = active_units(mean_bz)
        out = kl_breakdown(kl_bz.mean(0), self.engine.module)
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
        pairs = min(4, len(mean) // 2)  # an odd batch leaves its last input unpaired
        a, b = mean[0:2 * pairs:2].float(), mean[1:2 * pairs:2].float()
        t = torch.linspace(0, 1, INTERP_STEPS, device=mean.device)
        paths = {"linear": torch.lerp(a.unsqueeze(0), b.unsqueeze(0), t.view(-1, 1, 1)), "slerp": slerp(a, b, t)}
        frames, grids = {}, {}
        for kind, z_tbz in paths.items():
            t_, b_, z = z_tbz.shape
            images = to_pixels(vae.decode(z_tbz.reshape(t_ * b_, z).to(self.dtype)), self.link)
            frames[kind] = images.view(t_, b_, *images.shape[1:])
            rows = frames[kind].transpose(0, 1).flatten(0, 1)  # one path per row
            grids[f"interpolation_{kind}"] = make_grid(to_uint8(rows, (0, 1)), nrow=INTERP_STEPS)
        return grids, frames

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> np.ndarray:
        """n prior samples (decoder means) as uint8 NCHW images (metrics)."""
        vae = self.engine.module
        gen = torch.Generator(device=self.dist.device).manual_seed(seed)
        z = torch.randn(n, vae.latent_dim, generator=gen, device=self.dist.device)
        out = [to_pixels(vae.decode(z[i:i + 250].to(self.dtype)), self.link).float().clamp(0, 1) for i in range(0, n, 250)]
        return (torch.cat(out) * 255).round().to(torch.uint8).cpu().numpy()

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        """Prior samples from fixed latents, reconstructions (input | output), interpolations."""
        vae = self.engine.module
        prior = to_pixels(vae.decode(self.fixed_z.to(self.dtype)), self.link)
        grids = {"samples": make_grid(to_uint8(prior, (0, 1)), nrow=8)}
        if self._last_batch is not None:
            x = self._last_batch
            # The posterior mean, not a sample: grids must not draw from the training noise stream.
            recon = to_pixels(vae.decode(vae.encode(x.to(self.dtype))[0]), self.link)
            pairs = torch.stack([x, recon], 1).flatten(0, 1)
            grids["reconstructions"] = make_grid(to_uint8(pairs, (0, 1)), nrow=8)
            grids.update(self.interpolations()[0])
        return grids

    def state(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        self.noise.set_state(state["noise"])

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"vae.{k}": v for k, v in self.engine.module.state_dict().items()}
        if self.adversary is not None:
            out.update({f"disc.{k}": v for k, v in self.adversary.engine.module.state_dict().items()})
        return out
