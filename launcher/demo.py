"""`make demo`: build the digit shards, train a VAE then a GAN on 2 processes, check the samples,
and compare the two in one page (runs/demo-report.html, `gentrain report`).

Each phase is the real command a user would type (printed before it runs); the summary at the
end gives phase times, throughput, peak memory, how many digit classes the samples cover, and
the path of the report.
"""
from __future__ import annotations

import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path("data/digits")
RUNS = {"vae": Path("runs/demo-vae"), "gan": Path("runs/demo-gan")}
REPORT = Path("runs/demo-report.html")
NPROC = 2


def run(cmd: list[str]) -> float:
    """Run a command, streaming its output; return its wall time."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        sys.exit(f"demo: command failed with exit code {code}: {shlex.join(cmd)}")
    return time.perf_counter() - started


def throughput(run_dir: Path) -> float:
    """Median samples/s over the run's log intervals (the first interval includes warm-up)."""
    rates = [json.loads(line)["samples_per_sec"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:] or rates)


def main() -> int:
    gentrain = [sys.executable, "-m", "launcher.cli"]
    times = {}
    started = time.perf_counter()
    if not (DATA / "manifest.json").exists():
        times["build shards"] = run(gentrain + ["shards", "build", "digits", "--out", str(DATA)])
    for kind, run_dir in RUNS.items():
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
        times[f"train {kind.upper()}"] = run(gentrain + ["launch", "--nproc-per-node", str(NPROC),
                                                         f"configs/{kind}_digits.yaml", f"run.name={run_dir.name}"])

    print("\nChecking the samples with a digit classifier trained on the real shards...", flush=True)
    t0 = time.perf_counter()
    from trainers.judge.probe import ClassProbe

    probe = ClassProbe(DATA, image_size=32, channels=1)
    coverage = {}
    for kind, run_dir in RUNS.items():
        npz = run_dir / "samples.npz"
        run(gentrain + ["sample", str(run_dir), "--n", "1000", "--out", str(npz)])
        images = np.load(npz)["images"].transpose(0, 3, 1, 2)
        coverage[kind] = probe.coverage(images).as_dict()
    times["sample + check"] = time.perf_counter() - t0
    # The comparison the project exists for: one page, both runs on the same images, claims table included.
    times["report"] = run(gentrain + ["report", *map(str, RUNS.values()), "--out", str(REPORT)])
    total = time.perf_counter() - started

    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = {
        "phase_seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(total, 1),
        "samples_per_sec": {k: round(throughput(d), 1) for k, d in RUNS.items()},
        "peak_rss_mb_largest_process": round(peak_rss_mb, 1),
        "probe_held_out_accuracy": round(probe.held_out_accuracy, 4),
        "class_coverage": coverage,
        "report": str(REPORT),
    }
    Path("runs/demo-summary.json").write_text(json.dumps(summary, indent=2))

    print("\n=== gentrain demo: done ===")
    for phase, secs in times.items():
        print(f"  {phase:<16} {secs:7.1f} s")
    print(f"  {'total':<16} {total:7.1f} s   (peak memory of the largest process: {peak_rss_mb:.0f} MB)")
    for kind, run_dir in RUNS.items():
        cov = coverage[kind]
        freqs = " ".join(f"{c}:{f:.2f}" for c, f in cov["class_frequencies"].items())
        grids = sorted((run_dir / "samples").glob("samples-*.png"))
        print(f"\n  {kind.upper()}: {throughput(run_dir):.0f} samples/s on {NPROC} processes; "
              f"{cov['classes_covered']}/{cov['num_classes']} digit classes in 1,000 samples (probe accuracy "
              f"{probe.held_out_accuracy:.0%} on held-out real digits)\n    class shares {freqs}\n"
              f"    samples:     {grids[-1] if grids else '-'}\n"
              f"    metrics:     {run_dir / 'metrics.jsonl'}\n"
              f"    checkpoint:  {run_dir / 'checkpoints'}\n"
              f"    W&B offline: {run_dir / 'wandb'}  (upload later: wandb sync {run_dir}/wandb/offline-run-*)")
    print("\n  summary: runs/demo-summary.json")
    print(f"  report:  {REPORT.resolve()}  (open it in a browser; the claims table is printed above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
