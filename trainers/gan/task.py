"""The GAN step: n discriminator updates, then one generator update, then the EMA.

G and D are separate DeepSpeed engines with their own AdamW, learning rates and betas (TTUR).
Each engine runs exactly one backward per optimizer step (ZeRO-2 refuses a second one), so D's
real, fake and penalty terms are summed before its backward.

Data per loop step: the loop hands the task one real batch of data.batch_size samples. With
loss.d_steps = n it is split into n equal chunks, one per D update (each against as many fresh
fakes); G then updates once on data.batch_size fresh latents. So a loop step still consumes
exactly one batch, whatever n is, and resuming stays exact.

Penalties (R1, R2, WGAN-GP; trainers.gan.losses) run in fp32 on the first D update of every
k-th step (k = loss.r1_every), scaled by k; D's Adam is built with StyleGAN2's lr*c, beta**c,
c = k/(k+1). Every phase's loss is checked finite on all ranks at once (trainers.runtime.guard) before
its backward; a non-finite D loss skips the rest of the step and is counted.

Diagnostics (trainers.gan.diagnostics): r_t and gradient norms every step; diversity, mode
coverage and the collapse alert every diagnostics.every steps, decided on values agreed by all
ranks (one all-reduce and one broadcast at those steps, on every rank).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from configs.checks import check_gan
from data_shards.stream import batch_to_float
import models
from models.stylegan2 import noise_from
from trainers.gan.augment import diff_augment, parse_ops
from trainers.runtime.clock import Clock
from trainers.runtime.distributed import DistInfo, all_reduce_mean
from trainers.gan.ada import AdaptiveAugment, ada_margins, sign_stats
from trainers.gan.ema import EMA
from trainers.gan.path_length import path_length_penalty
from trainers.gan.sampling import balanced_labels, draw_samples, generator_args
from trainers.runtime.engines import make_engine, module_dtype, step_with_grad_norm
from trainers.gan.diagnostics import (COVERAGE_KEYS, CollapseMonitor, coverage_kind, diversity,
                                      images_to_uint8_nchw, make_coverage_scorer)
from trainers.gan.losses import (D_LOSSES, G_LOSSES, RELATIVISTIC_G_LOSSES, lazy_adam_compensation, mode_seeking_loss,
                                 r1_penalty, r2_penalty, wgan_gp_penalty)
from trainers.runtime.guard import all_finite
from trainers.runtime.images import make_grid, scatter_plot, to_uint8


def build_networks(cfg: DictConfig):
    """Generator and discriminator of `model.arch` for the config's data (models.registry)."""
    return models.build("gan", cfg.model, cfg.data)


def penalties_on(loss_cfg: DictConfig) -> bool:
    return loss_cfg.r1_gamma > 0 or loss_cfg.r2_gamma > 0 or loss_cfg.gp_gamma > 0


def d_optim_config(cfg: DictConfig) -> DictConfig:
    """optim.d, with StyleGAN2's lazy-regularisation compensation applied where it is due."""
    d = OmegaConf.create(OmegaConf.to_container(cfg.optim.d, resolve=True))
    if cfg.loss.lazy_compensation and penalties_on(cfg.loss) and cfg.loss.r1_every > 1:
        d.lr, betas = lazy_adam_compensation(d.lr, tuple(d.betas), cfg.loss.r1_every)
        d.betas = list(betas)
    return d


def lr_factor(optim_cfg: DictConfig, step: int, max_steps: int) -> float:
    """The multiplier of both learning rates for 0-based step `step` (optim.lr_decay).

    A function of the step alone, so a resumed run sets exactly the rates the uninterrupted
    one would have (the rates saved in the optimizer state are overwritten every step)."""
    kind = optim_cfg.lr_decay
    start = optim_cfg.lr_decay_start * max_steps
    if kind == "none" or step < start:
        return 1.0
    u = min(1.0, (step - start) / max(max_steps - start, 1e-9))
    shape = 1.0 - u if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * u))
    return optim_cfg.lr_decay_final + (1.0 - optim_cfg.lr_decay_final) * shape


class _StepState:
    """What the phases of one step share: its real batch, its clock and the scalars so far."""

    def __init__(self, real: torch.Tensor, labels: torch.Tensor | None, clock: Clock, poison: bool):
        self.real, self.labels, self.clock = real, labels, clock  # labels: None unless conditional
        self.poison = poison  # fault injection (trainers.runtime.faults): make D's loss a real NaN
        self.metrics: dict[str, float] = {}
        self.fake: torch.Tensor | None = None  # the G phase's samples, for the diagnostics


