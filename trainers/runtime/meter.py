"""Accumulate per-step scalars between logs; reduce across ranks once per log interval."""
from __future__ import annotations

from collections import Counter

import torch

from trainers.runtime.distributed import all_reduce_mean

# Scalars that count events over steps (summed over steps, not averaged). Ranks agree on them
# (the decision to skip a step is collective), so the mean over ranks is the count.
COUNT_KEYS = ("nonfinite_skipped",)


class Meter:
    """Averages each scalar over the steps that reported it; counts are summed."""

    def __init__(self):
        self.sums: Counter = Counter()
        self.counts: Counter = Counter()

    def add(self, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means over steps and ranks (every rank must call this at the same step)."""
        local = {k: (self.sums[k] if k in COUNT_KEYS else self.sums[k] / self.counts[k]) for k in self.sums}
        # Every rank must reduce the same keys: ask for the ones any task can report.
        for key in COUNT_KEYS:
            local.setdefault(key, 0.0)
        means = all_reduce_mean(local, device)
        self.sums.clear()
        self.counts.clear()
        return means
