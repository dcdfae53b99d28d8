"""Paired image-to-image benchmark: 4x super-resolution and edges -> photo on held-out photo crops.

    python -m bench.translate --minutes 20            # the presets' budget (4 runs: ~80 min + eval)
    python -m bench.translate --minutes 4 --task sr   # a short run of one task

For each task the preset (configs/sr4_photos.yaml, configs/edges2photo.yaml) is trained twice,
with its adversarial term (GAN) and with loss.adv_weight=0 (pixel-only), each for `--minutes` of
wall time (start-up included): the run is started with a step count it cannot reach and stopped
with SIGTERM when its budget is spent (it checkpoints at the step boundary and exits 75), then
judged as it is; the table says how many steps each got. On a shared machine the speed swings,
so steps per budget do too. The preset's adv_start_step (a pixel-only warm-up, sized for its
20-minute schedule) is kept with --minutes >= 20 and scaled by minutes/20 below that, unless
--adv-start says otherwise. Then, on the held-out pairs (`--split test` shards: crops from a block
of each photo that the training crops never touch), with the EMA generators:

- super-resolution: PSNR and SSIM (trainers.judge.metrics) of bicubic upsampling (PIL), the
  pixel-only model and the GAN model against the true 64x64 crops, and each one's Frechet
  distance to those crops under the `random` extractor (trainers.judge.extractors);
- edges -> photo: L1 (mean |output - target| on a 0..1 scale) and Frechet distance of the
  pixel-only and the pix2pix model (PSNR and SSIM too).

Writes OUT.json, OUT.md (tables, budgets, steps, seconds per step) and the grids
OUT_sr.png / OUT_edges.png (rows: test samples; columns: input | bicubic | pixel-only | GAN | target).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import job_env

ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "sr": {"preset": "configs/sr4_photos.yaml", "source": "pairs:sr4:photos", "train": "data/sr4_photos",
           "test": "data/sr4_photos_test", "name": "4x super-resolution (16 -> 64 px)"},
    "edges": {"preset": "configs/edges2photo.yaml", "source": "pairs:edges:photos", "train": "data/edges_photos",
              "test": "data/edges_photos_test", "name": "edges -> photo (64 px)"},
}


def gentrain(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=ROOT, env=env or job_env(),
                          capture_output=True, text=True)


def ensure_shards(spec: dict) -> None:
    for key, split in (("train", "train"), ("test", "test")):
        if not (ROOT / spec[key] / "manifest.json").is_file():
            print(f"[bench] building {spec[key]} ({spec['source']}, --split {split})", flush=True)
            proc = gentrain("shards", "build", spec["source"], "--out", spec[key], "--image-size", 64, "--split", split,
                            "--quiet")
            if proc.returncode:
                raise SystemExit(f"shards build failed:\n{proc.stderr[-2000:]}")


def train(preset: str, run_dir: Path, overrides: list[str], budget_s: float | None) -> dict:
    """`gentrain train`, stopped with SIGTERM (checkpoint, exit 75) if still running after budget_s."""
    cmd = [sys.executable, "-m", "launcher.cli", "train", preset, f"run.dir={run_dir}", "trainer.resume=never",
           "trainer.progress=false", "wandb.mode=disabled", *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    seconds = time.perf_counter() - start
    log.close()
    if proc.returncode not in (0, 75):
        raise SystemExit(f"training {run_dir} failed (exit {proc.returncode}); see {log.name}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    latest = run_dir / "checkpoints" / "latest"
    steps = int(latest.read_text().strip().split("-")[-1]) if latest.exists() else 0  # the step judged
    rates = [x["samples_per_sec"] for x in lines[1:] if "samples_per_sec" in x]
    return {"wall_s": seconds, "steps": steps, "stopped_by_budget": stopped,
            "samples_per_sec_median": statistics.median(rates) if rates else None}


def test_pairs(spec: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) uint8 NCHW: the first n held-out pairs in shard order."""
    from data_shards.stream import ShardStream

    sources, targets, count = [], [], 0
    for batch in ShardStream(str(ROOT / spec["test"]), 256, passes=1, shuffle_buffer=1, kind="pairs", channels=3):
        sources.append(batch["source"].contiguous())
        targets.append(batch["image"].contiguous())
        count += len(batch["image"])
        if count >= n:
            break
    return torch.cat(sources)[:n], torch.cat(targets)[:n]


