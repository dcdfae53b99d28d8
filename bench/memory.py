"""Peak RSS over a long run: is memory flat after warm-up?

``python -m bench.memory reader SHARDS SIZE BATCHES [--workers N]`` and
``python -m bench.memory trainer WORK STEPS [--batch-size B] [--base-channels C] [key=value ...]``.

* reader: a ``ShardStream`` (shuffle buffer 512, batch 64) in a fresh subprocess, RSS sampled
  every 1% of the batches. With ``--workers N``, ``make_loader`` with N DataLoader workers
  (their reused shared-memory slabs included, data_shards.slabs) and the RSS summed over the
  main process and its workers (a slab's pages count in both: the sum is for flatness, not a
  total).
* trainer: the real trainer, ``gentrain train configs/vae_digits.yaml`` (DeepSpeed engine,
  logging, diagnostics, sample grids, checkpoints at the preset's cadence, the real shard
  reader), as its own process on the digits shards; this process samples the trainer's RSS
  from /proc every 0.5 s and reads its step from metrics.jsonl. A small model and batch
  (``--base-channels``, ``--batch-size``) keep 10,000 steps within reach of a CPU.

``slope_mib_per_1k`` is the least-squares slope over the samples after the first 30% (warm-up:
shuffle buffer filling, allocator and oneDNN caches); ``flat`` means the fitted growth over the
measured window is under 2% of the RSS (or 2 MiB, whichever is larger).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import digit_shards, job_env, peak_rss_mib, rss_mib

ROOT = Path(__file__).resolve().parent.parent


def summarise(points: list[tuple[int, float]], unit: str, peak: float | None = None) -> dict:
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    start = int(len(xs) * 0.3)
    slope = float(np.polyfit(xs[start:], ys[start:], 1)[0]) if len(set(xs[start:])) >= 2 else 0.0
    growth = slope * (xs[-1] - xs[start]) if len(xs) else 0.0
    every = max(1, len(xs) // 20)
    return {
        f"{unit}s": int(xs[-1]) if len(xs) else 0,
        "rss_start_mib": float(ys[0]) if len(ys) else float("nan"),
        "rss_after_warmup_mib": float(ys[start]) if len(ys) else float("nan"),
        "rss_end_mib": float(ys[-1]) if len(ys) else float("nan"),
        "peak_rss_mib": peak_rss_mib() if peak is None else peak,
        "slope_mib_per_1k": slope * 1000,
        "growth_after_warmup_mib": growth,
        "flat": bool(len(ys) and abs(growth) <= max(2.0, 0.02 * float(ys[-1]))),
        "samples": [[int(x), round(float(y), 1)] for x, y in zip(xs[::every], ys[::every])],
    }


def reader_child(shards: str, size: int, batches: int, workers: int = 0) -> dict:
    from data_shards.loader import make_loader
    from data_shards.stream import ShardStream

    if workers:
        stream = iter(make_loader(shards, 64, num_workers=workers, image_size=size, channels=3, shuffle_buffer=512))
    else:
        stream = iter(ShardStream(shards, 64, image_size=size, channels=3, shuffle_buffer=512))

    def rss() -> tuple[float, float]:  # (RSS, peak RSS) of this process and its workers, MiB
        total, peak = rss_mib(), peak_rss_mib()
        for worker in getattr(stream, "_workers", []):
            status = _proc_status_mib(worker.pid)
            if status is not None:
                total, peak = total + status[0], peak + status[1]
        return total, peak

    points = []
    peak = 0.0
    every = max(1, batches // 100)
    for i in range(1, batches + 1):
        next(stream)
        if i % every == 0:
            now, high = rss()
            points.append((i, now))
            peak = max(peak, high)
    out = summarise(points, "batch", peak)
    out["shuffle_buffer"], out["batch_size"], out["workers"] = 512, 64, workers
    return out


def _proc_status_mib(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a live process, MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _last_step(metrics: Path) -> int | None:
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def trainer_run(work: Path, steps: int, batch_size: int = 8, base_channels: int = 8,
                overrides: list[str] | None = None, config: str = "configs/vae_digits.yaml",
                trace: Path | None = None) -> dict:
    """RSS of a real ``gentrain train`` process over ``steps`` steps (see the module doc).
    ``trace``: also append each (step, RSS MiB, VmHWM MiB, seconds) sample there as it is taken."""
    shards = digit_shards(work)
    run_dir = Path(work) / f"memory-trainer-{steps}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"run.dir={run_dir}", f"data.shards={shards}", f"trainer.max_steps={steps}",
            f"data.batch_size={batch_size}", f"model.base_channels={base_channels}", "trainer.progress=false",
            *(overrides or [])]
    env = job_env()
    env.setdefault("WANDB_MODE", "offline")
    log = run_dir.parent / f"memory-trainer-{steps}.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", config, *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        points: list[tuple[int, float]] = []
        peak = 0.0
        while proc.poll() is None:
            status = _proc_status_mib(proc.pid)
            step = _last_step(run_dir / "metrics.jsonl")
            if status is not None:
                peak = max(peak, status[1])
                if step is not None:
                    points.append((step, status[0]))
                    if trace is not None:
                        with open(trace, "a") as f:
                            f.write(f"{step} {status[0]:.1f} {status[1]:.1f} {time.perf_counter() - started:.1f}\n")
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or len(points) < 2:
        return {"error": f"exit {proc.returncode}: " + log.read_text(errors="replace")[-2000:]}
    out = summarise(points, "step", peak)
    out.update({"batch_size": batch_size, "base_channels": base_channels, "config": config,
                "overrides": overrides or [], "seconds": seconds, "steps_done": _last_step(run_dir / "metrics.jsonl")})
    return out


def run(quick: bool, root: Path, reader_shards: Path, reader_size: int, batches: int | None = None,
        steps: int | None = None, trainer_overrides: list[str] | None = None) -> dict:
    """Reader over ``batches`` batches and the real trainer over ``steps`` steps."""
    batches = batches or (20 if quick else 4000)
    steps = steps or (30 if quick else 1500)
    results = {}
    env = job_env()
    for name, workers in (("reader", 0), ("reader, 2 workers", 2)):
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "reader", str(reader_shards), str(reader_size),
                               str(batches), "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT,
                              env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        results[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "error": (proc.stderr or proc.stdout)[-2000:]}
    results["trainer"] = trainer_run(root, steps, overrides=trainer_overrides)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    reader = sub.add_parser("reader")
    reader.add_argument("shards")
    reader.add_argument("size", type=int)
    reader.add_argument("batches", type=int)
    reader.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: in-process)")
    trainer = sub.add_parser("trainer")
    trainer.add_argument("work")
    trainer.add_argument("steps", type=int)
    trainer.add_argument("--batch-size", type=int, default=8)
    trainer.add_argument("--base-channels", type=int, default=8)
    trainer.add_argument("--out", default=None, help="also write the JSON here")
    trainer.add_argument("--trace", default=None, help="append each RSS sample here as it is taken")
    args, overrides = parser.parse_known_args(argv)  # the rest: key=value config overrides (trainer)
    if overrides and (args.kind != "trainer" or any("=" not in o for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.kind == "reader":
        result = reader_child(args.shards, args.size, args.batches, args.workers)
    else:
        result = trainer_run(Path(args.work), args.steps, args.batch_size, args.base_channels, overrides,
                             trace=Path(args.trace) if args.trace else None)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
