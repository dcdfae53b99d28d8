"""The paired image-to-image step: G's forward, D's update, G's update, then the EMA.

Batches hold `image` (the targets) and `source` (the inputs, `model.scale` times smaller),
uint8 [B,C,H,W] each, plus `label` when the shards have one (unused). G maps the input to
an image; its loss is

    l1_weight * mean|G(x) - y|  +  adv_weight * adversarial(D(G(x), x))  (+ feature_weight * mean|f(G(x)) - f(y)|)

with D conditioned on the input (pix2pix) or not (ESRGAN), the adversarial loss nonsaturating,
hinge or relativistic average (trainers.paired.losses). As in pix2pix's own loop, one G forward
per step serves both updates: D trains on real pairs vs the detached fakes, then G's loss reads
the just-updated D.

G and D are separate DeepSpeed engines with their own AdamW (optim.g, optim.d). Each engine
runs exactly one backward per step (ZeRO-2 refuses a second), so D's real, fake and R1 terms
are summed before its backward; R1 is lazy (every loss.r1_every steps, scaled by it, with
StyleGAN2's Adam compensation), in fp32, on the raw module with the input as D's condition.
Every loss is checked finite on all ranks at once (trainers.runtime.guard) before its backward;
a non-finite one ends the step, which is counted as skipped.

adv_weight = 0 is the pixel-only baseline: D is not built into an engine, not trained and not
checkpointed ("d" is in may_start_fresh, so a pixel-only checkpoint can start a GAN fine-tune,
ESRGAN's recipe). Before loss.adv_start_step, D exists but neither trains nor enters G's loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import models
from configs import ConfigError
from configs.checks import check_paired
from data_shards.stream import batch_to_float
from trainers.gan.ema import EMA
from trainers.gan.losses import lazy_adam_compensation, r1_penalty
from trainers.gan.task import Phase, lr_factor
from trainers.paired.losses import ADV_LOSSES, NEEDS_REAL_LOGITS
from trainers.runtime.clock import Clock
from trainers.runtime.distributed import DistInfo
from trainers.runtime.engines import make_engine, module_dtype, step_with_grad_norm
from trainers.runtime.guard import all_finite
from trainers.runtime.images import make_grid, to_uint8

GRID_SAMPLES = 8  # columns of the sample grid: rows are input | output | target


def build_networks(cfg: DictConfig):
    """(generator, discriminator) of `model.arch` for the config's data (models.registry, family "paired")."""
    return models.build("paired", cfg.model, cfg.data)


def d_optim_config(cfg: DictConfig) -> DictConfig:
    """optim.d, with StyleGAN2's lazy-regularisation compensation where R1 runs every k > 1 steps."""
    d = OmegaConf.create(OmegaConf.to_container(cfg.optim.d, resolve=True))
    loss = cfg.loss
    if loss.lazy_compensation and loss.r1_gamma > 0 and loss.r1_every > 1:
        d.lr, betas = lazy_adam_compensation(d.lr, tuple(d.betas), loss.r1_every)
        d.betas = list(betas)
    return d


class _StepState:
    """What the phases of one step share."""

    def __init__(self, target: torch.Tensor, source: torch.Tensor, clock: Clock, poison: bool):
        self.target, self.source, self.clock = target, source, clock  # fp32 in [-1, 1]
        self.poison = poison  # fault injection (trainers.runtime.faults): make a loss a real NaN
        self.fake: torch.Tensor | None = None  # G(source), with its graph
        self.metrics: dict[str, float] = {}


