"""fp32 against bf16 per network on this CPU: the figures behind `trainer.precision=auto`.

    python -m bench.precision [--quick] [--presets gan_photos,vae_photos] [--out bench/results]

For each preset (``PRESETS``: the photo GANs R3GAN, DCGAN and StyleGAN2, the photo VAE, the
paired ESRGAN and pix2pix presets, the digits DCGAN) the task is built in this process as the
loop builds it (``trainers.tasks.build_task``), once with fp32 and once with bf16 (DeepSpeed's
bf16 engine), from the same seed, and both are fed one fixed synthetic uint8 batch of the
preset's shape. Their ``train_step`` calls are timed side by side on one thread (what each of
2 processes gets on a 2-core machine), round-robin, each on a clock that advances as the loop's
does; a round is a multiple of every lazy cadence (R1/R2, path length), so both precisions run
as many regularised steps per round. Figures: ms/step (median over rounds, CPU time of this
thread) and ``bf16_vs_fp32``, the median of per-round paired ratios (> 1: fp32 is faster).

Timing-only overrides: the photo shards' shape (32x32 RGB, 16 classes) is set by hand; ADA's p
stays 0 (bench.trainer.ADA_P_HELD: the two tasks' D outputs differ, and would move p apart); the GAN
collapse diagnostics and the VAE's posterior diagnostics are off (rare, and not the networks'
arithmetic); sr4's pixel-only warm-up is skipped (``loss.adv_start_step=0``) so its D trains.

Writes OUT/precision.json and OUT/precision.md (OUT defaults to bench/results), with the
machine's load average at start and end. The per-architecture choice lives in
models.registry.CPU_PRECISION; the ``auto now`` column is what ``auto`` picks with it here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import interleaved, median, median_ratio
from bench.trainer import ADA_P_HELD, PHOTO_SHAPE, _seed, cadence, fresh_copy, round_up, synthetic_batch

PRECISIONS = ("fp32", "bf16")
# name -> (preset, overrides)
PRESETS = {
    "gan_photos": ("configs/gan_photos.yaml", (*PHOTO_SHAPE, ADA_P_HELD)),
    "gan_photos_dcgan": ("configs/gan_photos_dcgan.yaml", (*PHOTO_SHAPE, ADA_P_HELD)),
    "gan_photos_stylegan2": ("configs/gan_photos_stylegan2.yaml", (*PHOTO_SHAPE, ADA_P_HELD)),
    "vae_photos": ("configs/vae_photos.yaml", PHOTO_SHAPE[:2]),
    "sr4_photos": ("configs/sr4_photos.yaml", ("loss.adv_start_step=0",)),
    "edges2photo": ("configs/edges2photo.yaml", ()),
    "gan_digits": ("configs/gan_digits.yaml", ()),
}
QUIET = {"gan": ("diagnostics.every=0",), "vae": ("loss.diagnostics_every=0",), "paired": ()}


def load(name: str, run_dir: Path):
    """The preset's config with the timing-only overrides (see the module docstring)."""
    from configs import load_config

    preset, overrides = PRESETS[name]
    kind = load_config(preset, [*overrides, f"run.dir={run_dir}"]).kind
    return load_config(preset, [*overrides, *QUIET[kind], f"run.dir={run_dir}", "wandb.mode=disabled",
                                f"run.name=precision-{name}"])


def build_tasks(cfg) -> dict:
    """One task per precision, each from the run's seed (the same initial weights)."""
    from trainers.runtime.distributed import init_distributed
    from trainers.tasks import build_task

    dist_info = init_distributed()
    tasks = {}
    for precision in PRECISIONS:
        _seed(cfg.run.seed)
        tasks[precision] = build_task(cfg, dist_info, precision)
    return tasks


def stepper(task, batch: dict, steps: int, skipped: list):
    """A function running `steps` train steps of `task` on copies of `batch`, on its own clock;
    non-finite (skipped, hence shorter) steps are counted in `skipped`."""
    from trainers.runtime.clock import Clock

    clock = Clock(images_per_step=batch["image"].shape[0])

    def run() -> int:
        for _ in range(steps):
            if "nonfinite_skipped" in task.train_step(fresh_copy(batch), clock):
                skipped[0] += 1
            clock.tick()
        return steps
    return run


