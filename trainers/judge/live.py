"""Sample quality measured during training (StyleGAN2-ADA and StudioGAN do the same).

Every `metrics.every_kimg` thousand images, each rank generates its share of
`metrics.num_samples` images and computes their features; rank 0 gathers them, compares them
with the cached features of the real images (trainers.judge.quality) and logs
`quality/fd_<extractor>`, `quality/kid_<extractor>`, ... The checkpoint with the lowest
`metrics.best` so far is kept as `checkpoints/best`.

Generation uses its own seeded generator and the extractor is deterministic, so measuring
changes nothing in training: a run with metrics on trains bitwise as one without.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from trainers.judge.extractors import compute_features
from trainers.judge.quality import METRICS, reference_features, run_extractor, set_metrics
from trainers.runtime.clock import Clock
from trainers.runtime.distributed import any_rank, barrier


class LiveMetrics:
    """The in-training measurement: when it is due, what it logs, whether it is a new best."""

    def __init__(self, cfg, dist_info, run_dir, best_so_far: dict | None):
        m = cfg.metrics
        self.cfg, self.dist, self.every_images = cfg, dist_info, m.every_kimg * 1000
        # The run's own domain extractor is fitted once, by rank 0, before the others load it.
        if dist_info.is_main:
            self.extractor = run_extractor(m.extractor, run_dir, cfg)
        barrier()
        if not dist_info.is_main:
            self.extractor = run_extractor(m.extractor, run_dir, cfg)
        self.best_key = f"{m.best}_{self.extractor.name}" if m.best else None
        self.best = float(best_so_far["value"]) if best_so_far and best_so_far.get("metric") == self.best_key \
            else math.inf
        self.real = reference_features(m.shards or cfg.data.shards, self.extractor, m.num_samples,
                                       cfg.data.image_size, cfg.data.channels) if dist_info.is_main else None
        self.mark = None

    def due(self, clock: Clock, last: bool) -> bool:
        """True when images seen crossed a multiple of every_kimg since the last measurement, and
        at the end of training."""
        mark = int(clock.images_seen // self.every_images)
        if self.mark is None:
            self.mark = int((clock.images_seen - clock.images_per_step) // self.every_images)
        due = mark > self.mark or last
        self.mark = mark
        return due

    def measure(self, task, clock: Clock) -> tuple[dict[str, float], bool]:
        """(the scalars to log, on rank 0; whether this is a new best, on every rank)."""
        start = time.perf_counter()
        world, rank = self.dist.world_size, self.dist.rank
        share = -(-self.cfg.metrics.num_samples // world)
        images = task.generate(share, seed=self.cfg.run.seed * 7919 + rank)
        feats = compute_features(self.extractor, images).astype(np.float32)
        if world > 1:
            gathered = [None] * world if self.dist.is_main else None
            dist.gather_object(feats, gathered, dst=0)
            feats = np.concatenate(gathered) if self.dist.is_main else None
        values, improved = {}, False
        if self.dist.is_main:
            fake = feats[: self.cfg.metrics.num_samples]
            values = {f"quality/{k}": v for k, v in
                      set_metrics(self.real, fake, METRICS, self.extractor.name, seed=self.cfg.run.seed).items()}
            current = values.get(f"quality/{self.best_key}") if self.best_key else None
            improved = current is not None and current < self.best
            if improved:
                self.best = current
            values["quality/seconds"] = time.perf_counter() - start
        return values, any_rank(improved, self.dist.device)

    def best_record(self, step: int) -> dict:
        return {"step": step, "metric": self.best_key, "value": self.best}
