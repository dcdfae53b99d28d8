"""Training throughput with 1 and 2 processes on one machine (`gentrain launch --nproc-per-node K`).

Each run is a real job: ``python -m launcher.cli launch --nproc-per-node K CONFIG`` (torchrun,
gloo, DeepSpeed, the shard reader, logging and checkpoints at the preset's cadence), with the
same per-process batch (weak scaling: K processes see K x the samples per step). Throughput is
measured from rank 0's metrics.jsonl timestamps between the first and the last logged step, so
process start-up, DeepSpeed initialisation and the final checkpoint are left out; the figure
is samples/s over the whole job (per-process batch x K x steps / seconds).

``efficiency_vs_linear`` = samples/s with 2 processes / (2 x samples/s with 1 process).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import digit_shards, job_env

ROOT = Path(__file__).resolve().parent.parent


def _throughput(metrics: Path, batch_per_process: int, nproc: int) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.startswith("{")]
    rows = [r for r in rows if "time" in r and "step" in r]
    first, last = rows[0], rows[-1]
    steps = last["step"] - first["step"]
    seconds = last["time"] - first["time"]
    return {"steps_timed": steps, "seconds_timed": seconds,
            "steps_per_s": steps / seconds, "samples_per_s": steps * batch_per_process * nproc / seconds}


def train_job(work: Path, nproc: int, steps: int, config: str, batch_size: int, overrides: list[str]) -> dict:
    shards = digit_shards(work)
    run_dir = Path(work) / f"scaling-{nproc}proc"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"run.dir={run_dir}", f"data.shards={shards}", f"trainer.max_steps={steps}",
            f"data.batch_size={batch_size}", "trainer.progress=false", "trainer.log_every=10",
            f"trainer.ckpt_every={steps}", f"trainer.sample_every={steps}", *overrides]
    env = job_env()
    env.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "--nproc-per-node", str(nproc), config,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    out = _throughput(run_dir / "metrics.jsonl", batch_size, nproc)
    out.update({"nproc": nproc, "batch_per_process": batch_size, "steps": steps, "wall_s": wall,
                "load_avg_before": load_before, "load_avg_after": os.getloadavg()})
    return out


def run(quick: bool, work: Path, steps: int | None = None, config: str = "configs/vae_digits.yaml",
        batch_size: int = 64, overrides: list[str] | None = None) -> dict:
    steps = steps or (20 if quick else 200)
    jobs = {f"{n}_proc": train_job(work, n, steps, config, batch_size, overrides or []) for n in (1, 2)}
    out: dict = {"config": config, "overrides": overrides or [], "jobs": jobs}
    if all("error" not in j for j in jobs.values()):
        one, two = jobs["1_proc"]["samples_per_s"], jobs["2_proc"]["samples_per_s"]
        out["speedup_1_to_2_processes"] = two / one
        out["efficiency_vs_linear"] = two / (2 * one)
    return out


if __name__ == "__main__":
    print(json.dumps(run(False, Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None,
                         overrides=sys.argv[3:]), indent=2))