def bench_preset(name: str, steps: int, rounds: int, root: Path) -> dict:
    """ms/step of the preset's train_step in fp32 and bf16, timed side by side."""
    from trainers.runtime.engines import precision_choice

    cfg = load(name, root / f"precision-{name}")
    steps = round_up(steps, cadence(cfg))
    tasks = build_tasks(cfg)
    batch = synthetic_batch(cfg)
    skipped = {p: [0] for p in PRECISIONS}
    fns = {p: stepper(task, batch, steps, skipped[p]) for p, task in tasks.items()}
    for fn in fns.values():  # warm-up: oneDNN primitives, DeepSpeed's first step, the allocator
        fn()
    per_step = interleaved(fns, rounds)
    ratio = median_ratio(per_step["bf16"], per_step["fp32"])
    preset, overrides = PRESETS[name]
    family, arch = str(cfg.kind), str(cfg.model.arch)
    auto, why = precision_choice("auto", torch.device("cpu"), family, arch)
    return {
        "preset": preset, "overrides": list(overrides), "family": family, "arch": arch,
        "batch_size": int(cfg.data.batch_size), "image_size": int(cfg.data.image_size),
        "steps_per_round": steps, "rounds": rounds,
        "ms_per_step": {p: 1000 * median(t) for p, t in per_step.items()},
        "per_round_bf16_vs_fp32": [b / f for b, f in zip(per_step["bf16"], per_step["fp32"])],
        "bf16_vs_fp32": ratio,
        "faster": "fp32" if ratio > 1.0 else "bf16",
        "nonfinite_skipped": {p: n[0] for p, n in skipped.items()},
        "auto_now": auto, "auto_now_why": why,
    }


def per_arch(presets: dict) -> dict:
    """(family/arch) -> the faster precision by the median of its presets' ratios, with the ratios."""
    grouped: dict[str, list] = {}
    for name, r in presets.items():
        grouped.setdefault(f"{r['family']}/{r['arch']}", []).append((name, r["bf16_vs_fp32"]))
    out = {}
    for key, rows in grouped.items():
        ratio = median([x for _, x in rows])
        out[key] = {"faster": "fp32" if ratio > 1.0 else "bf16", "bf16_vs_fp32": ratio,
                    "presets": {n: x for n, x in rows}}
    return out