@dataclass(frozen=True)
class Phase:
    """One part of a GAN step (StyleGAN2-ADA's training loop reads as such a list).

    ``run`` returns False to end the step there (its scalars are then dropped and the step is
    counted as skipped); ``every`` runs it on every k-th step only (0: never)."""

    name: str
    run: Callable[[_StepState], bool]
    every: int = 1


class GANTask:
    """Owns the G and D engines, the generator EMA and the collapse diagnostics."""

    may_start_fresh: tuple[str, ...] = ()
    progress_keys = ("d_loss", "g_loss")

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        check_gan(cfg)  # load_config ran it already; a config built by hand may not have been
        self.augment_ops = parse_ops(cfg.loss.augment)
        generator, discriminator = build_networks(cfg)
        self.g = make_engine(generator, cfg.optim.g, cfg, dist_info, precision)
        d_optim = d_optim_config(cfg)
        self.d = make_engine(discriminator, d_optim, cfg, dist_info, precision)
        self.engines = {"g": self.g, "d": self.d}
        self.base_lr = {"g": float(cfg.optim.g.lr), "d": float(d_optim.lr)}
        self.g_dtype, self.d_dtype = module_dtype(self.g.module), module_dtype(self.d.module)
        self.d_loss_fn = D_LOSSES[cfg.loss.loss]
        self.g_loss_fn = G_LOSSES.get(cfg.loss.loss)  # None: relativistic (G's loss reads D on real data too)
        self.g_rel_loss_fn = RELATIVISTIC_G_LOSSES.get(cfg.loss.loss)
        self.ema = EMA(self.g.module, cfg.loss.ema_halflife_kimg, cfg.loss.ema_rampup) \
            if cfg.loss.ema_halflife_kimg > 0 else None
        self.noise = torch.Generator(device=dist_info.device).manual_seed(cfg.run.seed * 1000 + dist_info.rank)
        if hasattr(self.g.module, "noise_generator"):  # StyleGAN2's per-layer noise: from the saved stream
            self.g.module.noise_generator = self.noise  # (the EMA copy, made above, samples from torch's own)
        fixed = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_z = torch.randn(64 if m_is_image(cfg) else 2500, cfg.model.z_dim, generator=fixed).to(dist_info.device)
        self.num_classes = int(cfg.model.num_classes)  # 0: unconditional
        self.fixed_c = grid_labels(self.num_classes, len(self.fixed_z), dist_info.device)
        diag = cfg.diagnostics
        self.coverage_kind = coverage_kind(cfg) if diag.every > 0 else None
        self._scorer = None  # fitted on rank 0 at the first diagnostic
        self.monitor = CollapseMonitor(diag.alert_min_coverage, diag.alert_min_diversity, diag.alert_after_steps,
                                       diag.alert_patience, dist_info.is_main)
        loss = cfg.loss
        self.ada = AdaptiveAugment.from_config(loss)
        self._signs = None  # this step's [sum of sign(D(real)), count], for ADA
        self.pl_mean = torch.zeros((), device=dist_info.device)  # path length's running mean (StyleGAN2)
        self.phases = [
            Phase("D", self.d_phase),
            Phase("ADA", self.ada_phase, every=1 if self.ada is not None else 0),
            Phase("G", self.g_phase),
            Phase("G path length", self.g_path_length_phase, every=loss.pl_every if loss.pl_weight > 0 else 0),
            Phase("EMA", self.ema_phase),
            Phase("diagnostics", self.diagnostics_phase, every=diag.every),
        ]

    def train_step(self, batch: dict, clock: Clock) -> dict[str, float]:
        """The phases in order: n D updates (penalties riding in D's backward), G, EMA, diagnostics."""
        if self.cfg.optim.lr_decay != "none":
            self._set_lrs(clock.step)
        state = _StepState(self._real(batch), self._labels(batch), clock, poison=bool(batch.get("poison")))
        for phase in self.phases:
            if clock.on_every(phase.every) and not phase.run(state):
                return {"nonfinite_skipped": 1.0}
        state.metrics.update({"lr_g": self.g.get_lr()[0], "lr_d": self.d.get_lr()[0]})
        return state.metrics

    def d_phase(self, state: _StepState) -> bool:
        """loss.d_steps updates of D, each on its own chunk of the real batch against as many fresh fakes.

        Each is one backward over real + fake (+ the lazy penalties on the first): ZeRO-2 allows one."""
        loss_cfg, metrics = self.cfg.loss, state.metrics
        self._signs = None
        regularise = penalties_on(loss_cfg) and state.clock.on_every(loss_cfg.r1_every)
        sums = {"d_loss": 0.0, "d_real_logit": 0.0, "d_fake_logit": 0.0, "d_rt": 0.0}
        chunks = state.real.chunk(loss_cfg.d_steps)
        label_chunks = state.labels.chunk(loss_cfg.d_steps) if state.labels is not None else [None] * len(chunks)
        for i, (real, labels) in enumerate(zip(chunks, label_chunks)):
            last = i == loss_cfg.d_steps - 1
            values = self._d_update(real, labels, regularise and i == 0, measure=last, poison=state.poison)
            if values is None:
                return False  # G would train against a broken D
            for key in sums:
                sums[key] += values.pop(key)
            metrics.update(values)
        metrics.update({k: v / loss_cfg.d_steps for k, v in sums.items()})
        return True

    def _d_update(self, real: torch.Tensor, labels: torch.Tensor | None, regularise: bool, measure: bool,
                  poison: bool) -> dict | None:
        """One D update; its scalars, or None when its loss was not finite on some rank."""
        m = real.shape[0]
        z, fake_labels = self._z(m), self._fake_labels(m, labels)
        with torch.no_grad():
            fake = self.g.module(*self._g_args(z, fake_labels)).float()
        real_in, fake_in = self._aug(real), self._aug(fake)
        both = torch.cat([real_in, fake_in]).to(self.d_dtype)
        logits = (self.d(both) if labels is None else self.d(both, torch.cat([labels, fake_labels]))).float()
        real_logits, fake_logits = logits[:m], logits[m:]
        margins = ada_margins(real_logits, fake_logits, relativistic=self.g_rel_loss_fn is not None)
        if self.ada is not None:
            signs = sign_stats(margins)
            self._signs = signs if self._signs is None else self._signs + signs
        d_loss = self.d_loss_fn(real_logits, fake_logits)
        total, values = d_loss, {}
        if poison:  # a real NaN through the real guard
            total = total * float("nan")
        if regularise:
            penalty, penalties = self._d_penalties(real_in, fake_in, labels, fake_labels)
            total = total + penalty
            values.update({k: v.item() for k, v in penalties.items()})
        if not all_finite(self.dist.device, total):
            return None
        self.d.backward(total)
        norm = step_with_grad_norm(self.d, measure=measure)  # only the last D update's is logged
        if norm is not None:
            values["grad_norm_d"] = norm
        values.update({"d_loss": d_loss.item(), "d_real_logit": real_logits.mean().item(),
                       "d_fake_logit": fake_logits.mean().item(),
                       "d_rt": margins.sign().mean().item()})  # ADA's r_t, E[sign(D(real))] (or of the pair margin)
        return values

    def g_phase(self, state: _StepState) -> bool:
        """One G update on data.batch_size fresh latents, D frozen so its engine sees no gradients.

        A non-finite G loss skips G's update only (counted); the step goes on to the EMA."""
        self.d.module.requires_grad_(False)
        try:
            n = state.real.shape[0]
            # fake i pairs with real partner[i]; mode seeking gives samples i and i + n/2 one class
            seek = float(self.cfg.loss.mode_seeking)
            partner = torch.arange(n, device=state.real.device)
            if seek > 0 and self.num_classes:
                partner = torch.cat([partner[: n // 2], partner[: n - n // 2]])
            z, fake_labels = self._z(n), self._fake_labels(n, state.labels)
            if fake_labels is not None:
                fake_labels = fake_labels[partner]
            fake = self.g(*self._g_args(z, fake_labels))
            fake_logits = self.d.module(*self._d_args(self._aug(fake.float()), fake_labels))
            if self.g_rel_loss_fn is None:
                g_loss = self.g_loss_fn(fake_logits)
            else:
                with torch.no_grad():
                    real_logits = self.d.module(*self._d_args(self._aug(state.real), state.labels))
                if self.cfg.loss.class_matched_pairs:
                    real_logits = real_logits[partner]
                g_loss = self.g_rel_loss_fn(fake_logits, real_logits)
            if seek > 0:
                seeking, ratio = mode_seeking_loss(fake, z)
                g_loss = g_loss + seek * seeking
                state.metrics["mode_seeking_ratio"] = ratio.item()
            g_ok = all_finite(self.dist.device, g_loss)
            if g_ok:
                self.g.backward(g_loss)
                g_norm = step_with_grad_norm(self.g)
        finally:
            self.d.module.requires_grad_(True)
        state.fake = fake.detach()
        if not g_ok:
            state.metrics["nonfinite_skipped"] = 1.0
            return True
        state.metrics["g_loss"] = g_loss.item()
        if g_norm is not None:
            state.metrics["grad_norm_g"] = g_norm
        return True

    def ada_phase(self, state: _StepState) -> bool:
        """ADA's controller: every rank adds this step's all-reduced sign(D(real)); p moves every
        loss.ada_interval steps toward r_t = loss.ada_target."""
        signs, self._signs = self._signs, None
        if self.dist.world_size > 1:
            dist.all_reduce(signs)
        self.ada.accumulate(float(signs[0]), float(signs[1]), images=state.clock.images_per_step)
        state.metrics["ada/p"] = self.ada.p
        if self.ada.rt is not None:
            state.metrics["ada/rt"] = self.ada.rt
        return True

    def g_path_length_phase(self, state: _StepState) -> bool:
        """StyleGAN2's lazy path-length regularisation: its own G update on half the batch, scaled
        by the interval; a non-finite penalty skips it (counted)."""
        loss = self.cfg.loss
        n = max(1, state.real.shape[0] // 2)
        z, labels = self._z(n), self._fake_labels(n)
        penalty, new_mean = path_length_penalty(self.g.module, *self._g_args(z, labels), self.pl_mean,
                                                generator=self.noise)
        if not all_finite(self.dist.device, penalty):
            state.metrics["nonfinite_skipped"] = 1.0
            return True
        self.g.backward(penalty * (loss.pl_weight * loss.pl_every))
        self.g.step()
        self.pl_mean = torch.tensor(all_reduce_mean({"m": float(new_mean)}, self.dist.device)["m"],
                                    device=self.dist.device)  # every rank keeps the same mean
        state.metrics["pl_penalty"] = penalty.item()
        return True

    def ema_phase(self, state: _StepState) -> bool:
        if self.ema is not None:
            # StyleGAN2-ADA counts the images seen *before* this step in the ramp-up.
            self.ema.update(self.g.module, state.clock.images_per_step, state.clock.images_seen)
        return True

    def diagnostics_phase(self, state: _StepState) -> bool:
        state.metrics.update(self.diagnostics(state.fake, state.real, state.clock.step_number))
        return True

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, generator=self.noise, device=self.dist.device)

    def _fake_labels(self, n: int, real_labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """Classes for n generated samples: uniform, or with loss.class_matched_pairs the classes of
        the real images they are paired with (conditional only: an unconditional run draws nothing)."""
        if not self.num_classes:
            return None
        if self.cfg.loss.class_matched_pairs and real_labels is not None:
            return real_labels
        return torch.randint(self.num_classes, (n,), generator=self.noise, device=self.dist.device)

    def _labels(self, batch: dict) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.as_tensor(batch["label"], dtype=torch.int64).to(self.dist.device)

    def _g_args(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        return generator_args(self.g.module, z, labels)

    def _d_args(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        x = x.to(self.d_dtype)
        return (x,) if labels is None else (x, labels)

    def _real(self, batch: dict) -> torch.Tensor:
        if "points" in batch:
            return batch["points"].to(self.dist.device).float()
        return batch_to_float(batch["image"].to(self.dist.device, non_blocking=True))

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        """Every image D sees: ADA's pipeline at its current p, or DiffAugment's fixed ops, or none."""
        if self.ada is not None:
            return self.ada(x, self.noise)
        return diff_augment(x, self.augment_ops, self.noise) if self.augment_ops else x

    def _d_penalties(self, real: torch.Tensor, fake: torch.Tensor, real_labels: torch.Tensor | None,
                     fake_labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the enabled penalties (fp32, scaled by the lazy interval) and their values."""
        loss, k = self.cfg.loss, self.cfg.loss.r1_every
        total, values = torch.zeros((), device=real.device), {}
        if loss.r1_gamma > 0:
            r1 = r1_penalty(self.d.module, real, real_labels)
            total = total + r1 * (loss.r1_gamma / 2 * k)
            values["r1"] = r1
        if loss.r2_gamma > 0:
            r2 = r2_penalty(self.d.module, fake, fake_labels)
            total = total + r2 * (loss.r2_gamma / 2 * k)
            values["r2"] = r2
        if loss.gp_gamma > 0:
            gp = wgan_gp_penalty(self.d.module, real, fake, self.noise, real_labels)
            total = total + gp * (loss.gp_gamma * k)
            values["gp"] = gp
        return total, values

    def _set_lrs(self, step: int) -> None:
        f = lr_factor(self.cfg.optim, step, self.cfg.trainer.max_steps)
        for name, engine in self.engines.items():
            for group in engine.optimizer.param_groups:
                group["lr"] = self.base_lr[name] * f

    @torch.no_grad()
    def diagnostics(self, fake: torch.Tensor, real: torch.Tensor, step_number: int) -> dict[str, float]:
        """Diversity, mode coverage and the collapse decision; collectives, so every rank calls it."""
        diag, start = self.cfg.diagnostics, time.perf_counter()
        values = diversity(fake, real, diag.near_duplicate)
        values = all_reduce_mean(values, self.dist.device)  # every rank decides on the same numbers
        if self.coverage_kind is not None:
            keys = COVERAGE_KEYS[self.coverage_kind]
            local = torch.zeros(len(keys), dtype=torch.float64, device=self.dist.device)
            if self.dist.is_main:
                if self._scorer is None:
                    self._scorer = make_coverage_scorer(self.cfg, self.coverage_kind)
                scores = self._scorer.score(self._coverage_samples())
                local = torch.tensor([scores[k] for k in keys], dtype=torch.float64, device=self.dist.device)
            if self.dist.world_size > 1:
                dist.broadcast(local, src=0)
            values.update({f"diag/{k}": v for k, v in zip(keys, local.tolist())})
        values["alert/collapse"] = self.monitor.update(step_number, values, self.cfg.run.name)
        values["diag/seconds"] = time.perf_counter() - start  # what the diagnostics cost (rank mean)
        return values

    def _coverage_samples(self) -> np.ndarray:
        """Samples from the sampler (EMA where there is one: what `gentrain sample` will give)."""
        n = self.cfg.diagnostics.num_samples or (500 if m_is_image(self.cfg) else 2500)
        gen = torch.Generator(device=self.dist.device).manual_seed(self.cfg.run.seed + 17)
        x = draw_samples(self.sampler, n, self.cfg.model.z_dim, gen,
                         balanced_labels(n, self.num_classes, self.dist.device))
        return images_to_uint8_nchw(x) if m_is_image(self.cfg) else x.cpu().numpy()

    def generate(self, n: int, seed: int) -> np.ndarray:
        """n samples of the sampler as uint8 NCHW images, every class equally often (metrics)."""
        gen = torch.Generator(device=self.dist.device).manual_seed(seed)
        labels = balanced_labels(n, self.num_classes, self.dist.device)
        # 250 a batch: drawn beside the training state, on a GPU too
        return images_to_uint8_nchw(draw_samples(self.sampler, n, self.cfg.model.z_dim, gen, labels, batch=250))

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator used for samples: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.g.module

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        # StyleGAN2's noise: the same draw in every grid (as fixed_z), and never the training stream.
        with noise_from(self.sampler, torch.Generator(device=self.dist.device).manual_seed(self.cfg.run.seed)):
            out = self.sampler(*generator_args(self.sampler, self.fixed_z, self.fixed_c)).float()
        if not m_is_image(self.cfg):
            return {"samples": scatter_plot(out.cpu().numpy())}
        return {"samples": make_grid(to_uint8(out), nrow=8)}

    def state(self) -> dict:
        out = {"noise": self.noise.get_state(), "pl_mean": self.pl_mean.cpu()}
        if self.ada is not None:
            out["ada"] = self.ada.state()
        return out

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        self.noise.set_state(state["noise"])
        if "pl_mean" in state:
            self.pl_mean = state["pl_mean"].to(self.dist.device)
        if self.ada is not None and "ada" in state:
            self.ada.load_state(state["ada"])
        if self.ema is not None:
            self.ema.module.load_state_dict({k[len("g_ema."):]: v for k, v in weights.items() if k.startswith("g_ema.")})

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"g.{k}": v for k, v in self.g.module.state_dict().items()}
        out.update({f"d.{k}": v for k, v in self.d.module.state_dict().items()})
        if self.ema is not None:
            out.update({f"g_ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        return out


def grid_labels(num_classes: int, n: int, device) -> torch.Tensor | None:
    """Labels of the fixed sample grid: one row of 8 per class (the first n // 8 classes), or None."""
    if not num_classes:
        return None
    return (torch.arange(n, device=device) // 8) % num_classes


def m_is_image(cfg: DictConfig) -> bool:
    return cfg.model.arch != "mlp"
