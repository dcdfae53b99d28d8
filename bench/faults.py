"""Fault-injection benchmark: kill -9 a 2-process run at random moments, resume, compare bitwise.

    python -m bench.faults --trials 20 --preset gan          (make bench-faults)

Each trial starts the run, picks a checkpoint step at random, waits until that checkpoint is
written, then a further random moment before the next one is (mid-step, mid-log, mid-save of
the next checkpoint: up to CKPT_EVERY steps at the reference run's speed),
kills every process of the job at once (launcher, torchrun, trainers, loader workers, W&B's
service: the whole tree, each by pid, as a machine crash would; a signal to the launcher's
process group would miss torchrun's workers, which have sessions of their own), checks that
none survives, relaunches the same command (which resumes by itself) and compares every tensor
of the final checkpoint (weights, EMA, each rank's optimizer state) with the uninterrupted run's.
Results: bench/faults.json and a line per trial on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainers.runtime.abort import parent_pids, pid_alive
from trainers.runtime.checkpoint import differing_tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
CKPT_EVERY = 4


def gentrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def launch_cmd(preset: str, run_dir: Path, shards: Path) -> list[str]:
    return gentrain("launch", "--nproc-per-node", "2", f"configs/{preset}_digits.yaml", f"run.dir={run_dir}",
                    f"data.shards={shards}", "data.batch_size=16", "data.shuffle_buffer=64", "trainer.log_every=5",
                    "trainer.sample_every=10", f"trainer.ckpt_every={CKPT_EVERY}", "trainer.progress=false",
                    f"trainer.max_steps={STEPS}", "wandb.mode=disabled")


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def run_quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed_run(cmd: list[str], run_dir: Path) -> tuple[float, float]:
    """Run to the end; return (seconds to the first checkpoint, seconds in all)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None and latest(run_dir) is not None:
            first = time.perf_counter() - started
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed with exit code {proc.returncode}")
    total = time.perf_counter() - started
    return first or total, total


# ---- killing a whole job, as a machine crash would --------------------------------------------------
def process_tree(root: int) -> list[int]:
    """`root` and every process below it (torchrun's workers are in sessions of their own, so a
    process group does not find them; the parent links do)."""
    parents, tree = parent_pids(), [root]
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def kill_whole_job(root: int) -> list[int]:
    """SIGKILL every process of the job under `root` at once, each by pid, as a machine crash would.

    Each process is first stopped (SIGSTOP) so that none can start another or notice the others
    dying (parent-death signals, watchdogs) while the tree is collected; then all are killed.
    Returns the pids killed.
    """
    stopped: list[int] = []
    for _ in range(50):
        new = [pid for pid in process_tree(root) if pid not in stopped and pid_alive(pid)]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stopped


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (e.g. a run directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read() and pid_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def wait_all_gone(pids: list[int], timeout: float, mentioning: str | None = None) -> list[int]:
    """Poll /proc until none of `pids` (nor any process mentioning `mentioning`) is alive; the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        survivors = [pid for pid in pids if pid_alive(pid)] + (processes_mentioning(mentioning) if mentioning else [])
        if not survivors or time.monotonic() > deadline:
            return sorted(set(survivors))
        time.sleep(0.05)


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


def trial(preset: str, work: Path, shards: Path, reference: Path, rng: random.Random, window: float) -> dict:
    run_dir = work / "interrupted"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.Popen(launch_cmd(preset, run_dir, shards), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = rng.choice(range(CKPT_EVERY, STEPS, CKPT_EVERY))
    while step_of(latest(run_dir)) < target and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, window))
    finished_first = proc.poll() is not None
    killed = [] if finished_first else kill_whole_job(proc.pid)
    proc.wait()
    survivors = wait_all_gone(killed, 10.0, mentioning=f"run.dir={run_dir}")
    if survivors:
        raise RuntimeError(f"processes of the killed job still alive: {survivors}")
    killed_after = latest(run_dir).name if latest(run_dir) else None
    run_quiet(launch_cmd(preset, run_dir, shards))
    differing = differing_tensors(latest(reference), latest(run_dir))
    return {"target_checkpoint": target, "killed_after_checkpoint": killed_after,
            "killed_at_seconds": round(time.perf_counter() - started, 2), "processes_killed": len(killed),
            "finished_before_kill": finished_first, "matched": not differing, "differing_tensors": len(differing)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--preset", choices=["vae", "gan"], default="gan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "faults.json"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gentrain-faults-"))
    shards = work / "digits"
    run_quiet(gentrain("shards", "build", "digits", "--out", str(shards), "--quiet"))
    reference = work / "reference"
    first_ckpt, duration = timed_run(launch_cmd(args.preset, reference, shards), reference)
    # kill within one checkpoint interval after the target checkpoint (later, the run may be over)
    window = CKPT_EVERY * (duration - first_ckpt) / (STEPS - CKPT_EVERY)
    print(f"uninterrupted {args.preset} run: {STEPS} steps in {duration:.1f} s (first checkpoint at "
          f"{first_ckpt:.1f} s)", flush=True)

    results = []
    for i in range(args.trials):
        result = trial(args.preset, work, shards, reference, rng, window)
        results.append(result)
        print(f"trial {i + 1:2d}: {result['processes_killed']} processes killed after "
              f"{result['killed_after_checkpoint']} at {result['killed_at_seconds']} s"
              f" -> {'bitwise identical' if result['matched'] else 'DIFFERENT'}", flush=True)
    matched = sum(r["matched"] for r in results)
    summary = {"preset": args.preset, "steps": STEPS, "trials": len(results), "matched_exactly": matched,
               "machine": f"{os.cpu_count()} cores", "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"{matched} of {len(results)} resumed runs bitwise identical to the uninterrupted run -> {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if matched == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
