"""The shared training loop: one function, read top to bottom.

A task (VAETask, GANTask) owns its engines and knows one training step; this loop owns
everything around it: data, cadence of logs, samples and checkpoints, resume, signals and
rolling back after non-finite steps.
"""
from __future__ import annotations

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
from data_shards.stream import NoValidSamples, make_loader, resolve_shards
from trainers.runtime.checkpoint import Checkpointer
from trainers.runtime.distributed import any_rank, barrier, init_distributed, shutdown
from trainers.runtime.engines import resolve_precision
from trainers.runtime.faults import NonFiniteFault
from trainers.runtime.guard import weights_finite
from trainers.runtime.meter import Meter
from trainers.runtime.run_log import RunLogger
from trainers.runtime.signals import REQUEUE_EXIT_CODE, StopRequest


MAX_ROLLBACKS_IN_ROW = 3


class TrainingDiverged(RuntimeError):
    """Non-finite steps in a row and no checkpoint to roll back to."""


def build_task(cfg: DictConfig, dist_info, precision: str):
    if cfg.kind == "vae":
        from trainers.vae.task import VAETask
        return VAETask(cfg, dist_info, precision)
    from trainers.gan.task import GANTask
    return GANTask(cfg, dist_info, precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: DictConfig) -> int:
    """Run (or resume) the configured training; returns the process exit code."""
    # Setup: processes, run directory, task, the checkpoint to resume from, data.
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
    resume_from = None if cfg.trainer.resume == "never" else (
        checkpointer.latest_verified() if cfg.trainer.resume == "auto" else Path(cfg.trainer.resume))
    step, images_seen, data_state = restore(task, checkpointer, resume_from, dist_info) if resume_from \
        else (0, 0, None)
    shards = resolve_shards(cfg.data.shards)
    data = DataFeed(cfg, shards, dist_info, step, data_state)
    logger = RunLogger(cfg, run_dir, enabled=dist_info.is_main, start_step=step)
    stop = StopRequest()
    images_per_step = cfg.data.batch_size * dist_info.world_size
    max_steps = cfg.trainer.max_steps
    if dist_info.is_main:
        print(f"[gentrain] {cfg.kind} run '{cfg.run.name}' in {run_dir}: {dist_info.world_size} process(es) on "
              f"{dist_info.device.type}, {precision}, ZeRO-{cfg.trainer.zero_stage}, {len(shards)} shard(s), "
              f"steps {step}->{max_steps}", flush=True)
    bar = tqdm(total=max_steps, initial=step, disable=not (dist_info.is_main and cfg.trainer.progress),
               unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # Loop: one batch, one step; then whatever this step's cadence asks for.
    meter, skipped, fault = Meter(), Counter(), NonFiniteFault()
    steps_since_log, tick = 0, time.perf_counter()
    nonfinite_in_row, rollbacks_in_row, exit_code = 0, 0, 0
    try:
        while step < max_steps:
            batch = fault.poison(data.next(), step + 1)
            skipped.update(batch.get("skipped", {}))
            scalars = task.train_step(batch)
            step += 1
            images_seen += images_per_step
            steps_since_log += 1
            meter.add(scalars)
            bar.update(1)
            last = step == max_steps
            nonfinite_in_row = nonfinite_in_row + 1 if "nonfinite_skipped" in scalars else 0

            if step % cfg.trainer.log_every == 0 or last:
                elapsed = time.perf_counter() - tick
                means = meter.reduce(dist_info.device)
                means["samples_per_sec"] = steps_since_log * images_per_step / max(elapsed, 1e-9)
                means["images_seen"] = images_seen
                means.update({f"data/skipped_{k}": v for k, v in skipped.items()})
                logger.log(step, means)
                raise_alerts(logger, step, means, dist_info)
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in task_postfix_keys(cfg)}
                                | {"img/s": f"{means['samples_per_sec']:.0f}"}, refresh=False)
                steps_since_log, tick = 0, time.perf_counter()

            if step % cfg.trainer.sample_every == 0 or last:
                if dist_info.is_main:
                    for name, grid in task.samples().items():
                        logger.log_image(step, name, grid)

            if nonfinite_in_row >= cfg.trainer.max_nonfinite_in_row:
                rollbacks_in_row += 1
                if rollbacks_in_row > MAX_ROLLBACKS_IN_ROW:
                    raise TrainingDiverged(f"rolled back {MAX_ROLLBACKS_IN_ROW} times to the same checkpoint and the "
                                           f"steps after it are still non-finite: stopping (lower the learning rate?)")
                step, images_seen, data = roll_back(cfg, task, checkpointer, shards, dist_info, nonfinite_in_row)
                nonfinite_in_row = 0
                bar.reset(total=max_steps)
                bar.update(step)
                continue

            preempted = any_rank(stop.requested, dist_info.device)
            if step % cfg.trainer.ckpt_every == 0 or last or preempted:
                if weights_finite(dist_info.device, [e.module for e in task.engines.values()]):
                    checkpointer.save(step, task.engines, rank_state(task, step, images_seen, data), task.weights(),
                                      {"kind": cfg.kind, "precision": precision, "config": to_yaml(cfg),
                                       "wandb_id": logger.run_id})
                    rollbacks_in_row = 0
                elif dist_info.is_main:
                    print(f"[gentrain] step {step}: non-finite weights, checkpoint NOT written", flush=True)
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


