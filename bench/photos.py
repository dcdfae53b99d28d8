"""DCGAN, R3GAN-style and StyleGAN2-style GANs side by side on the photo crops, same shards and
the same wall-clock budget each: Frechet distance and KID on the held-out split (random and
domain extractors), class-conditional accuracy, per-class coverage and s/kimg.

    python -m bench.photos [--minutes 20] [--jobs 2] [--seeds 1] [--models dcgan,r3gan,...]
                           [--n 5000] [--work /tmp/gentrain-photos] [--out bench/results]

Each model is its preset: `configs/gan_photos.yaml` (R3GAN-style), `gan_photos_stylegan2.yaml`
and `gan_photos_dcgan.yaml` (the digits preset's loss: nonsaturating + lazy R1, and no mode-seeking
term; at two learning rates), trained by the real `gentrain train` for `--minutes` and then
stopped with SIGTERM: it checkpoints at the next step and exits 75, as on a preempted cluster.
`--jobs 2` trains two at a time, one per core, seed by seed (two models at one seed side by side).
The judge is a domain classifier fitted on the real train crops (trainers.judge.extractors): it
reads a sample generated for class k as some class; conditional accuracy is how often that is k.
Each run is judged on `--n` generated images against as many held-out crops (the held-out split
is built that large).

`--seeds N` trains every model N times (run.seed 0..N-1): a row is then the mean over seeds with
the spread across them beside it, which is what a "better on every metric" claim has to beat (one
run's final checkpoint moves FD_domain by 10-20% from one checkpoint to the next). A rerun starts
each run it trains from an empty folder; `--reuse` keeps the runs already trained for the budget
(`--seeds 4 --reuse` after `--seeds 2` trains seeds 2 and 3 only, and judges all four). Rows of models
not run this time are kept from the earlier results at the same budget and --n on the same machine,
each with its date: equal wall clock is equal work only on one kind of CPU, so a bench on another machine
belongs in its own `--out` (bench/results/zen4 holds an AMD EPYC's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# The photo DCGAN is a preset of its own (configs/gan_photos_dcgan.yaml, also timed by bench.precision),
# at DCGAN's learning rate and at the modern presets' (which trades its FD_random for class accuracy
# and the domain metrics: the bench shows both).
DCGAN_PRESET = "configs/gan_photos_dcgan.yaml"
MODELS = {
    "dcgan": ["--preset", DCGAN_PRESET],
    "dcgan_lr1e-3": ["--preset", DCGAN_PRESET, "optim.g.lr=1e-3", "optim.d.lr=1e-3"],
    "r3gan": [],
    "stylegan2": ["--preset", "configs/gan_photos_stylegan2.yaml"],
}


def held_out_size(n: int) -> int:
    """How many held-out crops the bench judges `--n` images a side against: the photo source's
    default test split (1,200), or n where n is larger. So n alone decides the real side a row was
    judged on."""
    from data_shards.sources.photos import DEFAULT_NUM_SAMPLES

    return max(DEFAULT_NUM_SAMPLES["test"], n)


def build_data(work: Path, n: int) -> tuple[Path, Path]:
    """The train and held-out crops under `work`, the held-out split sized for `--n` (rebuilt when
    an earlier bench built it at another size: it is the bench's scratch)."""
    train, test = work / "photos32", work / "photos32_test"
    for out, split, count in ((train, "train", None), (test, "test", held_out_size(n))):
        manifest = out / "manifest.json"
        if manifest.exists() and count is not None and json.loads(manifest.read_text())["num_samples"] != count:
            shutil.rmtree(out)
        if not manifest.exists():
            subprocess.run([sys.executable, "-m", "launcher.cli", "shards", "build", "photos", "--out", str(out),
                            "--image-size", "32", "--split", split, "--quiet",
                            *(["--num-samples", str(count)] if count is not None else [])], check=True, cwd=ROOT)
    return train, test


def run_dir(work: Path, name: str) -> Path:
    """The run folder of one run (a model at a seed: run_name) under the bench's --work."""
    return work / f"run-{name}"


def clear_runs(runs: list[Path]) -> None:
    """Delete the bench's earlier run folders before it trains them again. Under
    `resume=never` the trainer would keep an old run's later checkpoints and grids in an
    `abandoned-*` folder (a user's run loses nothing); the bench's folders are its own
    scratch, and a rerun left a few MB of them behind each time."""
    for run in runs:
        if run.exists():
            shutil.rmtree(run)


def trained_for(run: Path, minutes: float) -> bool:
    """Whether `run` holds a finished bench run of this budget: a checkpoint, and a metrics log
    spanning at least 90% of `minutes` (one cut short by a crash or ^C does not count)."""
    from trainers.judge.report_measure import read_metrics_log

    if not (run / "checkpoints" / "latest").exists():
        return False  # no need to read the log
    records = read_metrics_log(run)
    return bool(records) and records[-1]["time"] - records[0]["time"] >= 0.9 * minutes * 60


def train_command(name: str, overrides: list[str], work: Path, train: Path, test: Path) -> tuple[list[str], Path]:
    """The `gentrain train` command line of one model and its run folder."""
    preset = "configs/gan_photos.yaml"
    if overrides[:1] == ["--preset"]:
        preset, overrides = overrides[1], overrides[2:]
    run = run_dir(work, name)
    cmd = [sys.executable, "-m", "launcher.cli", "train", preset, f"run.dir={run}", f"data.shards={train}",
           f"metrics.shards={test}", "trainer.max_steps=1000000", "trainer.resume=never", "trainer.progress=false",
           "wandb.mode=disabled", "metrics.every_kimg=0", *overrides]
    return cmd, run


def bench_commands(models: list[str], seeds: int, work: Path, train: Path,
                   test: Path) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Every run's command line and run folder, keyed by run_name, in the order they train.

    Seed-major: the runs trained at once are different models at one seed, so a slow hour of the
    machine (the same Zen 4 ran 233-253 ms a step on different days) falls on every model alike."""
    commands, runs = {}, {}
    for seed in range(seeds):
        for name in models:
            key = run_name(name, seed)
            commands[key], runs[key] = train_command(key, [*MODELS[name], f"run.seed={seed}"], work, train, test)
    return commands, runs


# A row's figures, and which way is better for each of the compared ones (+1: higher).
FIGURES = ("s_per_kimg", "images_seen", "fd_random", "kid_random", "fd_domain", "kid_domain", "conditional_accuracy",
           "class_coverage", "class_tv")
SHARED = ("n", "extractor", "grid")  # the same for every seed of a model (grid: seed 0's, the model's name)
BETTER = {"fd_random": -1, "kid_random": -1, "fd_domain": -1, "kid_domain": -1, "conditional_accuracy": +1,
          "class_coverage": +1}


def run_name(model: str, seed: int) -> str:
    """The run (and log) name of one model at one seed; seed 0 keeps the model's name."""
    return model if seed == 0 else f"{model}-seed{seed}"


def summarise(per_seed: list[dict]) -> dict:
    """One model's row from its runs: each figure's mean over seeds and, with several seeds, its
    standard deviation across them (`NAME_seed_std`) and the runs themselves (`per_seed`). A
    several-seed row keeps only what its runs share besides: one seed's ADA trace, class counts
    or seed number would pass for the model's."""
    if len(per_seed) == 1:
        return dict(per_seed[0], seeds=1)
    row = {key: per_seed[0][key] for key in SHARED if key in per_seed[0]}
    for key in FIGURES:
        values = [r[key] for r in per_seed]
        row[key], row[f"{key}_seed_std"] = statistics.fmean(values), statistics.stdev(values)
    return dict(row, seeds=len(per_seed), per_seed=per_seed)


def verdicts(rows: dict[str, dict]) -> list[str]:
    """For each model that is not a DCGAN, the metrics on which it is better and worse than each
    DCGAN row (with several seeds: by more than the larger of the two spreads across seeds)."""
    lines = []
    for name, row in rows.items():
        if name.startswith("dcgan"):
            continue
        for base, ref in rows.items():
            if not base.startswith("dcgan"):
                continue
            better, worse, tied = [], [], []
            for key, sign in BETTER.items():
                margin = max(row.get(f"{key}_seed_std", 0.0), ref.get(f"{key}_seed_std", 0.0))
                diff = sign * (row[key] - ref[key])
                (better if diff > margin else worse if diff < -margin else tied).append(key)
            lines.append(f"- {name} vs {base}: better on {', '.join(better) or 'none'}; worse on "
                         f"{', '.join(worse) or 'none'}; tied on {', '.join(tied) or 'none'}")
    return lines


def this_machine() -> str:
    """The CPU a row was measured on, as rows record it: its model name and how it computes bf16.
    Equal wall clock is only equal work on one kind of CPU (R3GAN 6.8 s/kimg and the DCGAN 3.4
    on a Xeon with AMX, 7.2 and 4.6 on a Zen 4), so rows of different machines are never merged
    into one table or compared."""
    from bench.run import machine
    from models.cpu import cpu_bf16_isa

    return f"{machine()['cpu']}, bf16 {cpu_bf16_isa() or 'emulated'}"


def merge_rows(path: Path, minutes: float, rows: dict[str, dict], machine: str, domain: str,
               n: int) -> dict[str, dict]:
    """This bench's rows over an earlier results file's: a model not run this time keeps its row
    when that was measured at the same budget on the same machine, and judged at the same `n`
    by the same fit of the domain classifier (`domain`, its weights' sha256; it is refitted in
    each --work). Rows carry their own date, seed count, machine and fit; a row from before
    fits were recorded is kept, with a warning."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    kept = {name: {"seeds": 1, "measured": "earlier", **row} for name, row in old.get("rows", {}).items()
            if name not in rows and row.get("minutes", old.get("minutes")) == minutes
            and row.get("machine") == machine and row.get("domain_sha256", domain) == domain
            and row.get("n") == n}
    dropped = sorted(set(old.get("rows", {})) - set(rows) - set(kept))
    if dropped:
        print(f"[bench.photos] not kept from {path} (another budget, machine, --n or domain fit): {', '.join(dropped)}",
              flush=True)
    unrecorded = sorted(name for name, row in kept.items() if "domain_sha256" not in row)
    if unrecorded:
        print(f"[bench.photos] kept from {path} without a recorded domain fit (judged in another --work): "
              f"{', '.join(unrecorded)}", flush=True)
    return {**kept, **rows}


def cell(row: dict, key: str, fmt: str) -> str:
    text = format(row[key], fmt)
    spread = row.get(f"{key}_seed_std")
    return text if spread is None else f"{text} ± {format(spread, fmt)}"


def run_for(commands: dict[str, list[str]], minutes: float, logs: Path, cores: list[int] | None) -> None:
    """Run each command for at most `minutes` of wall clock, then SIGTERM it (a trainer
    checkpoints at its next step and exits 75); output to logs/NAME.log.

    With `cores`, up to len(cores) commands run at once, each on its own core with one OpenMP
    thread: a 2-thread trainer beside another process slows 10-50x (spin-waiting threads), one
    pinned thread per core does not. Without, one at a time with the inherited settings."""
    pending, running = list(commands.items()), {}
    free = list(cores) if cores else [None]
    try:
        while pending or running:
            while pending and free:
                name, cmd = pending.pop(0)
                core = free.pop(0)
                env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if core is not None else {}))
                pin = (lambda c=core: os.sched_setaffinity(0, {c})) if core is not None else None
                print(f"[bench.photos] {name}{f' (core {core})' if core is not None else ''}: {' '.join(cmd[3:])}",
                      flush=True)
                log = open(logs / f"{name}.log", "w")
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
                running[name] = (proc, core, log, time.monotonic() + minutes * 60)
            time.sleep(0.2)
            for name, (proc, core, log, deadline) in list(running.items()):
                if proc.poll() is None and time.monotonic() < deadline:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=600)
                log.close()
                del running[name]
                free.append(core)
                if proc.returncode not in (0, 75):
                    raise RuntimeError(f"{name} exited {proc.returncode}; see {logs / f'{name}.log'}")
    finally:  # a failed run (or ^C) stops the others instead of leaving them training
        for proc, _, log, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def ada_trace(records: list[dict]) -> dict:
    """ADA's augmentation probability p over the run: at each quarter of the logged steps and at the end."""
    p = [(r["step"], r["ada/p"]) for r in records if "ada/p" in r]
    if not p:
        return {}
    marks = [p[min(len(p) - 1, i * len(p) // 4)] for i in range(4)] + [p[-1]]
    return {"ada_p": [[step, round(value, 4)] for step, value in marks], "ada_p_max": round(max(v for _, v in p), 4)}


def keep_last_grid(run: Path, out: Path) -> str | None:
    """Copy the run's newest sample grid (EMA generator, one row per class) beside the results."""
    grids = sorted((run / "samples").glob("samples-*.png"))
    if not grids:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(grids[-1].read_bytes())
    return out.name


def seconds_per_kimg(records: list[dict]) -> tuple[float, int]:
    first, last = records[0], records[-1]
    images = last["images_seen"] - first["images_seen"]
    return (last["time"] - first["time"]) / max(images / 1000, 1e-9), int(last["images_seen"])


def judge(run: Path, test: Path, domain, n: int, num_classes: int) -> dict:
    from trainers.judge.extractors import compute_features
    from trainers.judge.inference import generate
    from trainers.judge.metrics import class_coverage
    from trainers.judge.quality import evaluate_quality, read_images, reference_features, set_metrics

    out = evaluate_quality(run, test, ("fd", "kid"), "random", n)
    real = reference_features(test, domain, n, 32, 3)
    samples, labels = generate(run, n, seed=1)
    feats, pred = compute_features(domain, samples.transpose(0, 3, 1, 2), return_predictions=True)
    out.update(set_metrics(real, feats, ("fd", "kid"), domain.name))
    out["conditional_accuracy"] = float((pred == labels).mean())
    _, real_labels = read_images(test, 32, 3, n, with_labels=True)
    out.update(class_coverage(pred, real_labels, num_classes))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.photos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget per model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gentrain-photos"),
                        help="shards, the domain classifier and the runs (kept between benches)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where photos.md, photos.json and a sample grid per model go")
    # At 1,000 a side another draw of the same checkpoint's samples moved its FD_domain by up to 1.4,
    # as much as the spread across seeds; 5,000 take ~50 s a run on one core.
    parser.add_argument("--n", type=int, default=5000,
                        help="images a side for FD/KID and generated images for class accuracy; the held-out "
                             "split is built with max(1200, N) crops")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per model (run.seed 0..N-1); rows are means, with the spread across seeds")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models trained at once, each pinned to its own core with one thread (1: one at a "
                             "time, threads as inherited)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs in --work that already trained for --minutes and train only the rest: "
                             "a bench extended to more seeds, or one stopped midway")
    parser.add_argument("--judge-only", action="store_true",
                        help="judge the runs already in --work (trained by an earlier bench at --minutes) without "
                             "training: a bench whose judging failed, or rows re-judged")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.judge_only:
        keys = [run_name(name, seed) for name in models for seed in range(args.seeds)]
        untrained = [key for key in keys if not (run_dir(args.work, key) / "checkpoints" / "latest").exists()]
        if untrained:
            parser.error(f"--judge-only: no trained run of {', '.join(untrained)} in {args.work}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    args.work.mkdir(parents=True, exist_ok=True)
    train, test = build_data(args.work, args.n)
    from trainers.judge.extractors import fit_domain_extractor, get_extractor, sha256_file
    from trainers.judge.quality import read_images
    from trainers.judge.report_measure import read_metrics_log

    domain_path = args.work / "domain.safetensors"
    if not domain_path.exists():
        images, labels = read_images(train, 32, 3, 3000, with_labels=True)
        fit_domain_extractor(images, labels, out=domain_path)
    domain = get_extractor("domain", domain_path=domain_path)
    domain_sha256 = sha256_file(domain_path)
    num_classes = json.loads((train / "manifest.json").read_text())["num_classes"]
    available = sorted(os.sched_getaffinity(0))
    if args.jobs > len(available):
        parser.error(f"--jobs {args.jobs}: this process may use {len(available)} cores ({available})")
    cores = available[:args.jobs] if args.jobs > 1 else None
    commands, runs = bench_commands(models, args.seeds, args.work, train, test)
    if not args.judge_only:
        reused = [key for key in commands if args.reuse and trained_for(runs[key], args.minutes)]
        if reused:
            print(f"[bench.photos] --reuse: keeping {', '.join(reused)}", flush=True)
        todo = {key: cmd for key, cmd in commands.items() if key not in reused}
        clear_runs([runs[key] for key in todo])
        run_for(todo, args.minutes, args.work, cores)
    measured, machine = time.strftime("%Y-%m-%d"), this_machine()
    rows = {}
    for name in models:
        per_seed = []
        for seed in range(args.seeds):
            key = run_name(name, seed)
            records = read_metrics_log(runs[key])
            s_kimg, images = seconds_per_kimg(records)
            result = {"seed": seed, "s_per_kimg": s_kimg, "images_seen": images,
                      **judge(runs[key], test, domain, args.n, num_classes), **ada_trace(records),
                      "grid": keep_last_grid(runs[key], args.out / f"photos_{name}.png") if seed == 0 else None}
            print(f"[bench.photos] {key}: {json.dumps({k: v for k, v in result.items() if k != 'extractor'})}",
                  flush=True)
            per_seed.append(result)
        rows[name] = {**summarise(per_seed), "minutes": args.minutes, "measured": measured, "machine": machine,
                      "domain_sha256": domain_sha256}
    load = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = merge_rows(args.out / "photos.json", args.minutes, rows, machine, domain_sha256, args.n)
    (args.out / "photos.json").write_text(json.dumps({"minutes": args.minutes, "load_avg": load, "rows": rows},
                                                     indent=1, default=str))
    head = ("| model | seeds | measured | kimg | s/kimg | fd_random | kid_random | fd_domain | kid_domain | "
            "cond. accuracy | class coverage | class TV |")
    unrecorded = [name for name, r in rows.items() if "domain_sha256" not in r]
    # The line describes how the runs trained; a --judge-only bench did not train them.
    threads = ("as when the runs trained (--judge-only)" if args.judge_only else "1, one core per model" if cores
               else os.environ.get("OMP_NUM_THREADS", "the launcher's default"))
    lines = [f"Machine: {machine}. Budget {args.minutes:g} min per model, {args.n} images a side; "
             f"domain classifier {domain_sha256[:12]} (rows from before fits were recorded: "
             f"{', '.join(unrecorded) or 'none'}); "
             f"OMP_NUM_THREADS={threads}; load average at end {load[0]:.1f}. "
             "With several seeds: mean ± standard deviation across them.",
             "", head, "|" + "---|" * 12]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('seeds', 1)} | {r.get('measured', '')} | {r['images_seen'] / 1000:.0f} | "
                     f"{r['s_per_kimg']:.1f} | {cell(r, 'fd_random', '.3f')} | {cell(r, 'kid_random', '.4f')} | "
                     f"{cell(r, 'fd_domain', '.1f')} | {cell(r, 'kid_domain', '.3f')} | "
                     f"{cell(r, 'conditional_accuracy', '.3f')} | {cell(r, 'class_coverage', '.2f')} | "
                     f"{r['class_tv']:.2f} |")
    lines.append("")
    for name, r in rows.items():
        for run in r.get("per_seed", [r]):
            trace = ", ".join(f"{v:g} at step {step}" for step, v in run.get("ada_p", []))
            grid = f"; grid (one row per class): {run['grid']}" if run.get("grid") else ""
            lines.append(f"- {run_name(name, run.get('seed', 0))}: ADA p {trace or 'not logged'}{grid}")
    lines += ["", "Against the DCGANs (a difference within the larger spread across seeds is a tie):", "",
              *verdicts(rows)]
    (args.out / "photos.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

if __name__ == "__main__":
    sys.exit(main())
