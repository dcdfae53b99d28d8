"""The shared training loop: one function, read top to bottom.

A task (VAETask, GANTask) owns its engines and knows one training step; this loop owns
everything around it: data, cadence of logs, samples and checkpoints, resume and signals.
"""
from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from configs import to_yaml
from data_shards.stream import make_loader, resolve_shards
from trainers.checkpoint import Checkpointer
from trainers.distributed import all_reduce_mean, any_rank, barrier, init_distributed, shutdown
from trainers.engines import resolve_precision
from trainers.run_log import RunLogger
from trainers.signals import REQUEUE_EXIT_CODE, StopRequest


def build_task(cfg: DictConfig, dist_info, precision: str):
    if cfg.kind == "vae":
        from trainers.vae import VAETask
        return VAETask(cfg, dist_info, precision)
    from trainers.gan import GANTask
    return GANTask(cfg, dist_info, precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: DictConfig) -> int:
    """Run (or resume) the configured training; returns the process exit code."""
    # Setup: processes, run directory, task, checkpoint to resume from.
    dist_info = init_distributed()
    run_dir = Path(cfg.run.dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    barrier()
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    precision = resolve_precision(cfg.trainer.precision, dist_info.device)
    task = build_task(cfg, dist_info, precision)
    checkpointer = Checkpointer(run_dir / "checkpoints", dist_info, cfg.trainer.keep_checkpoints)
    start_step = restore(cfg, task, checkpointer, dist_info)

    shards = resolve_shards(cfg.data.shards)
    loader = make_loader(shards, cfg.data.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                         num_workers=cfg.data.num_workers, seed=cfg.run.seed * 100_003 + start_step,
                         shuffle_buffer=cfg.data.shuffle_buffer, channels=cfg.data.channels,
                         image_size=cfg.data.image_size)
    logger = RunLogger(cfg, run_dir, enabled=dist_info.is_main)
    stop = StopRequest()
    images_per_step = cfg.data.batch_size * dist_info.world_size
    max_steps = cfg.trainer.max_steps
    if dist_info.is_main:
        print(f"[gentrain] {cfg.kind} run '{cfg.run.name}' in {run_dir}: {dist_info.world_size} process(es) on "
              f"{dist_info.device.type}, {precision}, ZeRO-{cfg.trainer.zero_stage}, {len(shards)} shard(s), "
              f"steps {start_step}->{max_steps}", flush=True)
    bar = tqdm(total=max_steps, initial=start_step, disable=not (dist_info.is_main and cfg.trainer.progress),
               unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # Loop.
    sums, skipped = Counter(), Counter()
    steps_since_log, tick = 0, time.perf_counter()
    step, exit_code = start_step, 0
    batches = iter(loader)
    try:
        while step < max_steps:
            batch = next(batches)
            skipped.update(batch.get("skipped", {}))
            scalars = task.train_step(batch)
            step += 1
            steps_since_log += 1
            sums.update(scalars)
            bar.update(1)
            last = step == max_steps

            if step % cfg.trainer.log_every == 0 or last:
                elapsed = time.perf_counter() - tick
                means = all_reduce_mean({k: v / steps_since_log for k, v in sums.items()}, dist_info.device)
                means["samples_per_sec"] = steps_since_log * images_per_step / max(elapsed, 1e-9)
                means["images_seen"] = step * images_per_step
                means.update({f"data/skipped_{k}": v for k, v in skipped.items()})
                logger.log(step, means)
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in task_postfix_keys(cfg)}
                                | {"img/s": f"{means['samples_per_sec']:.0f}"}, refresh=False)
                sums.clear()
                steps_since_log, tick = 0, time.perf_counter()

            if step % cfg.trainer.sample_every == 0 or last:
                if dist_info.is_main:
                    for name, grid in task.samples().items():
                        logger.log_image(step, name, grid)

            preempted = any_rank(stop.requested, dist_info.device)
            if step % cfg.trainer.ckpt_every == 0 or last or preempted:
                checkpointer.save(step, task.engines, rank_state(task, step), task.weights(),
                                  {"kind": cfg.kind, "precision": precision})
            if preempted:
                if dist_info.is_main:
                    print(f"[gentrain] signal {stop.signum}: checkpointed step {step}, exiting "
                          f"with {REQUEUE_EXIT_CODE} (requeue me)", flush=True)
                exit_code = REQUEUE_EXIT_CODE
                break
    finally:
        bar.close()
        stop.restore()
        logger.close()
    if dist_info.is_main and exit_code == 0:
        print(f"[gentrain] done: {step} steps; samples in {run_dir / 'samples'}, "
              f"checkpoint {checkpointer.latest()}, metrics {run_dir / 'metrics.jsonl'}", flush=True)
    barrier()
    shutdown()
    return exit_code


def task_postfix_keys(cfg: DictConfig) -> tuple[str, ...]:
    return ("loss", "kl") if cfg.kind == "vae" else ("d_loss", "g_loss")


def rank_state(task, step: int) -> dict:
    """What this rank needs to continue: counters and every RNG it draws from."""
    return {
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "task": task.state(),
    }


def restore(cfg: DictConfig, task, checkpointer: Checkpointer, dist_info) -> int:
    """Load the checkpoint trainer.resume points at (auto: the run's latest); return its step."""
    mode = cfg.trainer.resume
    if mode == "never":
        return 0
    path = checkpointer.latest() if mode == "auto" else Path(mode)
    if path is None:
        return 0
    state, weights = checkpointer.load(path, task.engines)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    task.load_state(state["task"], weights)
    if dist_info.is_main:
        print(f"[gentrain] resumed from {path} at step {state['step']}", flush=True)
    return int(state["step"])