def run_markdown(results: dict) -> list[str]:
    """The table of one run (one kind of bf16 hardware)."""
    cap = f", oneDNN capped at {results['onednn_max_cpu_isa']}" if results.get("onednn_max_cpu_isa") else ""
    lines = [f"**bf16 in hardware: {results['bf16_isa'] or 'no'}** ({results['machine']['cpu']}{cap}; one thread; "
             f"torch {results['machine']['torch']}; load average "
             f"{[round(x, 2) for x in results['load_avg_at_start']]} at start, "
             f"{[round(x, 2) for x in results['load_avg_at_end']]} at end"
             f"{'; QUICK smoke run: not meaningful' if results['quick'] else ''})", "",
             "| preset | family/arch | batch, size | steps/round x rounds | fp32 ms/step | bf16 ms/step | bf16 / fp32 "
             "| faster | auto now |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for name, r in results["presets"].items():
        ms = r["ms_per_step"]
        lines.append(f"| {name} | {r['family']}/{r['arch']} | {r['batch_size']}, {r['image_size']}px | "
                     f"{r['steps_per_round']} x {r['rounds']} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | "
                     f"{r['bf16_vs_fp32']:.2f} | {r['faster']} | {r['auto_now']} |")
    lines += ["", "Per architecture (median of its presets' ratios): " + "; ".join(
                  f"{k} {v['faster']} ({v['bf16_vs_fp32']:.2f})" for k, v in results["per_arch"].items()) + ".", "",
              f"Made by `{results['command']}` in {results['seconds']:.0f} s.", ""]
    return lines


def to_markdown(merged: dict) -> str:
    """precision.md: one table per kind of bf16 hardware measured, and the registry entries they call for."""
    lines = ["# fp32 vs bf16 per network (`python -m bench.precision`)", "",
             "bf16 / fp32 is the median of per-round paired ratios (> 1: fp32 faster); ms columns are medians over "
             "rounds of CPU time of the timing thread. `auto now`: what `trainer.precision=auto` picked on that "
             "machine with models.registry.CPU_PRECISION as it was.", ""]
    for results in merged["by_bf16_isa"].values():
        lines += run_markdown(results)
    table = {tuple(k.split("/")): v for k, v in merged["suggested_cpu_precision"].items()}
    lines.append(f"models.registry.CPU_PRECISION these figures call for: `{table}`"
                 f"{' (bf16 is faster for every network measured)' if not table else ''}.")
    return "\n".join(lines) + "\n"


def merge(path: Path, results: dict) -> dict:
    """OUT/precision.json holds one run per kind of bf16 hardware ("amx", "avx512_bf16", "none");
    a new run replaces its own kind's and keeps the others."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    runs = merged.get("by_bf16_isa", {})
    runs[results["bf16_isa"] or "none"] = results
    suggested: dict[str, dict] = {}
    for r in runs.values():
        for key, by_isa in r["suggested_cpu_precision"].items():
            suggested.setdefault(key, {}).update(by_isa)
    return {"by_bf16_isa": runs, "suggested_cpu_precision": suggested}


def run(names, steps: int, rounds: int, root: Path) -> dict:
    """The figures of every named preset, one after the other, with the machine's load around them."""
    from bench.run import machine
    from models.cpu import cpu_bf16_isa

    torch.set_num_threads(1)  # one core per process, as a 2-process run on this machine would get
    started, info = time.perf_counter(), machine()
    presets = {}
    for name in names:
        print(f"[bench.precision] {name} ...", flush=True)
        presets[name] = r = bench_preset(name, steps, rounds, root)
        print(f"[bench.precision] {name}: fp32 {r['ms_per_step']['fp32']:.1f} ms, bf16 {r['ms_per_step']['bf16']:.1f} "
              f"ms, bf16/fp32 {r['bf16_vs_fp32']:.2f}", flush=True)
    isa, by_arch = cpu_bf16_isa(), per_arch(presets)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return {"machine": info, "bf16_isa": isa, "onednn_max_cpu_isa": cap, "threads": 1,
            "load_avg_at_start": info["load_avg_at_start"], "load_avg_at_end": os.getloadavg(),
            "seconds": time.perf_counter() - started, "presets": presets, "per_arch": by_arch,
            "suggested_cpu_precision": suggested_table(by_arch, isa)}


def suggested_table(arch_figures: dict, isa: str | None) -> dict:
    """The models.registry.CPU_PRECISION entries these figures call for on this kind of CPU:
    the archs measured faster in fp32 than in bf16 ({} without native bf16: auto is fp32 there)."""
    if isa is None:
        return {}
    return {key: {isa: "fp32"} for key, v in arch_figures.items() if v["faster"] == "fp32"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--quick", action="store_true", help="one lazy cycle, one round: checks that it runs")
    parser.add_argument("--steps", type=int, default=8, help="steps per round (rounded up to the lazy cadence)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="where precision.json/.md go (default bench/results; "
                                                    "a temp dir with --quick)")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    root = Path(args.work or Path(tempfile.gettempdir()) / "gentrain-precision")
    steps, rounds = (1, 1) if args.quick else (args.steps, args.rounds)
    results = run(names, steps, rounds, root)
    cap = f"ONEDNN_MAX_CPU_ISA={results['onednn_max_cpu_isa']} " if results["onednn_max_cpu_isa"] else ""
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    results.update({"quick": args.quick, "command": f"{cap}python -m bench.precision {args_text}".strip()})
    default_out = Path(tempfile.gettempdir()) / "gentrain-precision-quick" if args.quick else \
        Path(__file__).resolve().parent / "results"
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    merged = merge(out / "precision.json", results)
    (out / "precision.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "precision.md").write_text(to_markdown(merged))
    print("\n".join(run_markdown(results)))
    print(f"[bench.precision] merged into {out / 'precision.json'} and {out / 'precision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