class PairedTask:
    """Owns the G (and, with an adversarial term, D) engines and the generator EMA."""

    may_start_fresh: tuple[str, ...] = ("d",)  # a pixel-only checkpoint (no D) may start a GAN fine-tune
    progress_keys = ("l1", "g_adv", "d_loss")

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, precision: str):
        self.cfg, self.dist = cfg, dist_info
        check_paired(cfg)  # load_config ran it already; a config built by hand may not have been
        loss = cfg.loss
        generator, discriminator = build_networks(cfg)  # both always built: G's init does not depend on D's use
        self.scale = int(cfg.model.scale)
        self.g = make_engine(generator, cfg.optim.g, cfg, dist_info, precision)
        self.engines = {"g": self.g}
        self.base_lr = {"g": float(cfg.optim.g.lr)}
        self.adversarial = loss.adv_weight > 0
        self.d = None
        if self.adversarial:
            d_optim = d_optim_config(cfg)
            self.d = make_engine(discriminator, d_optim, cfg, dist_info, precision)
            self.engines["d"] = self.d
            self.base_lr["d"] = float(d_optim.lr)
            self.d_dtype = module_dtype(self.d.module)
        self.g_dtype = module_dtype(self.g.module)
        self.d_loss_fn, self.g_loss_fn = ADV_LOSSES[loss.adv_loss]
        self.ema = EMA(self.g.module, loss.ema_halflife_kimg, loss.ema_rampup) if loss.ema_halflife_kimg > 0 else None
        self.features = self._feature_net() if loss.feature_weight > 0 else None
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (source, target) uint8 of the sample grid
        self.phases = [
            Phase("G forward", self.forward_phase),
            Phase("D", self.d_phase),
            Phase("G", self.g_phase),
            Phase("EMA", self.ema_phase),
        ]

    # ---- the step ------------------------------------------------------------------------------
    def train_step(self, batch: dict, clock: Clock) -> dict[str, float]:
        """The phases in order: G forward, D update (real + fake + lazy R1 in one backward), G update, EMA."""
        if self.cfg.optim.lr_decay != "none":
            self._set_lrs(clock.step)
        target, source = self._pair(batch)
        if self.fixed is None:
            self.fixed = (batch["source"][:GRID_SAMPLES].contiguous().clone(),
                          batch["image"][:GRID_SAMPLES].contiguous().clone())
        state = _StepState(target, source, clock, poison=bool(batch.get("poison")))
        for phase in self.phases:
            if clock.on_every(phase.every) and not phase.run(state):
                return {"nonfinite_skipped": 1.0}
        state.metrics["lr_g"] = self.g.get_lr()[0]
        if self.d is not None:
            state.metrics["lr_d"] = self.d.get_lr()[0]
        return state.metrics

    def adversarial_on(self, clock: Clock) -> bool:
        return self.adversarial and clock.step >= self.cfg.loss.adv_start_step

    def forward_phase(self, state: _StepState) -> bool:
        """G(input) through G's engine, kept with its graph for the G update."""
        state.fake = self.g(state.source.to(self.g_dtype))
        return True

    def d_phase(self, state: _StepState) -> bool:
        """One D update on real pairs vs the detached fakes (+ lazy R1 on the real ones): one backward."""
        if not self.adversarial_on(state.clock):
            return True
        loss, real, source = self.cfg.loss, state.target, state.source
        m = real.shape[0]
        images = torch.cat([real, state.fake.detach().float()]).to(self.d_dtype)
        sources = torch.cat([source, source]).to(self.d_dtype)
        logits = self.d(images, sources).float()
        real_logits, fake_logits = logits[:m], logits[m:]
        d_loss = self.d_loss_fn(real_logits, fake_logits)
        total = d_loss * float("nan") if state.poison else d_loss
        values = {}
        if loss.r1_gamma > 0 and state.clock.on_every(loss.r1_every):
            r1 = r1_penalty(self.d.module, real, source)  # D(image, input): the input rides along as D's condition
            total = total + r1 * (loss.r1_gamma / 2 * loss.r1_every)
            values["r1"] = r1.item()
        if not all_finite(self.dist.device, total):
            return False  # G would train against a broken D
        self.d.backward(total)
        norm = step_with_grad_norm(self.d)
        if norm is not None:
            values["grad_norm_d"] = norm
        values.update({"d_loss": d_loss.item(), "d_real_logit": real_logits.mean().item(),
                       "d_fake_logit": fake_logits.mean().item()})
        state.metrics.update(values)
        return True

    def g_phase(self, state: _StepState) -> bool:
        """One G update: weighted L1 (+ the adversarial term against the frozen D, + the feature loss)."""
        loss, real, source = self.cfg.loss, state.target, state.source
        fake = state.fake.float()
        l1 = (fake - real).abs().mean()
        total, values = l1 * loss.l1_weight, {"l1": l1.item()}
        adversarial = self.adversarial_on(state.clock)
        if adversarial:
            self.d.module.requires_grad_(False)
            try:
                fake_logits = self.d.module(fake.to(self.d_dtype), source.to(self.d_dtype)).float()
                real_logits = None
                if loss.adv_loss in NEEDS_REAL_LOGITS:
                    with torch.no_grad():
                        real_logits = self.d.module(real.to(self.d_dtype), source.to(self.d_dtype)).float()
                g_adv = self.g_loss_fn(fake_logits, real_logits)
            finally:
                self.d.module.requires_grad_(True)
            total = total + g_adv * loss.adv_weight
            values["g_adv"] = g_adv.item()
        if self.features is not None:
            feat = self._feature_loss(fake, real)
            total = total + feat * loss.feature_weight
            values["feature"] = feat.item()
        if state.poison and not adversarial:  # no D phase to carry the fault: G's loss does
            total = total * float("nan")
        if not all_finite(self.dist.device, total):
            return False
        self.g.backward(total)
        norm = step_with_grad_norm(self.g)
        if norm is not None:
            values["grad_norm_g"] = norm
        values["g_loss"] = total.item()
        state.metrics.update(values)
        return True

    def ema_phase(self, state: _StepState) -> bool:
        if self.ema is not None:
            self.ema.update(self.g.module, state.clock.images_per_step, state.clock.images_seen)
        return True

    # ---- helpers -------------------------------------------------------------------------------
    def _pair(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, source) as fp32 in [-1, 1] on this rank's device; a clear error for unpaired data
        or inputs of the wrong size."""
        if "source" not in batch or "image" not in batch:
            raise ConfigError(f"kind: paired needs paired shards (KEY.src.* + KEY.tgt.*, e.g. gentrain shards build "
                              f"pairs:sr4:photos); this batch has {', '.join(sorted(k for k in batch if not k.startswith('_')))}")
        device = self.dist.device
        target = batch_to_float(batch["image"].to(device, non_blocking=True))
        source = batch_to_float(batch["source"].to(device, non_blocking=True))
        (h, w), (sh, sw) = target.shape[-2:], source.shape[-2:]
        if (sh * self.scale, sw * self.scale) != (h, w):
            raise ConfigError(f"the shards' inputs are {sh}x{sw} and targets {h}x{w}, but model.scale={self.scale} "
                              f"wants inputs of {h // self.scale}x{w // self.scale}")
        return target, source

    def _feature_net(self):
        from trainers.judge.extractors import get_extractor

        net = get_extractor(str(self.cfg.loss.feature_net).strip()).to(self.dist.device)
        return net.eval().requires_grad_(False)

    def _feature_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """mean |f(G(x)) - f(y)|: the extractor's features of images scaled to 0..255 (differentiable)."""
        f_fake = self.features.features((fake.clamp(-1, 1) + 1) * 127.5)
        with torch.no_grad():
            f_real = self.features.features((real + 1) * 127.5)
        return (f_fake.float() - f_real.float()).abs().mean()

    def _set_lrs(self, step: int) -> None:
        f = lr_factor(self.cfg.optim, step, self.cfg.trainer.max_steps)
        for name, engine in self.engines.items():
            for group in engine.optimizer.param_groups:
                group["lr"] = self.base_lr[name] * f

    # ---- images, state, weights ---------------------------------------------------------------
    @property
    def sampler(self) -> torch.nn.Module:
        """The generator used for samples and `gentrain translate`: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.g.module

    @torch.no_grad()
    def samples(self) -> dict[str, np.ndarray]:
        """One grid: the fixed inputs (resized nearest to the target's size) | outputs | targets, as rows."""
        if self.fixed is None:
            return {}
        source_u8, target_u8 = self.fixed
        device = self.dist.device
        source = batch_to_float(source_u8.to(device))
        net = self.sampler
        out = net(source.to(module_dtype(net))).float()
        shown = F.interpolate(source, size=target_u8.shape[-2:], mode="nearest")
        target = batch_to_float(target_u8.to(device))
        rows = [to_uint8(x) for x in (shown, out, target)]
        channels = max(r.shape[-1] for r in rows)
        rows = [np.repeat(r, channels, axis=-1) if r.shape[-1] != channels else r for r in rows]
        return {"samples": make_grid(np.concatenate(rows), nrow=len(source_u8))}

    def generate(self, n: int, seed: int) -> np.ndarray:
        """In-training sample quality needs inputs to translate, which a paired task does not draw
        itself: not supported (configs.checks refuses metrics.every_kimg > 0 for paired runs)."""
        raise NotImplementedError("paired runs are judged on held-out pairs by `python -m bench.translate`")

    def state(self) -> dict:
        return {} if self.fixed is None else {"fixed_source": self.fixed[0], "fixed_target": self.fixed[1]}

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        if "fixed_source" in state:
            self.fixed = (state["fixed_source"], state["fixed_target"])
        if self.ema is not None:
            ema = {k[len("g_ema."):]: v for k, v in weights.items() if k.startswith("g_ema.")}
            self.ema.module.load_state_dict(ema or {k[len("g."):]: v for k, v in weights.items() if k.startswith("g.")})

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"g.{k}": v for k, v in self.g.module.state_dict().items()}
        if self.d is not None:
            out.update({f"d.{k}": v for k, v in self.d.module.state_dict().items()})
        if self.ema is not None:
            out.update({f"g_ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        return out
