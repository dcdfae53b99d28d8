"""The shared training loop, read top to bottom.

A task (trainers.tasks: VAE, GAN, ...) owns its engines and knows one training step; the loop
owns everything around it: data, the clock, the cadence of logs, samples and checkpoints,
resume, preemption signals and rolling back after non-finite steps. It never names a kind.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from configs import to_yaml
from data_shards.stream import resolve_shards
from trainers.judge.live import LiveMetrics
from trainers.runtime.abandoned import set_aside_after
from trainers.runtime.checkpoint import Checkpointer
from trainers.runtime.clock import Clock
from trainers.runtime.data_feed import DataFeed
from trainers.runtime.distributed import any_rank, barrier, init_distributed, shutdown
from trainers.runtime.engines import precision_choice
from trainers.runtime.faults import NonFiniteFault
from trainers.runtime.guard import weights_finite
from trainers.runtime.meter import Meter
from trainers.runtime.resume import rank_state, restore, seed_everything
from trainers.runtime.run_log import RunLogger
from trainers.runtime.signals import REQUEUE_EXIT_CODE, StopRequest
from trainers.tasks import build_task

MAX_ROLLBACKS_IN_ROW = 3


class TrainingDiverged(RuntimeError):
    """Non-finite steps in a row and no checkpoint to roll back to."""


class CheckpointFailed(RuntimeError):
    """The last checkpoint of a run (its end, or after a preemption signal) could not be written."""


def train(cfg: DictConfig) -> int:
    """Run (or resume) the configured training; returns the process exit code."""
    run = Run(cfg)
    trainer, exit_code = cfg.trainer, 0
    try:
        while run.clock.step < trainer.max_steps:
            scalars = run.task.train_step(run.next_batch(), run.clock)
            run.clock.tick()
            run.record(scalars)
            step, last = run.clock.step, run.clock.step == trainer.max_steps

            measured = run.live is not None and run.live.due(run.clock, last)
            best = run.measure_quality() if measured else False
            if step % trainer.log_every == 0 or last or measured:
                run.log_scalars()
            if step % trainer.sample_every == 0 or last:
                run.write_samples()
            if run.nonfinite_in_row >= trainer.max_nonfinite_in_row:
                run.roll_back()
                continue
            preempted = any_rank(run.stop.requested, run.dist.device)
            if step % trainer.ckpt_every == 0 or last or preempted or best:
                if not run.checkpoint(best) and (last or preempted):
                    raise CheckpointFailed(f"step {step}: the final checkpoint could not be written "
                                           f"({run.checkpointer.last_error}); the latest is {run.checkpointer.latest()}")
            if preempted:
                exit_code = run.stop_for_requeue()
                break
    finally:
        run.close()
    run.finish(exit_code)
    return exit_code


class Run:
    """One training process's long-lived parts: task, clock, data, checkpoints, logs and signals."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dist = dist_info = init_distributed()
        self.dir = Path(cfg.run.dir)
        if dist_info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(to_yaml(cfg))
        barrier()
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.precision, why = precision_choice(cfg.trainer.precision, dist_info.device, cfg.kind, cfg.model.get("arch"))
        self.task = build_task(cfg, dist_info, self.precision)
        self.clock = Clock(images_per_step=cfg.data.batch_size * dist_info.world_size)
        self.checkpointer = Checkpointer(self.dir / "checkpoints", dist_info, cfg.trainer.keep_checkpoints)
        resume = cfg.trainer.resume
        resume_from = None if resume == "never" else (
            self.checkpointer.latest_verified() if resume == "auto" else Path(resume))
        data_state = restore(self.task, self.checkpointer, resume_from, self.clock, dist_info) if resume_from else None
        if dist_info.is_main and (aside := set_aside_after(self.dir, self.clock.step)):
            self.say(f"{aside[1]} checkpoint(s) and sample grid(s) of steps after {self.clock.step} (the step this run "
                     f"starts from) moved to {aside[0]}")
        barrier()
        self.shards = resolve_shards(cfg.data.shards)
        self.data = DataFeed(cfg, self.shards, dist_info, self.clock.step, data_state)
        self.logger = RunLogger(cfg, self.dir, enabled=dist_info.is_main, start_step=self.clock.step)
        self.live = LiveMetrics(cfg, dist_info, self.dir, self.checkpointer.best_record()) \
            if cfg.metrics.every_kimg > 0 else None
        self.quality: dict[str, float] = {}  # the last measurement, until it is logged
        self.stop = StopRequest()
        self.fault = NonFiniteFault()
        self.meter, self.skipped = Meter(), Counter()
        self.steps_since_log, self.tick = 0, time.perf_counter()
        self.nonfinite_in_row, self.rollbacks_in_row = 0, 0
        precision = f"{self.precision} ({why})" if why else self.precision
        self.say(f"{cfg.kind} run '{cfg.run.name}' in {self.dir}: {dist_info.world_size} process(es) on "
                 f"{dist_info.device.type}, {precision}, ZeRO-{cfg.trainer.zero_stage}, {len(self.shards)} shard(s), "
                 f"steps {self.clock.step}->{cfg.trainer.max_steps}")
        self.bar = tqdm(total=cfg.trainer.max_steps, initial=self.clock.step, unit="step", dynamic_ncols=True,
                        disable=not (dist_info.is_main and cfg.trainer.progress), mininterval=1.0, file=sys.stderr)

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(f"[gentrain] {message}", flush=True)

    def next_batch(self) -> dict:
        batch = self.fault.poison(self.data.next(), self.clock.step_number)
        self.skipped.update(batch.get("skipped", {}))
        return batch

    def record(self, scalars: dict[str, float]) -> None:
        """Account for one finished step."""
        self.meter.add(scalars)
        self.steps_since_log += 1
        self.bar.update(1)
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if "nonfinite_skipped" in scalars else 0

    def log_scalars(self) -> None:
        """Rank means of everything since the last log, throughput and skip counts; alerts."""
        elapsed = time.perf_counter() - self.tick
        means = self.meter.reduce(self.dist.device)
        means["samples_per_sec"] = self.steps_since_log * self.clock.images_per_step / max(elapsed, 1e-9)
        means["images_seen"] = self.clock.images_seen
        means.update({f"data/skipped_{k}": v for k, v in self.skipped.items()})
        means.update(self.quality)
        self.quality = {}
        self.logger.log(self.clock.step, means)
        self.raise_alerts(means)
        shown = {k: f"{v:.3g}" for k, v in means.items() if k in self.task.progress_keys}
        self.bar.set_postfix(shown | {"img/s": f"{means['samples_per_sec']:.0f}"}, refresh=False)
        self.steps_since_log, self.tick = 0, time.perf_counter()

    def raise_alerts(self, means: dict[str, float]) -> None:
        """A task reports `alert/<name>` > 0 when its diagnostics say the run is failing."""
        for key, value in means.items():
            if key.startswith("alert/") and value > 0 and self.dist.is_main:
                name = key[len("alert/"):].replace("_", " ")
                self.say(f"ALERT step {self.clock.step}: {name} ({key}={value:.2f})")
                self.logger.alert(f"gentrain: {name}", f"step {self.clock.step}: {key}={value:.2f} in run {self.dir}")

    def write_samples(self) -> None:
        if self.dist.is_main:
            for name, grid in self.task.samples().items():
                self.logger.log_image(self.clock.step, name, grid)

    def measure_quality(self) -> bool:
        """FD, KID, precision/recall, density/coverage of samples now; True if a new best."""
        self.quality, best = self.live.measure(self.task, self.clock)  # logged with this step's scalars
        return best

    def checkpoint(self, best: bool = False) -> bool:
        """All ranks write the checkpoint, unless some weights are non-finite (then none does);
        `best`: it also becomes checkpoints/best. False when nothing was written: a failed write
        (a full disk) leaves the previous checkpoint the latest, and the next cadence tries again."""
        if not weights_finite(self.dist.device, [e.module for e in self.task.engines.values()]):
            self.say(f"step {self.clock.step}: non-finite weights, checkpoint NOT written")
            return False
        meta = {"kind": self.cfg.kind, "precision": self.precision, "config": to_yaml(self.cfg),
                "wandb_id": self.logger.run_id}
        path = self.checkpointer.save(self.clock.step, self.task.engines, rank_state(self.task, self.clock, self.data),
                                      self.task.weights(), meta)
        if path is None:
            self.say(f"step {self.clock.step}: checkpoint NOT written ({self.checkpointer.last_error}); the latest "
                     f"is still {self.checkpointer.latest()}; the next checkpoint tries again")
            return False
        if best:
            self.checkpointer.keep_as_best(path, self.live.best_record(self.clock.step))
        self.rollbacks_in_row = 0
        return True

    def roll_back(self) -> None:
        """After too many non-finite steps in a row: back to the last checkpoint, with its data position."""
        bad_steps, self.nonfinite_in_row = self.nonfinite_in_row, 0
        self.rollbacks_in_row += 1
        if self.rollbacks_in_row > MAX_ROLLBACKS_IN_ROW:
            raise TrainingDiverged(f"rolled back {MAX_ROLLBACKS_IN_ROW} times to the same checkpoint and the "
                                   f"steps after it are still non-finite: stopping (lower the learning rate?)")
        path = self.checkpointer.latest_verified()
        if path is None:
            raise TrainingDiverged(f"{bad_steps} non-finite steps in a row and no checkpoint to roll back to")
        self.say(f"{bad_steps} non-finite steps in a row: rolling back to {path}")
        data_state = restore(self.task, self.checkpointer, path, self.clock, self.dist)
        self.data = DataFeed(self.cfg, self.shards, self.dist, self.clock.step, data_state)
        self.bar.reset(total=self.cfg.trainer.max_steps)
        self.bar.update(self.clock.step)

    def stop_for_requeue(self) -> int:
        self.say(f"signal {self.stop.signum}: checkpointed step {self.clock.step}, exiting "
                 f"with {REQUEUE_EXIT_CODE} (requeue me)")
        return REQUEUE_EXIT_CODE

    def close(self) -> None:
        self.bar.close()
        self.stop.restore()
        self.logger.close()

    def finish(self, exit_code: int) -> None:
        if exit_code == 0:
            self.say(f"done: {self.clock.step} steps; samples in {self.dir / 'samples'}, "
                     f"checkpoint {self.checkpointer.latest()}, metrics {self.dir / 'metrics.jsonl'}")
        barrier()
        shutdown()
