"""What a rank saves beside the engines, and how a run picks up from it: counters, data
position and every random number generator the run draws from."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from trainers.runtime.checkpoint import Checkpointer
from trainers.runtime.clock import Clock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_state(task, clock: Clock, data) -> dict:
    """What this rank needs to continue: counters, data position and every RNG it draws from."""
    return {
        **clock.state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": numpy_rng_state(),
        "task": task.state(),
        "data": data.state(),
    }


def restore(task, checkpointer: Checkpointer, path: Path, clock: Clock, dist_info) -> dict | None:
    """Load a checkpoint into the task, the clock and the RNGs; return the data stream's state."""
    state, weights = checkpointer.load(path, task.engines, task.may_start_fresh)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "numpy_rng" in state:
        set_numpy_rng_state(state["numpy_rng"])
    task.load_state(state["task"], weights)
    clock.step, clock.images_seen = int(state["step"]), int(state["images_seen"])
    if dist_info.is_main:
        print(f"[gentrain] resumed from {path} at step {clock.step}", flush=True)
    return state.get("data")


def numpy_rng_state() -> dict:
    """NumPy's global RNG state as tensors and ints, so it loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
