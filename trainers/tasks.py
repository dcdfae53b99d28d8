"""The Task contract and the registry of task kinds.

A task owns its networks' DeepSpeed engines and knows one training step; the loop
(trainers.loop) owns everything around it and never names a kind. A new kind of trainer is
one file holding a class that satisfies `Task`, plus one line in `TASKS`.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig

from trainers.runtime.clock import Clock
from trainers.runtime.distributed import DistInfo


class Task(Protocol):
    engines: dict
    """DeepSpeed engines by name; each is checkpointed in its own sub-folder under that name."""
    may_start_fresh: tuple[str, ...]
    """Engines a resumed run may find missing from its checkpoint (a part switched on since):
    they keep their fresh initialisation. Any other missing engine is an error."""
    progress_keys: tuple[str, ...]
    """Scalars shown beside the progress bar."""

    def train_step(self, batch: dict, clock: Clock) -> dict[str, float]:
        """One optimizer step on this rank's batch; returns scalars (rank-local, the loop averages).

        Returns {"nonfinite_skipped": 1.0} (and nothing else) when the step was skipped
        because a loss was not finite on some rank. Called on every rank at the same steps:
        it may run collectives."""

    def generate(self, n: int, seed: int) -> np.ndarray:
        """n samples as uint8 NCHW images from a generator seeded with `seed` (in-training metrics);
        must not draw from the training's random streams."""

    def samples(self) -> dict[str, np.ndarray]:
        """Named uint8 image grids (H, W, C) for W&B and samples/; called on rank 0 only."""

    def state(self) -> dict:
        """This rank's task state beyond the engines (noise generators, adaptive values)."""

    def load_state(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        """Restore `state()` and anything kept only in the fp32 weights file (such as an EMA)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Every network's weights under `<engine or copy>.<parameter>`: the weights file."""


def _vae(cfg, dist_info, precision):
    from trainers.vae.task import VAETask
    return VAETask(cfg, dist_info, precision)


def _gan(cfg, dist_info, precision):
    from trainers.gan.task import GANTask
    return GANTask(cfg, dist_info, precision)


def _paired(cfg, dist_info, precision):
    from trainers.paired.task import PairedTask
    return PairedTask(cfg, dist_info, precision)


# kind (the config's top-level `kind`) -> constructor. Imported on use, so a run pays only for its own kind.
TASKS = {
    "vae": _vae,
    "gan": _gan,
    "paired": _paired,
}


def build_task(cfg: DictConfig, dist_info: DistInfo, precision: str) -> Task:
    """The task the config's `kind` names, with its engines built."""
    return TASKS[cfg.kind](cfg, dist_info, precision)
