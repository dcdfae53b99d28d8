"""Trainer overhead: gentrain's training step against a bare hand-written PyTorch loop.

Single process, fp32 (what ``precision: auto`` picks on a CPU without native bf16), the
digits presets' models, batch and losses, fed one fixed synthetic uint8 batch so that only
the step is timed. Timed side by side, round-robin, K steps each:

* ``bare``: model + torch AdamW (same hyperparameters), the same loss functions (imported from
  trainers/), ``clip_grad_norm_`` only where the config clips, one ``.item()`` a step.
* ``task_step``: ``VAETask/GANTask.train_step`` (DeepSpeed engine(s), ZeRO stage and gradient
  clipping from the config, the non-finite guard, the scalars it returns, the VAE's posterior
  diagnostics every ``diagnostics_every`` steps, the GAN's EMA update).
* ``loop_step``: ``task_step`` plus everything trainers/loop.py does around it every step
  (metric sums, progress bar, logging to metrics.jsonl + W&B offline every ``log_every``).

Sample grids and checkpoints happen every ``sample_every``/``ckpt_every`` steps: each is timed
on its own (median of a few) and its cost divided by its cadence is added to ``loop_step``
(``amortised``). ``trainer_step_vs_bare_loop`` = (loop_step + amortised) / bare.
"""
from __future__ import annotations

import copy
import io
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, median, median_ratio
from trainers.runtime.clock import Clock


def _config(kind: str, run_dir: Path, wandb_mode: str, overrides=()):
    from configs import load_config

    preset = {"vae": "configs/vae_digits.yaml", "gan": "configs/gan_digits.yaml"}[kind]
    return load_config(preset, [f"run.dir={run_dir}", "trainer.precision=fp32", f"wandb.mode={wandb_mode}",
                                f"run.name=bench-{kind}", *overrides])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _bare_gan(cfg):
    from trainers.gan.task import build_networks
    from trainers.gan.losses import d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty

    g, d = build_networks(cfg)
    opt_g = torch.optim.AdamW(g.parameters(), lr=cfg.optim.g.lr, betas=tuple(cfg.optim.g.betas),
                              weight_decay=cfg.optim.g.weight_decay)
    opt_d = torch.optim.AdamW(d.parameters(), lr=cfg.optim.d.lr, betas=tuple(cfg.optim.d.betas),
                              weight_decay=cfg.optim.d.weight_decay)
    noise = torch.Generator().manual_seed(1)
    clip_g, clip_d = float(cfg.optim.g.grad_clip), float(cfg.optim.d.grad_clip)
    lazy, gamma = cfg.loss.r1_every, cfg.loss.r1_gamma
    count = [0]

    def step(batch):
        real = batch["image"].float().div_(127.5).sub_(1.0)
        n = real.shape[0]
        count[0] += 1
        with torch.no_grad():
            fake = g(torch.randn(n, cfg.model.z_dim, generator=noise))
        logits = d(torch.cat([real, fake]))
        loss_d = d_loss_nonsaturating(logits[:n], logits[n:])
        if gamma > 0 and count[0] % lazy == 0:
            loss_d = loss_d + r1_penalty(d, real) * (gamma / 2 * lazy)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        if clip_d > 0:
            torch.nn.utils.clip_grad_norm_(d.parameters(), clip_d)
        opt_d.step()
        d.requires_grad_(False)
        loss_g = g_loss_nonsaturating(d(g(torch.randn(n, cfg.model.z_dim, generator=noise))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        d.requires_grad_(True)
        if clip_g > 0:
            torch.nn.utils.clip_grad_norm_(g.parameters(), clip_g)
        opt_g.step()
        return loss_d.item() + loss_g.item()

    return step


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
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return {"image": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
            "label": torch.zeros(cfg.data.batch_size, dtype=torch.int64), "skipped": {}}


def setup(kind: str, run_dir: Path, wandb_mode: str = "offline", overrides=()):
    """(cfg, dist_info, task, logger) as trainers/loop.py builds them."""
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


def bench_kind(kind: str, steps: int, rounds: int, root: Path, wandb_mode: str = "offline", reps: int = 3) -> dict:
    from trainers.runtime.checkpoint import Checkpointer

    run_dir = root / f"trainer-{kind}"
    cfg, dist_info, task, logger = setup(kind, run_dir, wandb_mode)
    _seed(cfg.run.seed)
    bare = _bare_vae(cfg) if kind == "vae" else _bare_gan(cfg)
    batch = synthetic_batch(cfg)
    loop = _LoopBody(cfg, task, logger, dist_info)
    fresh = lambda: {**batch, "image": batch["image"].clone()}  # noqa: E731 - steps may write in place

    def steps_of(fn):
        def run():
            for _ in range(steps):
                fn(fresh())
            return steps
        return run

    task_clock = Clock(images_per_step=loop.clock.images_per_step)
    fns = {"bare": steps_of(bare), "task_step": steps_of(lambda b: task.train_step(b, task_clock)),
           "loop_step": steps_of(loop)}
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
    out = {
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
    pieces = {
        "deepspeed_and_task_vs_bare_ms": 1000 * (median(per_step["task_step"]) - bare_s),
        "loop_logging_ms": 1000 * (median(per_step["loop_step"]) - median(per_step["task_step"])),
        "samples_and_checkpoints_ms": 1000 * amortised,
    }
    if "ema_update" in per_step:
        pieces["ema_ms"] = 1000 * median(per_step["ema_update"])
        pieces["deepspeed_and_task_vs_bare_ms"] -= pieces["ema_ms"]
    out["pieces_ms_per_step"] = pieces
    out["pieces_fraction_of_bare"] = {k: v / (1000 * bare_s) for k, v in pieces.items()}
    return out


def run(quick: bool = False, root: Path | None = None) -> dict:
    torch.set_num_threads(1)  # one core per process, as a 2-process run on this machine would get
    root = Path(root or Path(tempfile.gettempdir()) / "gentrain-bench")
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    if quick:  # W&B's service process alone takes seconds to start: not for a smoke run
        return {"vae": bench_kind("vae", 1, 1, root, wandb_mode="disabled", reps=1)}
    return {kind: bench_kind(kind, 20, 5, root) for kind in ("vae", "gan")}
