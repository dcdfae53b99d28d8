"""Mode-collapse benchmarks: ring8 and grid25 (VEEGAN/PacGAN protocol) and Stacked MNIST.

    python -m bench.gan_modes --bench ring8 --seeds 5     # or grid25, stacked

Each seed is a real run of the command line: `gentrain shards build` (once), `gentrain train`
on the preset (configs/gan_ring8.yaml, gan_grid25.yaml, gan_stacked_digits.yaml), then
`gentrain sample` from the EMA generator, scored here:

- ring8 / grid25: 2,500 samples; a sample is high quality within 3 std of a mode; a mode is
  captured with at least one such sample (VEEGAN, PacGAN).
- stacked: 26,000 samples; each channel classified by a digit probe fitted on the stacked
  shards' own channels (trainers.gan.diagnostics.StackedDigitsProbe); modes covered of 1,000
  and KL(generated mode frequencies || uniform).

Results are merged into bench/gan_modes.json (one entry per benchmark, per-seed figures) and
the table bench/gan_modes.md is rewritten from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

BENCHES = {
    "ring8": {"source": "ring8", "preset": "configs/gan_ring8.yaml", "samples": 2500},
    "grid25": {"source": "grid25", "preset": "configs/gan_grid25.yaml", "samples": 2500},
    "stacked": {"source": "stacked-digits", "preset": "configs/gan_stacked_digits.yaml", "samples": 26000},
}

PUBLISHED = {
    "ring8": [("GAN (VEEGAN table)", "1 / 8", "—"), ("PacGAN4", "7.8 / 8", "—")],
    "grid25": [("GAN (PacGAN table)", "17.3 / 25", "—"), ("PacGAN4", "24.8 / 25", "—"),
               ("VEEGAN", "—", "40% high quality")],
    "stacked": [("DCGAN (VEEGAN table)", "99 / 1000", "—"), ("PacDCGAN2", "1000 / 1000", "KL 0.06")],
}
TARGETS = {"ring8": "8/8 modes, >90% HQ, every seed", "grid25": "25/25 modes, >90% HQ, every seed",
           "stacked": "1000/1000 modes, KL < 0.06"}


def gentrain(*args, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"gentrain {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def score(bench: str, npz: Path, shards: Path) -> dict:
    from trainers.gan.diagnostics import PointModes, StackedDigitsProbe

    data = np.load(npz)
    if bench == "stacked":
        images = data["images"].transpose(0, 3, 1, 2)  # NHWC -> NCHW
        # The probe reads the shards at the generator's resolution (the preset's data.image_size).
        probe = StackedDigitsProbe(str(shards), images.shape[-1])
        s = probe.score(images)
        return {"modes": int(s["modes"]), "kl_to_uniform": round(s["kl_to_real"], 4),
                "probe_accuracy": round(probe.held_out_accuracy, 4)}
    s = PointModes(BENCHES[bench]["source"]).score(data["points"])
    return {"modes": int(s["modes"]), "high_quality": round(s["high_quality"], 4)}


def run_seed(bench: str, seed: int, work: Path, shards: Path, overrides: list[str], threads: int = 1) -> dict:
    """One seed: train the preset, sample from its EMA generator, score the samples."""
    spec = BENCHES[bench]
    env = {"OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    run_dir = work / "runs" / f"{bench}-seed{seed}"
    t0 = time.perf_counter()
    gentrain("train", spec["preset"], f"run.seed={seed}", f"run.dir={run_dir}", f"data.shards={shards}",
             "trainer.resume=never", "trainer.progress=false", "wandb.mode=disabled", *overrides, env=env)
    train_s = time.perf_counter() - t0
    npz = run_dir / "bench_samples.npz"
    gentrain("sample", run_dir, "--n", spec["samples"], "--out", npz, "--seed", 1000 + seed, env=env)
    result = {"seed": seed, **score(bench, npz, shards), "train_seconds": round(train_s, 1),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps({"bench": bench, **result}), flush=True)
    return result


def default_jobs(bench: str) -> int:
    """Seeds trained at once: one a core for the MLP benchmarks (one thread each), one for stacked."""
    return 1 if bench == "stacked" else max(1, os.cpu_count() or 1)


def run_bench(bench: str, seeds: int, work: Path, overrides: list[str], jobs: int = 1) -> dict:
    spec = BENCHES[bench]
    start, load_start = time.perf_counter(), os.getloadavg()
    shards = work / "data" / spec["source"]
    if not (shards / "manifest.json").exists():
        gentrain("shards", "build", spec["source"], "--out", shards, "--quiet")
    jobs = max(1, min(jobs, seeds))
    threads = max(1, (os.cpu_count() or 1) // jobs)  # the cores shared out: more threads than cores only contend
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        per_seed = list(pool.map(lambda s: run_seed(bench, s, work, shards, overrides, threads), range(seeds)))
    summary = {"modes_mean": statistics.mean(r["modes"] for r in per_seed),
               "modes_min": min(r["modes"] for r in per_seed)}
    if bench == "stacked":
        summary["kl_mean"] = statistics.mean(r["kl_to_uniform"] for r in per_seed)
    else:
        summary["high_quality_mean"] = statistics.mean(r["high_quality"] for r in per_seed)
        summary["high_quality_min"] = min(r["high_quality"] for r in per_seed)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)  # the whole command: build, train, sample, score
    summary["jobs"], summary["threads_per_job"] = jobs, threads
    summary["load_avg_start"] = [round(x, 2) for x in load_start]
    summary["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min: the machine is shared
    return {"preset": spec["preset"], "samples": spec["samples"], "overrides": overrides, "seeds": per_seed,
            "summary": summary, "target": TARGETS[bench], "published": PUBLISHED[bench]}


def markdown(results: dict) -> str:
    lines = ["# GAN mode-collapse benchmarks", "",
             "Written by `python -m bench.gan_modes`; figures in bench/gan_modes.json.", ""]
    for bench, r in results.items():
        lines += [f"## {bench} ({r['preset']}, {r['samples']} samples, target: {r['target']})", ""]
        if "wall_seconds" in r["summary"]:
            jobs = f", {r['summary']['jobs']} at a time" if "jobs" in r["summary"] else ""
            load = f", load average {r['summary']['load_avg_end'][1]:.1f} (5 min) at the end" \
                if "load_avg_end" in r["summary"] else ""
            lines += [f"{len(r['seeds'])} seed(s){jobs} in {r['summary']['wall_seconds'] / 60:.1f} min wall{load}.", ""]
        if bench == "stacked":
            lines += ["| | modes | KL to uniform |", "|---|---|---|"]
            for s in r["seeds"]:
                lines.append(f"| gentrain seed {s['seed']} | {s['modes']} / 1000 | {s['kl_to_uniform']:.3f} |")
        else:
            k = 8 if bench == "ring8" else 25
            lines += ["| | modes | high quality |", "|---|---|---|"]
            for s in r["seeds"]:
                lines.append(f"| gentrain seed {s['seed']} | {s['modes']} / {k} | {100 * s['high_quality']:.1f}% |")
        for name, modes, other in r["published"]:
            lines.append(f"| {name} (published) | {modes} | {other} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", choices=sorted(BENCHES), required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--work", default="runs/bench_gan_modes", help="data and run directories")
    p.add_argument("--out", default="bench/gan_modes.json")
    p.add_argument("--jobs", type=int, default=None,
                   help="seeds trained at once (default: the CPU count for ring8/grid25, 1 for stacked)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides passed to every run")
    args = p.parse_args(argv)
    out = ROOT / args.out
    jobs = args.jobs or default_jobs(args.bench)
    result = run_bench(args.bench, args.seeds, (ROOT / args.work).resolve(), args.overrides, jobs)
    # Read the file only now: another benchmark may have written its entry while this one ran.
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.bench] = result
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown({args.bench: results[args.bench]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