@torch.no_grad()
def translate_all(run_dir: Path, sources_u8: torch.Tensor, batch: int = 100) -> torch.Tensor:
    from trainers.judge.translate import load_translator

    net, _ = load_translator(run_dir)
    outs = []
    for i in range(0, len(sources_u8), batch):
        x = sources_u8[i:i + batch].float() / 127.5 - 1
        outs.append(((net(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(outs)


def bicubic(sources_u8: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bicubic upsampling of each input to size x size (the classic SR baseline)."""
    out = []
    for img in sources_u8.permute(0, 2, 3, 1).numpy():
        out.append(np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def judge(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, dict]:
    from trainers.judge.extractors import compute_features, get_extractor
    from trainers.judge.metrics import frechet_distance, psnr, ssim

    extractor = get_extractor("random")
    real = compute_features(extractor, targets)
    results = {}
    for name, images in outputs.items():
        results[name] = {
            "psnr": psnr(images, targets), "ssim": ssim(images, targets),
            "l1": float((images.float() - targets.float()).abs().mean() / 255.0),
            "fd_random": frechet_distance(compute_features(extractor, images), real),
        }
    return results


def grid(columns: list[torch.Tensor], path: Path, rows: int = 8, zoom: int = 2) -> Path:
    """Rows: samples; columns: the given image sets (all resized nearest to the targets' size)."""
    from trainers.runtime.images import make_grid, save_png

    size = columns[-1].shape[-1]
    cells = []
    for i in range(rows):
        for col in columns:
            x = col[i:i + 1].float()
            if x.shape[-1] != size:
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
            x = torch.nn.functional.interpolate(x, scale_factor=zoom, mode="nearest")
            cells.append(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return save_png(make_grid(np.stack(cells), nrow=len(columns)), path)


def run_task(key: str, args) -> dict:
    spec = TASKS[key]
    ensure_shards(spec)
    run_root = Path(args.runs) / key
    budget_s = args.minutes * 60
    from configs import load_config

    preset = load_config(spec["preset"])
    if args.adv_start is not None:
        adv_start = args.adv_start
    else:
        adv_start = int(round(preset.loss.adv_start_step * min(1.0, args.minutes / 20)))
    steps = args.steps or 10**7  # stopped by the budget, not by the step count
    common = [f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}", f"loss.adv_start_step={adv_start}",
              "trainer.sample_every=200", "trainer.log_every=10"]
    print(f"[bench] {key}: {args.minutes} min per model, adversarial term from step {adv_start}", flush=True)
    runs = {}
    for model, extra in (("gan", []), ("pixel", ["loss.adv_weight=0"])):
        run_dir = run_root / model
        print(f"[bench] training {key}/{model} -> {run_dir}", flush=True)
        runs[model] = {**train(spec["preset"], run_dir, common + extra, budget_s if not args.steps else None),
                       "run_dir": os.path.relpath(run_dir, ROOT), "load_avg_5min": os.getloadavg()[1]}
        print(f"[bench]   {runs[model]}", flush=True)
    sources, targets = test_pairs(spec, args.n_test)
    outputs = {}
    if key == "sr":
        outputs["bicubic"] = bicubic(sources, targets.shape[-1])
    outputs["pixel"] = translate_all(run_root / "pixel", sources)
    outputs["gan"] = translate_all(run_root / "gan", sources)
    metrics = judge(outputs, targets)
    out = Path(args.out)
    picture = grid([sources, *outputs.values(), targets], out.with_name(f"{out.name}_{key}.png"))
    return {"task": spec["name"], "preset": spec["preset"], "adv_start_step": adv_start,
            "budget_minutes": None if args.steps else args.minutes, "steps_per_model": args.steps,
            "runs": runs, "n_test": len(targets),
            "metrics": metrics, "grid": os.path.relpath(picture, ROOT),
            "columns": ["input", *outputs, "target"]}


LABELS = {"bicubic": "bicubic", "pixel": "pixel-only (adv_weight=0)", "gan": "GAN"}


def budget(result: dict) -> str:
    """What each model of a task was given: wall-clock minutes (start-up included) or a step count."""
    if result.get("budget_minutes") is None:
        return f"{result['steps_per_model']} steps (no wall-clock budget)"
    return f"budget {result['budget_minutes']:g} min of wall time (start-up included)"


def markdown(results: dict) -> str:
    budgets = sorted({budget(r) for r in results.values()})
    lines = ["# Paired image-to-image benchmark (`python -m bench.translate`)", "",
             f"Machine: {os.cpu_count()} CPU cores, shared with other jobs (the 5-minute load average at the end of "
             "each run is given: above the core count, a run got a fraction of a core); "
             f"{' / '.join(budgets)} per model; held-out pairs from the `--split test` shards; Frechet distance under the "
             "`random` extractor (fixed-seed conv net, not Inception: comparable only within this table). "
             "EMA generators.", ""]
    for key, r in results.items():
        m = r["metrics"]
        lines += [f"## {r['task']}: `{r['preset']}`", "",
                  f"{budget(r).capitalize()} per model; adversarial term from step {r['adv_start_step']}; "
                  + ", ".join(f"{LABELS[k]}: {v['steps']} steps in {v['wall_s'] / 60:.1f} min"
                              + (f" ({v['samples_per_sec_median']:.0f} img/s median" if v["samples_per_sec_median"] else " (")
                              + (f", load {v['load_avg_5min']:.1f})" if "load_avg_5min" in v else ")")
                              for k, v in r["runs"].items()) + f"; {r['n_test']} test pairs.", ""]
        if key == "sr":
            lines += ["| method | PSNR (dB) | SSIM | FD (random) |", "|---|---:|---:|---:|"]
            lines += [f"| {LABELS[k]} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['fd_random']:.4f} |" for k, v in m.items()]
            gain = m["pixel"]["psnr"] - m["bicubic"]["psnr"]
            lowest = min(m, key=lambda k: m[k]["fd_random"])
            lines += ["", f"Targets: pixel-only beats bicubic by >= 1 dB: {gain:+.2f} dB "
                      f"({'met' if gain >= 1 else 'missed'}); GAN has the lowest FD: lowest is {LABELS[lowest]} "
                      f"({'met' if lowest == 'gan' else 'missed'}); the GAN's PSNR cost vs pixel-only: "
                      f"{m['gan']['psnr'] - m['pixel']['psnr']:+.2f} dB.", ""]
        else:
            lines += ["| method | L1 | FD (random) | PSNR (dB) | SSIM |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {LABELS[k]} | {v['l1']:.4f} | {v['fd_random']:.4f} | {v['psnr']:.2f} | {v['ssim']:.4f} |"
                      for k, v in m.items()]
            met = m["gan"]["fd_random"] < m["pixel"]["fd_random"]
            lines += ["", f"Target: pix2pix's FD lower than pixel-only's: {'met' if met else 'missed'}.", ""]
        columns = " | ".join(r["columns"])
        lines += [f"Grid (rows: test pairs; columns: {columns}): ![{key}]({Path(r['grid']).name})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per model (default 20)")
    parser.add_argument("--task", choices=["sr", "edges", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="train each model this many steps instead (no budget)")
    parser.add_argument("--adv-start", type=int, default=None,
                        help="step the adversarial term starts at (default: the preset's, scaled by minutes/20 below 20)")
    parser.add_argument("--n-test", type=int, default=1200, help="held-out pairs to judge (default: all 1,200)")
    parser.add_argument("--runs", default="runs/bench_translate", help="where the runs go")
    parser.add_argument("--out", default="bench/results/translate", help="OUT.json, OUT.md, OUT_<task>.png")
    args = parser.parse_args(argv)
    args.runs, args.out = str(Path(args.runs).resolve()), str(Path(args.out).resolve())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.task != "both" and out.with_suffix(".json").is_file():  # keep the other task's last results
        results = json.loads(out.with_suffix(".json").read_text()).get("results", {})
    for key in (["sr", "edges"] if args.task == "both" else [args.task]):
        results[key] = run_task(key, args)
    results = {k: results[k] for k in ("sr", "edges") if k in results}
    out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
