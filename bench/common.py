"""Timing helpers: every figure is a ratio against a reference timed in the same process,
interleaved with it round by round, and summarised by the median over rounds.

In-process loops are timed in CPU seconds of the calling thread (``time.thread_time``): that is
"images/s per core" exactly, and it does not count the time this process waits for a core on
a shared, loaded machine (wall-clock rounds there swing by 2-3x, CPU time far less)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size (VmHWM) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def interleaved(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Run each fn once per round, in a rotating order; return CPU seconds (this thread) per
    item, per round. Each fn does a fixed amount of work and returns how many items it processed.
    """
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.thread_time()
            n = fns[name]()
            out[name].append((time.thread_time() - t0) / max(n, 1))
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r] (paired: the two ran side by side)."""
    return statistics.median(a / b for a, b in zip(num, den))


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_timed(fns: dict[str, Callable[[], float]], rounds: int, items: int) -> dict[str, list[float]]:
    """Like :func:`interleaved`, for fns that time themselves (return seconds for ``items``)."""
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(fns[name]() / items)
    return out


def digit_shards(work: Path) -> Path:
    """scikit-learn's digits as shards under work/digits, built once."""
    from data_shards.build import build_shards

    shards = Path(work) / "digits"
    if not (shards / "manifest.json").is_file():
        build_shards("digits", shards, progress=False)
    return shards


def job_env() -> dict[str, str]:
    """This process's environment for a child gentrain job, less the torch.distributed variables:
    the child starts a process group of its own, and the parent's port must not leak in."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