class DataFeed:
    """This rank's batches, and where in the stream each of its loader workers stands.

    Each batch carries its producer's position; saving the last position of every worker
    (plus which worker comes next) is what lets a resumed run see exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, cfg: DictConfig, shards: list[str], dist_info, step: int, state: dict | None):
        workers = max(1, cfg.data.num_workers)
        same_layout = state is not None and state.get("world_size") == dist_info.world_size \
            and state.get("num_workers") == workers
        self.positions = dict(state["positions"]) if same_layout else {}
        if state is not None and not same_layout and dist_info.is_main:
            print("[gentrain] world size or loader workers changed since the checkpoint: "
                  "the data stream restarts with a new order (counters continue)", flush=True)
        self.world_size, self.num_workers = dist_info.world_size, workers
        # Loader workers hand out batches in strict rotation; after `step` batches the next one
        # is due from logical worker step % workers, so the fresh loader's worker 0 plays it.
        seed = cfg.run.seed if same_layout or state is None else cfg.run.seed + 7919 * step
        loader = make_loader(shards, cfg.data.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                             num_workers=cfg.data.num_workers, seed=seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             channels=cfg.data.channels, image_size=cfg.data.image_size, channels_last=cfg.trainer.channels_last,
                             start_positions=self.positions, worker_offset=step % workers)
        self._batches = iter(loader)

    def next(self) -> dict:
        try:
            batch = next(self._batches)
        except RuntimeError as err:
            # A loader worker's exception arrives re-wrapped with its traceback in the text.
            if "NoValidSamples" in str(err) or isinstance(err, NoValidSamples):
                reason = next((ln for ln in str(err).splitlines() if "no valid samples" in ln), str(err))
                raise NoValidSamples(reason.split("NoValidSamples: ")[-1].strip()) from None
            raise
        if "__position__" in batch:
            self.positions[int(batch["__worker__"])] = batch["__position__"]
        return batch

    def state(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "positions": self.positions}


def raise_alerts(logger: RunLogger, step: int, means: dict[str, float], dist_info) -> None:
    """A task reports `alert/<name>` > 0 when its diagnostics say the run is failing."""
    for key, value in means.items():
        if key.startswith("alert/") and value > 0 and dist_info.is_main:
            name = key[len("alert/"):].replace("_", " ")
            print(f"[gentrain] ALERT step {step}: {name} ({key}={value:.2f})", flush=True)
            logger.alert(f"gentrain: {name}", f"step {step}: {key}={value:.2f} in run {logger.run_dir}")


def task_postfix_keys(cfg: DictConfig) -> tuple[str, ...]:
    return ("loss", "kl") if cfg.kind == "vae" else ("d_loss", "g_loss")


def rank_state(task, step: int, images_seen: int, data: DataFeed) -> dict:
    """What this rank needs to continue: counters, data position and every RNG it draws from."""
    return {
        "step": step,
        "images_seen": images_seen,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": numpy_rng_state(),
        "task": task.state(),
        "data": data.state(),
    }


def numpy_rng_state() -> dict:
    """NumPy's global RNG state as tensors and ints, so it loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def restore(task, checkpointer: Checkpointer, path: Path, dist_info) -> tuple[int, int, dict | None]:
    """Load a checkpoint into the task and RNGs; return (step, images seen, data state)."""
    state, weights = checkpointer.load(path, task.engines, getattr(task, "engines_that_may_start_fresh", ()))
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "numpy_rng" in state:
        set_numpy_rng_state(state["numpy_rng"])
    task.load_state(state["task"], weights)
    if dist_info.is_main:
        print(f"[gentrain] resumed from {path} at step {state['step']}", flush=True)
    return int(state["step"]), int(state["images_seen"]), state.get("data")


def roll_back(cfg, task, checkpointer: Checkpointer, shards, dist_info, bad_steps: int):
    """After too many non-finite steps in a row: back to the last checkpoint, with its data position."""
    path = checkpointer.latest_verified()
    if path is None:
        raise TrainingDiverged(f"{bad_steps} non-finite steps in a row and no checkpoint to roll back to")
    if dist_info.is_main:
        print(f"[gentrain] {bad_steps} non-finite steps in a row: rolling back to {path}", flush=True)
    step, images_seen, data_state = restore(task, checkpointer, path, dist_info)
    return step, images_seen, DataFeed(cfg, shards, dist_info, step, data_state)
