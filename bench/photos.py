"""DCGAN, R3GAN-style and StyleGAN2-style GANs side by side on the photo crops, same shards and
the same wall-clock budget each: Frechet distance and KID on the held-out split (random and
domain extractors), class-conditional accuracy, per-class coverage and s/kimg.

    python -m bench.photos [--minutes 20] [--jobs 2] [--work /tmp/gentrain-photos] [--out bench/results]

Each model is `configs/gan_photos.yaml` with its architecture (DCGAN keeps the digits preset's
loss: nonsaturating + lazy R1, and no mode-seeking term, at two learning rates), trained by the
real `gentrain train` for `--minutes` and then stopped with SIGTERM: it checkpoints at the next
step and exits 75, as on a preempted cluster. `--jobs 2` trains two at a time, one per core.
The judge is a domain classifier fitted on the real train crops (trainers.judge.extractors): it
reads a sample generated for class k as some class; conditional accuracy is how often that is k.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# The photo DCGAN: configs/gan_photos.yaml with the digits preset's network and loss (also timed
# by bench.precision), at DCGAN's learning rate and at the modern presets' (which trades its
# FD_random for class accuracy and the domain metrics: the bench shows both).
DCGAN_OVERRIDES = ["model.arch=dcgan", "loss.loss=nonsaturating", "loss.r1_gamma=1.0", "loss.r2_gamma=0",
                   "loss.r1_every=4", "loss.mode_seeking=0", "model.g_channels=64", "model.d_channels=64"]
MODELS = {
    "dcgan": [*DCGAN_OVERRIDES, "optim.g.lr=2e-4", "optim.d.lr=2e-4"],
    "dcgan_lr1e-3": [*DCGAN_OVERRIDES, "optim.g.lr=1e-3", "optim.d.lr=1e-3"],
    "r3gan": [],
    "stylegan2": ["--preset", "configs/gan_photos_stylegan2.yaml"],
}


def build_data(work: Path) -> tuple[Path, Path]:
    train, test = work / "photos32", work / "photos32_test"
    for out, split in ((train, "train"), (test, "test")):
        if not (out / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "launcher.cli", "shards", "build", "photos", "--out", str(out),
                            "--image-size", "32", "--split", split, "--quiet"], check=True, cwd=ROOT)
    return train, test


def train_command(name: str, overrides: list[str], work: Path, train: Path, test: Path) -> tuple[list[str], Path]:
    """The `gentrain train` command line of one model and its run folder."""
    preset = "configs/gan_photos.yaml"
    if overrides[:1] == ["--preset"]:
        preset, overrides = overrides[1], overrides[2:]
    run = work / f"run-{name}"
    cmd = [sys.executable, "-m", "launcher.cli", "train", preset, f"run.dir={run}", f"data.shards={train}",
           f"metrics.shards={test}", "trainer.max_steps=1000000", "trainer.resume=never", "trainer.progress=false",
           "wandb.mode=disabled", "metrics.every_kimg=0", *overrides]
    return cmd, run


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget per model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gentrain-photos"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--n", type=int, default=1000, help="images a side for FD/KID")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--jobs", type=int, default=1,
                        help="models trained at once, each pinned to its own core with one thread (1: one at a "
                             "time, threads as inherited)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gentrain" / "torch_extensions"))
    args.work.mkdir(parents=True, exist_ok=True)
    train, test = build_data(args.work)
    from trainers.judge.extractors import fit_domain_extractor, get_extractor
    from trainers.judge.quality import read_images
    from trainers.judge.report_measure import read_metrics_log

    domain_path = args.work / "domain.safetensors"
    if not domain_path.exists():
        images, labels = read_images(train, 32, 3, 3000, with_labels=True)
        fit_domain_extractor(images, labels, out=domain_path)
    domain = get_extractor("domain", domain_path=domain_path)
    num_classes = json.loads((train / "manifest.json").read_text())["num_classes"]
    rows = {}
    available = sorted(os.sched_getaffinity(0))
    if args.jobs > len(available):
        parser.error(f"--jobs {args.jobs}: this process may use {len(available)} cores ({available})")
    cores = available[:args.jobs] if args.jobs > 1 else None
    commands, runs = {}, {}
    for name in args.models.split(","):
        commands[name], runs[name] = train_command(name, MODELS[name], args.work, train, test)
    run_for(commands, args.minutes, args.work, cores)
    for name, run in runs.items():
        records = read_metrics_log(run)
        s_kimg, images = seconds_per_kimg(records)
        rows[name] = {"s_per_kimg": s_kimg, "images_seen": images, **judge(run, test, domain, args.n, num_classes),
                      **ada_trace(records), "grid": keep_last_grid(run, args.out / f"photos_{name}.png")}
        print(f"[bench.photos] {name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'extractor'})}",
              flush=True)
    load = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "photos.json").write_text(json.dumps({"minutes": args.minutes, "load_avg": load, "rows": rows},
                                                     indent=1, default=str))
    head = "| model | kimg | s/kimg | fd_random | kid_random | fd_domain | kid_domain | cond. accuracy | class coverage | class TV |"
    threads = "1, one core per model" if cores else os.environ.get("OMP_NUM_THREADS", "the launcher's default")
    lines = [f"Budget {args.minutes:g} min per model, {args.n} images a side; OMP_NUM_THREADS={threads}; "
             f"load average at end {load[0]:.1f}.", "", head, "|" + "---|" * 10]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images_seen'] / 1000:.0f} | {r['s_per_kimg']:.1f} | {r['fd_random']:.3f} | "
                     f"{r['kid_random']:.4f} | {r['fd_domain']:.1f} | {r['kid_domain']:.3f} | "
                     f"{r['conditional_accuracy']:.2f} | {r['class_coverage']:.2f} | {r['class_tv']:.2f} |")
    lines.append("")
    for name, r in rows.items():
        trace = ", ".join(f"{v:g} at step {step}" for step, v in r.get("ada_p", []))
        lines.append(f"- {name}: ADA p {trace or 'not logged'}; grid (one row per class): {r.get('grid')}")
    (args.out / "photos.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
