"""Trainer overhead: gentrain's training step against a bare hand-written PyTorch loop.

    python -m bench.trainer [--presets gan_photos,gan_photos_stylegan2] [--quick] [--out bench]

Single process, fp32 (the bare loop's precision), one thread, each preset's model, batch and
losses, fed one fixed synthetic uint8 batch so that only the step is timed. Presets (``PRESETS``):
the digits VAE and DCGAN (``vae``, ``gan``: what ``make bench`` runs) and the photo GANs
(``gan_photos``: R3GAN-style, class-conditional, relativistic loss, lazy R1 + R2, ADA;
``gan_photos_stylegan2``: lazy R1, path length, ADA), whose shape (32x32 RGB, 16 classes) is
set by overrides instead of the shards' manifest. Timed side by side, round-robin, K steps each
(K a multiple of every lazy cadence, so each side runs as many regularised steps per round):

* ``bare``: model + torch AdamW (same hyperparameters, StyleGAN2's lazy compensation where the
  task applies it), the same loss and penalty functions (imported from trainers/), the same lazy
  cadences, conditional labels, ADA's pipeline and controller, the G EMA, ``clip_grad_norm_``
  only where the config clips, one ``.item()`` a step.
* ``task_step``: ``VAETask/GANTask.train_step`` on a clock that advances as the loop's does
  (DeepSpeed engine(s), ZeRO stage and gradient clipping from the config, the non-finite guard,
  the scalars it returns, the VAE's posterior diagnostics every ``diagnostics_every`` steps, the
  GAN's EMA update).
* ``loop_step``: ``task_step`` plus everything trainers/loop.py does around it every step
  (metric sums, progress bar, logging to metrics.jsonl + W&B offline every ``log_every``).

ADA's p is held at ``--ada-p`` on both sides (0, the start of training, by default: the pipeline
then returns its input): its controller still accumulates r_t every step but its interval is
pushed past the bench, so neither side's p drifts from the other's.

Sample grids and checkpoints happen every ``sample_every``/``ckpt_every`` steps: each is timed
on its own (median of a few) and its cost divided by its cadence is added to ``loop_step``
(``amortised``). ``trainer_step_vs_bare_loop`` = (loop_step + amortised) / bare. The GAN's
collapse diagnostics (every ``diagnostics.every`` steps) are neither timed nor amortised.

Results merge into OUT/results.json (``trainer``, ``trainer_step_vs_bare_loop``; the other
presets' entries are kept) and OUT/results.md is re-rendered, as ``python -m bench.run`` writes them.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, median, median_ratio
from trainers.runtime.clock import Clock


# What the photo shards' manifest says (gentrain shards build photos --image-size 32): set by
# hand, so the bench needs no shards.
PHOTO_SHAPE = ("data.image_size=32", "data.channels=3", "model.num_classes=16")
# ADA's controller keeps accumulating r_t but never moves p within a bench: two sides whose D
# outputs differ would otherwise augment at different p (see the docstring).
ADA_P_HELD = "loss.ada_interval=1000000000"
# The bare loop is plain PyTorch in NCHW: the photo presets' channels_last would time a layout
# (docs/performance.md measures it on its own), not what the trainer adds.
NCHW = "trainer.channels_last=false"
# name (its key in results.json) -> (preset, overrides)
PRESETS = {
    "vae": ("configs/vae_digits.yaml", ()),
    "gan": ("configs/gan_digits.yaml", ()),
    "gan_photos": ("configs/gan_photos.yaml", (*PHOTO_SHAPE, ADA_P_HELD, NCHW)),
    "gan_photos_stylegan2": ("configs/gan_photos_stylegan2.yaml", (*PHOTO_SHAPE, ADA_P_HELD, NCHW)),
}
ALIASES = {"vae_digits": "vae", "gan_digits": "gan"}
DEFAULT_PRESETS = ("vae", "gan")  # what `make bench` (bench.run) times


def _config(name: str, run_dir: Path, wandb_mode: str, overrides=()):
    from configs import load_config

    preset, preset_overrides = PRESETS[name]
    return load_config(preset, [*preset_overrides, f"run.dir={run_dir}", "trainer.precision=fp32",
                                f"wandb.mode={wandb_mode}", f"run.name=bench-{name}", *overrides])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cadence(cfg) -> int:
    """Steps after which every lazy part of the step (R1/R2/GP, path length) has come round
    equally often: rounds of a multiple of it give both sides the same regularised steps."""
    loss = cfg.loss
    if cfg.kind != "gan":
        return int(loss.get("r1_every", 1)) if loss.get("r1_gamma", 0) else 1
    every = [loss.r1_every if (loss.r1_gamma or loss.r2_gamma or loss.gp_gamma) else 1,
             loss.pl_every if loss.pl_weight > 0 else 1]
    return math.lcm(*map(int, every))


def round_up(steps: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= steps (and >= multiple)."""
    return max(multiple, -(-steps // multiple) * multiple)


def _bare_vae(cfg):
    """The same model and objective as VAETask (beta schedule, free bits, likelihood), by hand."""
    noise = torch.Generator().manual_seed(1)
    # the objective as trainers/vae/task.py computes it
    from trainers.vae.task import build_vae, log_scale_of
    from trainers.vae.objective import beta_at, kl_per_dim, kl_term, reconstruction_nll

    model = build_vae(cfg)
    lc = cfg.loss

    def loss_of(x, num_steps):
        beta = beta_at(num_steps, lc.beta, lc.beta_schedule, lc.beta_warmup_steps, lc.beta_cycle_steps,
                       lc.beta_cycle_ramp)
        out = model(x, generator=noise)
        nll = reconstruction_nll(out.logits_bchw, x, lc.likelihood, log_scale_of(model, cfg))
        return nll.mean() + beta * kl_term(kl_per_dim(out.mean_bz, out.logvar_bz), lc.free_bits)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    clip = float(cfg.optim.grad_clip)
    count = [0]

    def step(batch):
        x = batch["image"].float().div_(255.0)
        loss = loss_of(x, count[0])
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()

    return step


class _BareGAN:
    """GANTask's step written as a plain PyTorch loop: D (+ lazy R1/R2 on the augmented images,
    scaled by the interval), ADA's controller, G (relativistic: against D on the real batch too;
    + MSGAN's mode-seeking term), lazy path length on half the batch, then the G EMA. One D step
    per G step (every preset)."""

    def __init__(self, cfg, noise_seed: int = 1):
        from trainers.gan.ada import AdaptiveAugment
        from trainers.gan.losses import D_LOSSES, G_LOSSES, RELATIVISTIC_G_LOSSES, lazy_adam_compensation
        from trainers.gan.task import build_networks

        loss = cfg.loss
        if loss.d_steps != 1 or loss.gp_gamma > 0 or loss.augment:
            raise NotImplementedError("the bare GAN loop has one D step, no WGAN-GP and no DiffAugment")
        self.cfg, self.loss = cfg, loss
        self.g, self.d = build_networks(cfg)
        self.g_ema = copy.deepcopy(self.g).eval().requires_grad_(False) if loss.ema_halflife_kimg > 0 else None
        self.opt_g = self._adamw(self.g, cfg.optim.g, cfg.optim.g.lr, cfg.optim.g.betas)
        lr_d, betas_d = cfg.optim.d.lr, tuple(cfg.optim.d.betas)
        regularised = loss.r1_gamma > 0 or loss.r2_gamma > 0
        if loss.lazy_compensation and regularised and loss.r1_every > 1:
            lr_d, betas_d = lazy_adam_compensation(lr_d, betas_d, loss.r1_every)
        self.opt_d = self._adamw(self.d, cfg.optim.d, lr_d, betas_d)
        self.d_loss = D_LOSSES[loss.loss]
        self.g_loss, self.g_rel_loss = G_LOSSES.get(loss.loss), RELATIVISTIC_G_LOSSES.get(loss.loss)
        self.ada = AdaptiveAugment.from_config(loss)
        self.num_classes = int(cfg.model.num_classes)
        self.noise = torch.Generator().manual_seed(noise_seed)
        if hasattr(self.g, "noise_generator"):  # StyleGAN2's per-layer noise, from the same stream as GANTask's
            self.g.noise_generator = self.noise
        self.pl_mean = torch.zeros(())
        self.count = 0

    @staticmethod
    def _adamw(net, optim, lr, betas):
        return torch.optim.AdamW(net.parameters(), lr=lr, betas=tuple(betas), weight_decay=optim.weight_decay)

    def __call__(self, batch) -> float:
        real = batch["image"].float().div_(127.5).sub_(1.0)
        labels = batch["label"] if self.num_classes else None
        self.count += 1
        loss_d = self.d_step(real, labels)
        loss_g = self.g_step(real, labels)
        if self.loss.pl_weight > 0 and self.count % self.loss.pl_every == 0:
            self.path_length_step(real.shape[0] // 2)
        if self.g_ema is not None:
            self.ema_step(real.shape[0])
        return loss_d.item() + loss_g.item()

    def _z(self, n):
        z = torch.randn(n, self.cfg.model.z_dim, generator=self.noise)
        return (z,) if not self.num_classes else (z, torch.randint(self.num_classes, (n,), generator=self.noise))

    def _aug(self, x):
        return self.ada(x, self.noise) if self.ada is not None else x

    def _step(self, opt, net, loss, clip) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()

    def d_step(self, real, labels):
        from trainers.gan.ada import ada_margins, sign_stats
        from trainers.gan.losses import r1_penalty, r2_penalty

        loss, n = self.loss, real.shape[0]
        z = self._z(n)
        with torch.no_grad():
            fake = self.g(*z)
        real_in, fake_in = self._aug(real), self._aug(fake)
        both = torch.cat([real_in, fake_in])
        logits = self.d(both) if labels is None else self.d(both, torch.cat([labels, z[1]]))
        total = loss_d = self.d_loss(logits[:n], logits[n:])
        if self.count % loss.r1_every == 0:
            if loss.r1_gamma > 0:
                total = total + r1_penalty(self.d, real_in, labels) * (loss.r1_gamma / 2 * loss.r1_every)
            if loss.r2_gamma > 0:
                fake_labels = None if labels is None else z[1]
                total = total + r2_penalty(self.d, fake_in, fake_labels) * (loss.r2_gamma / 2 * loss.r1_every)
        self._step(self.opt_d, self.d, total, float(self.cfg.optim.d.grad_clip))
        if self.ada is not None:
            signs = sign_stats(ada_margins(logits[:n], logits[n:], relativistic=self.g_rel_loss is not None))
            self.ada.accumulate(float(signs[0]), float(signs[1]), images=n)
        return loss_d

    def g_step(self, real, labels):
        from trainers.gan.losses import mode_seeking_loss

        n, seek = real.shape[0], float(self.loss.get("mode_seeking", 0.0))
        z = self._z(n)
        if seek > 0 and len(z) > 1:  # MSGAN: pairs (i, i + n/2) share a class, as GANTask draws them
            z = (z[0], torch.cat([z[1][: n // 2], z[1][: n - n // 2]]))
        self.d.requires_grad_(False)
        fake = self.g(*z)
        fake_logits = self.d(self._aug(fake), *z[1:])
        if self.g_rel_loss is None:
            loss_g = self.g_loss(fake_logits)
        else:
            with torch.no_grad():
                real_logits = self.d(self._aug(real), *([] if labels is None else [labels]))
            loss_g = self.g_rel_loss(fake_logits, real_logits)
        if seek > 0:
            loss_g = loss_g + seek * mode_seeking_loss(fake, z[0])[0]
        self._step(self.opt_g, self.g, loss_g, float(self.cfg.optim.g.grad_clip))
        self.d.requires_grad_(True)
        return loss_g

    def path_length_step(self, n: int) -> None:
        from trainers.gan.path_length import path_length_penalty

        z = self._z(max(1, n))
        penalty, self.pl_mean = path_length_penalty(self.g, z[0], z[1] if len(z) > 1 else None, self.pl_mean,
                                                    generator=self.noise)
        self._step(self.opt_g, self.g, penalty * (self.loss.pl_weight * self.loss.pl_every),
                   float(self.cfg.optim.g.grad_clip))

    @torch.no_grad()
    def ema_step(self, images_per_step: int) -> None:
        """StyleGAN2-ADA's EMA: half-life in images, capped by the ramp-up while few were seen."""
        loss = self.loss
        halflife = loss.ema_halflife_kimg * 1000.0
        if loss.ema_rampup > 0:
            halflife = min(halflife, (self.count - 1) * images_per_step * loss.ema_rampup)
        beta = 0.5 ** (images_per_step / max(halflife, 1e-8))
        for p_ema, p in zip(self.g_ema.parameters(), self.g.parameters()):
            p_ema.lerp_(p, 1.0 - beta)
        for b_ema, b in zip(self.g_ema.buffers(), self.g.buffers()):
            b_ema.copy_(b)


class _LoopBody:
    """What trainers/loop.py does per step around task.train_step, minus data loading,
    sample grids and checkpoints (those are timed separately and amortised)."""

    def __init__(self, cfg, task, logger, dist_info):
        from tqdm import tqdm

        self.cfg, self.task, self.logger, self.dist = cfg, task, logger, dist_info
        self.bar = tqdm(total=10**9, file=io.StringIO(), mininterval=1.0, unit="step")
        self.sums, self.skipped = Counter(), Counter()
        self.since, self.tick = 0, time.perf_counter()
        self.clock = Clock(images_per_step=cfg.data.batch_size * dist_info.world_size)

    @property
    def step(self) -> int:
        return self.clock.step

    def __call__(self, batch):
        from trainers.runtime.distributed import all_reduce_mean, any_rank

        self.skipped.update(batch.get("skipped", {}))
        scalars = self.task.train_step(batch, self.clock)
        self.clock.tick()
        self.since += 1
        self.sums.update(scalars)
        self.bar.update(1)
        if self.step % self.cfg.trainer.log_every == 0:
            elapsed = time.perf_counter() - self.tick
            means = all_reduce_mean({k: v / self.since for k, v in self.sums.items()}, self.dist.device)
            means["samples_per_sec"] = self.since * self.clock.images_per_step / max(elapsed, 1e-9)
            means["images_seen"] = self.clock.images_seen
            means.update({f"data/skipped_{k}": v for k, v in self.skipped.items()})
            self.logger.log(self.step, means)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()}, refresh=False)
            self.sums.clear()
            self.since, self.tick = 0, time.perf_counter()
        any_rank(False, self.dist.device)


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """One fixed batch as the loader yields it: uint8 images, labels in the model's classes (zeros
    when it has none) and, for a paired task, the inputs `model.scale` times smaller."""
    from omegaconf import OmegaConf

    g = torch.Generator().manual_seed(seed)
    b, c, side = cfg.data.batch_size, cfg.data.channels, cfg.data.image_size
    classes = int(OmegaConf.select(cfg, "model.num_classes", default=0) or 0)
    batch = {"image": torch.randint(0, 256, (b, c, side, side), generator=g, dtype=torch.uint8),
             "label": torch.randint(max(classes, 1), (b,), generator=g, dtype=torch.int64), "skipped": {}}
    if cfg.kind == "paired":
        small = side // int(cfg.model.scale)
        batch["source"] = torch.randint(0, 256, (b, c, small, small), generator=g, dtype=torch.uint8)
    return batch


def fresh_copy(batch: dict) -> dict:
    """The batch with its image tensors cloned: a step may write into them in place."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def setup(kind: str, run_dir: Path, wandb_mode: str = "offline", overrides=()):
    """(cfg, dist_info, task, logger) as trainers/loop.py builds them; `kind` names a PRESETS entry."""
    from trainers.runtime.distributed import init_distributed
    from trainers.tasks import build_task
    from trainers.runtime.run_log import RunLogger

    cfg = _config(kind, run_dir, wandb_mode, overrides)
    dist_info = init_distributed()
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed(cfg.run.seed)
    task = build_task(cfg, dist_info, "fp32")
    try:
        logger = RunLogger(cfg, run_dir, enabled=True)
    except Exception as exn:  # noqa: BLE001 - W&B unavailable: measure file logging only
        print(f"[bench] W&B {wandb_mode} unavailable ({exn}); logging to metrics.jsonl only")
        cfg = _config(kind, run_dir, "disabled", overrides)
        logger = RunLogger(cfg, run_dir, enabled=True)
    return cfg, dist_info, task, logger


def _hold_ada_p(task, bare, p: float) -> None:
    """Both sides augment at the same p for the whole bench (their intervals are never reached)."""
    for owner in (task, bare):
        if getattr(owner, "ada", None) is not None:
            owner.ada.p = float(p)


def bench_kind(kind: str, steps: int, rounds: int, root: Path, wandb_mode: str = "offline", reps: int = 3,
               ada_p: float = 0.0) -> dict:
    """Time one preset (`kind`: a PRESETS name); `steps` per round is rounded up to the preset's
    lazy cadence."""
    from trainers.runtime.checkpoint import Checkpointer

    started, load = time.perf_counter(), os.getloadavg()  # the machine is shared: say how busy it was
    run_dir = root / f"trainer-{kind}"
    cfg, dist_info, task, logger = setup(kind, run_dir, wandb_mode)
    steps = round_up(steps, cadence(cfg))
    _seed(cfg.run.seed)
    bare = _bare_vae(cfg) if cfg.kind == "vae" else _BareGAN(cfg)
    _hold_ada_p(task, bare, ada_p)
    batch = synthetic_batch(cfg)
    loop = _LoopBody(cfg, task, logger, dist_info)

    def steps_of(fn):
        def run():
            for _ in range(steps):
                fn(fresh_copy(batch))
            return steps
        return run

    task_clock = Clock(images_per_step=loop.clock.images_per_step)

    def task_step(b):  # the clock advances as the loop's does, so lazy phases come round
        task.train_step(b, task_clock)
        task_clock.tick()

    fns = {"bare": steps_of(bare), "task_step": steps_of(task_step), "loop_step": steps_of(loop)}
    ema = getattr(task, "ema", None)
    if ema is not None:
        snapshot = copy.deepcopy(ema.module.state_dict())

        def ema_only():
            for i in range(steps):
                ema.update(task.g.module, task_clock.images_per_step, task_clock.images_seen + i)
            ema.module.load_state_dict(snapshot)
            return steps

        fns["ema_update"] = ema_only
    for fn in fns.values():  # warm-up: allocator, oneDNN primitives, DeepSpeed's first step
        fn()
    per_step = interleaved(fns, rounds)

    # Cadenced work, timed on its own and amortised over its period.
    checkpointer = Checkpointer(run_dir / "checkpoints", dist_info, 2)
    sample_s, ckpt_s = [], []
    sample_error = None
    for i in range(reps):
        t0 = time.perf_counter()
        try:
            for name, grid in task.samples().items():
                logger.log_image(i, name, grid)
            sample_s.append(time.perf_counter() - t0)
        except Exception as exn:  # noqa: BLE001 - a trainer bug must not sink the whole bench
            sample_error = f"{type(exn).__name__}: {exn}"
        t0 = time.perf_counter()
        state = {"step": 1000 + i, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "task": task.state(), "data": {}}  # what trainers/loop.py's rank_state holds
        try:
            checkpointer.save(1000 + i, task.engines, state, task.weights(), {"kind": cfg.kind, "precision": "fp32"})
        except TypeError as exn:  # the Checkpointer API moved on: say so rather than guess
            print(f"[bench] checkpoint not timed: {exn}")
            break
        ckpt_s.append(time.perf_counter() - t0)
    logger.close()
    ckpt_median = median(ckpt_s) if ckpt_s else float("nan")
    sample_median = median(sample_s) if sample_s else float("nan")
    amortised = (sample_median / cfg.trainer.sample_every if sample_s else 0.0) + \
        (ckpt_median / cfg.trainer.ckpt_every if ckpt_s else 0.0)

    bare_s = median(per_step["bare"])
    loop_total = [a + amortised for a in per_step["loop_step"]]
    preset, overrides = PRESETS[kind]
    out = {
        "preset": preset,
        "overrides": list(overrides),
        "arch": str(cfg.model.arch),
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "precision": "fp32",
        "zero_stage": cfg.trainer.zero_stage,
        "steps_per_round": steps,
        "rounds": rounds,
        "ms_per_step": {name: 1000 * median(t) for name, t in per_step.items()},
        "sample_grid_ms": 1000 * sample_median,
        **({"sample_grid_error": sample_error} if sample_error else {}),
        "checkpoint_ms": 1000 * ckpt_median,
        "cadence": {"log_every": cfg.trainer.log_every, "sample_every": cfg.trainer.sample_every,
                    "ckpt_every": cfg.trainer.ckpt_every},
        "amortised_ms_per_step": 1000 * amortised,
        "task_step_vs_bare_loop": median_ratio(per_step["task_step"], per_step["bare"]),
        "loop_step_vs_task_step": median_ratio(per_step["loop_step"], per_step["task_step"]),
        "trainer_step_vs_bare_loop": median_ratio(loop_total, per_step["bare"]),
    }
    if cfg.kind == "gan":
        out["bare_includes_ema"] = ema is not None
        if task.ada is not None:
            out["ada_p"] = float(ada_p)
    pieces = {
        "deepspeed_and_task_vs_bare_ms": 1000 * (median(per_step["task_step"]) - bare_s),
        "loop_logging_ms": 1000 * (median(per_step["loop_step"]) - median(per_step["task_step"])),
        "samples_and_checkpoints_ms": 1000 * amortised,
    }
    if "ema_update" in per_step:  # the bare loop updates its EMA too: reported, not subtracted
        pieces["ema_ms"] = 1000 * median(per_step["ema_update"])
    out["pieces_ms_per_step"] = pieces
    out["pieces_fraction_of_bare"] = {k: v / (1000 * bare_s) for k, v in pieces.items()}
    out.update({"load_avg_at_start": load, "load_avg_at_end": os.getloadavg(), "seconds": time.perf_counter() - started})
    return out


def parse_presets(text: str | None) -> tuple[str, ...]:
    """`--presets a,b` -> PRESETS names (digits aliases accepted); None -> the default pair."""
    if not text:
        return DEFAULT_PRESETS
    names = tuple(ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    return names


def run(quick: bool = False, root: Path | None = None, presets=None, steps: int = 20, rounds: int = 5,
        ada_p: float = 0.0) -> dict:
    """Figures per preset name; `presets` None -> the digits VAE and GAN (the VAE alone when quick)."""
    torch.set_num_threads(1)  # one core per process, as a 2-process run on this machine would get
    root = Path(root or Path(tempfile.gettempdir()) / "gentrain-bench")
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    if quick:  # W&B's service process alone takes seconds to start: not for a smoke run
        names = tuple(presets) if presets else ("vae",)
        return {n: bench_kind(n, 1, 1, root, wandb_mode="disabled", reps=1, ada_p=ada_p) for n in names}
    return {n: bench_kind(n, steps, rounds, root, ada_p=ada_p) for n in (presets or DEFAULT_PRESETS)}


def merge_into(out_dir: Path, figures: dict, command: str, quick: bool) -> Path:
    """Put `figures` into OUT/results.json under `trainer` (other presets kept) and re-render
    OUT/results.md as bench.run does; each entry records its own command and machine load."""
    from bench.run import machine, to_markdown

    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else \
        {"machine": machine(), "quick": quick, "command": command, "targets": {},
         "seconds": max(f.get("seconds", 0.0) for f in figures.values())}
    runs = results.setdefault("runs", {})
    earlier = runs.get("trainer", {}).get("command", results.get("command"))
    trainer = results.setdefault("trainer", {})
    for entry in trainer.values():  # figures from bench.run: its command, said once for the part
        entry.setdefault("command", earlier)
    trainer.update(figures)
    results.setdefault("trainer_step_vs_bare_loop", {}).update(
        {k: v["trainer_step_vs_bare_loop"] for k, v in figures.items()})
    runs["trainer"] = {"command": "; ".join(dict.fromkeys(e["command"] for e in trainer.values())),
                       "load_avg_at_start": next(iter(figures.values())).get("load_avg_at_start")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(to_markdown(results))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None,
                        help=f"comma-separated, of {', '.join(PRESETS)} (default: {','.join(DEFAULT_PRESETS)})")
    parser.add_argument("--quick", action="store_true", help="one step, one round: a smoke run")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (rounded up to the lazy cadence)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ada-p", type=float, default=0.0, help="ADA's p, held on both sides (0: start of training)")
    parser.add_argument("--out", default=None,
                        help="where results.json/.md are merged (default bench/; a temp dir with --quick)")
    parser.add_argument("--work", default=None, help="scratch directory for the runs (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    presets = parse_presets(args.presets)
    command = "python -m bench.trainer " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()
    figures = run(args.quick, args.work and Path(args.work), presets, args.steps, args.rounds, args.ada_p)
    for f in figures.values():
        f["command"] = command
    default_out = Path(tempfile.gettempdir()) / "gentrain-bench-quick" if args.quick else Path(__file__).resolve().parent
    path = merge_into(Path(args.out) if args.out else default_out, figures, command, args.quick)
    for name, f in figures.items():
        ms = f["ms_per_step"]
        print(f"[bench.trainer] {name}: bare {ms['bare']:.1f} ms, task {ms['task_step']:.1f} ms, loop "
              f"{ms['loop_step']:.1f} ms; trainer_step_vs_bare_loop {f['trainer_step_vs_bare_loop']:.3f}")
    print(f"[bench.trainer] merged into {path} (load average {[round(x, 2) for x in load]} at start, "
          f"{[round(x, 2) for x in os.getloadavg()]} at end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
