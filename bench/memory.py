"""Peak RSS over a long run: is memory flat after warm-up?

Each measurement runs in a fresh subprocess (``python -m bench.memory reader|trainer ...``) so
that its peak RSS is its own. RSS is sampled at regular intervals; ``slope_mib_per_1k`` is the
least-squares slope over the samples after the first 30% (warm-up: shuffle buffer filling,
allocator and oneDNN caches); ``flat`` means the fitted growth over the measured window is
under 2% of the RSS (or 2 MiB, whichever is larger).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import peak_rss_mib, rss_mib


def summarise(points: list[tuple[int, float]], unit: str) -> dict:
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    start = int(len(xs) * 0.3)
    slope = float(np.polyfit(xs[start:], ys[start:], 1)[0]) if len(xs) - start >= 2 else 0.0
    growth = slope * (xs[-1] - xs[start]) if len(xs) else 0.0
    return {
        f"{unit}s": int(xs[-1]) if len(xs) else 0,
        "rss_start_mib": float(ys[0]) if len(ys) else float("nan"),
        "rss_after_warmup_mib": float(ys[start]) if len(ys) else float("nan"),
        "rss_end_mib": float(ys[-1]) if len(ys) else float("nan"),
        "peak_rss_mib": peak_rss_mib(),
        "slope_mib_per_1k": slope * 1000,
        "growth_after_warmup_mib": growth,
        "flat": bool(abs(growth) <= max(2.0, 0.02 * float(ys[-1]))),
        "samples": [[int(x), round(float(y), 1)] for x, y in zip(xs[:: max(1, len(xs) // 20)], ys[:: max(1, len(ys) // 20)])],
    }


def reader_child(shards: str, size: int, batches: int) -> dict:
    from data_shards.stream import ShardStream

    stream = iter(ShardStream(shards, 64, image_size=size, channels=3, shuffle_buffer=512))
    points = []
    every = max(1, batches // 100)
    for i in range(1, batches + 1):
        next(stream)
        if i % every == 0:
            points.append((i, rss_mib()))
    return summarise(points, "batch")


def trainer_child(root: str, steps: int, batch_size: int) -> dict:
    """The GAN preset (two engines, EMA, lazy R1), fed real digits shards by the real reader,
    logging, samples and checkpoints at their default cadence."""
    import torch

    from bench.trainer import _LoopBody, setup
    from data_shards.build import build_shards
    from data_shards.stream import make_loader

    torch.set_num_threads(1)
    shards = Path(root) / "digits"
    if not (shards / "manifest.json").is_file():
        build_shards("digits", shards, progress=False)
    cfg, dist_info, task, logger = setup("gan", Path(root) / "memory-gan", overrides=[f"data.batch_size={batch_size}"])
    loader = iter(make_loader(str(shards), batch_size, num_workers=0, image_size=cfg.data.image_size,
                              channels=cfg.data.channels, shuffle_buffer=cfg.data.shuffle_buffer))
    loop = _LoopBody(cfg, task, logger, dist_info)
    points, out_errors = [], []
    every = max(1, steps // 100)
    for i in range(1, steps + 1):
        loop(next(loader))
        if i % cfg.trainer.sample_every == 0:
            try:
                for name, grid in task.samples().items():
                    logger.log_image(i, name, grid)
            except Exception as exn:  # noqa: BLE001 - reported, the memory figure still counts
                out_errors.append(f"samples at step {i}: {type(exn).__name__}: {exn}")
        if i % every == 0:
            points.append((i, rss_mib()))
    logger.close()
    out = summarise(points, "step")
    out["batch_size"] = batch_size
    if out_errors:
        out["errors"] = out_errors[:3]
    return out


def run(quick: bool, root: Path, reader_shards: Path, reader_size: int) -> dict:
    batches, steps = (20, 10) if quick else (4000, 1500)
    results = {}
    for name, args in (("reader", ["reader", str(reader_shards), str(reader_size), str(batches)]),
                       ("trainer", ["trainer", str(root), str(steps), "16"])):
        # A fresh process group: the parent's torch.distributed variables (its port) must not leak in.
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run([sys.executable, "-m", "bench.memory", *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            results[name] = json.loads(lines[-1])
    return results


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "reader":
        print(json.dumps(reader_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps(trainer_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
