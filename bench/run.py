"""`make bench` / `python -m bench.run [--quick] [--out DIR]`: reader, trainer and memory figures.

Parts (``--only``): reader (vs raw decode and webdataset, decoder choice, DataLoader workers),
trainer (step vs a bare loop), scaling (training with 1 and 2 processes), memory (RSS of a
reader and of the real trainer over a long run; ``--memory-steps 10000`` for the long one),
remote (shards over HTTP from a local server against the same shards on disk, bench.remote).

Writes DIR/results.json (raw figures and the ratios ``reader_vs_raw_decode``,
``reader_vs_webdataset`` per image size and format, ``trainer_step_vs_bare_loop`` per model)
and DIR/results.md (the tables). DIR defaults to bench/. Every ratio compares loops timed
side by side in the same process, round-robin, median over rounds: absolute rates on a shared
machine move from run to run, the ratios much less.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"reader_vs_raw_decode": (">=", 0.90), "reader_vs_webdataset": (">=", 2.5),
           "trainer_step_vs_bare_loop": ("<=", 1.10), "remote_http_vs_local_256": (">=", 0.90)}


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_at_start": load, "platform": platform.platform()}


def _meets(name: str, value: float) -> str:
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{value:.2f} ({'meets' if ok else 'misses'} {op} {target})"


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}; "
             f"load average at start {[round(x, 2) for x in m['load_avg_at_start']] if m['load_avg_at_start'] else None}. {'QUICK smoke run: not meaningful. ' if results['quick'] else ''}"
             f"Ratios are medians over interleaved rounds in one process.", ""]
    reader = results.get("reader", {})
    if reader.get("reader"):
        lines += ["**Reader** (images/s per core: CPU seconds of the one thread running each loop; batch 64, shuffle "
                  "window 512). `reader` is `ShardStream` yielding channels_last batches ([B,C,H,W] over [B,H,W,C] "
                  "memory, the layout of the decoders and of the trainer's channels_last networks); `contiguous` is "
                  "the same reader yielding contiguous [B,C,H,W] memory (one HWC->CHW copy per image); `raw decode` "
                  "only decodes the same bytes from memory with the same decoder (a new small array per image, "
                  "hot in L1); `raw into batch` is the same decoding into the slots of fresh [B,H,W,C] batch arrays, "
                  "the floor for any loader that yields batches; `webdataset` is "
                  "`wds.WebDataset(urls).decode(\"rgb8\").to_tuple(...)` batched like `reader` (and batched contiguously for "
                  "the `contiguous vs webdataset` column).", "",
                  "| size | format | decoder | reader | contiguous | raw decode | raw into batch | webdataset | "
                  "reader_vs_raw_decode | reader vs raw into batch | reader_vs_webdataset | contiguous vs raw | "
                  "contiguous vs webdataset |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for size, fmts in reader["reader"].items():
            for fmt, r in fmts.items():
                ips = r["images_per_s"]
                lines.append(f"| {size} | {fmt} | {r['decoder']} | {ips['reader']:.0f} | {ips['reader_contiguous']:.0f} | "
                             f"{ips['raw_decode']:.0f} | {ips['raw_decode_into_batch']:.0f} | {ips['webdataset']:.0f} | "
                             f"{_meets('reader_vs_raw_decode', r['reader_vs_raw_decode'])} | "
                             f"{r['reader_vs_raw_decode_into_batch']:.2f} | "
                             f"{_meets('reader_vs_webdataset', r['reader_vs_webdataset'])} | "
                             f"{r['reader_contiguous_vs_raw_decode']:.2f} | {r['reader_contiguous_vs_webdataset']:.2f} |")
        spreads = [f"{size} {fmt} " + " / ".join(f"{p['reader_vs_raw_decode']:.2f}" for p in r["per_process"])
                   for size, fmts in reader["reader"].items() for fmt, r in fmts.items() if r.get("per_process")]
        if spreads:
            lines += ["", "Each row is the median over fresh processes (one process's raw decode varies more than "
                      "its reader); their reader_vs_raw_decode: " + "; ".join(spreads) + "."]
        lines.append("")
    if reader.get("decoders"):
        lines += ["**Decoder choice** (images/s per core on the shards' bytes, to RGB; ratio to PIL)", "",
                  "| size | format | decoders |", "|---|---|---|"]
        for size, fmts in reader["decoders"].items():
            for fmt, d in fmts.items():
                lines.append(f"| {size} | {fmt} | " + ", ".join(f"{k} {d['images_per_s'][k]:.0f} ({d['vs_pil'][k]:.2f}x)"
                                                                for k in d["images_per_s"]) + " |")
        lines.append("")
    if reader.get("scaling"):
        s = reader["scaling"]
        ips = s["images_per_s"]
        lines += ["**Reader scaling** (64x64 JPEG, DataLoader workers, wall clock; the main process only receives "
                  "batches)", "",
                  "| in-process | 1 worker | 2 workers | 2 workers / 1 worker | efficiency vs linear |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {ips['workers_0']:.0f} | {ips['workers_1']:.0f} | {ips['workers_2']:.0f} | "
                  f"{s['speedup_1_to_2_workers']:.2f}x | {s['efficiency_2_workers_vs_linear']:.0%} |", ""]
    scaling = results.get("scaling", {})
    if scaling:
        lines += [f"**Training scaling** (`gentrain launch --nproc-per-node K {scaling['config']}` "
                  f"{' '.join(scaling['overrides'])}: torchrun, gloo, DeepSpeed, the shard reader; same batch per "
                  "process; samples/s from rank 0's metrics.jsonl between its first and last logged step)", "",
                  "| processes | batch per process | steps timed | seconds | samples/s | load avg before / after |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for name, j in scaling["jobs"].items():
            if "error" in j:
                lines.append(f"| {name} | error: {j['error'].splitlines()[-1] if j['error'] else '?'} | | | |")
                continue
            load = (f"{j['load_avg_before'][0]:.1f} / {j['load_avg_after'][0]:.1f}" if "load_avg_before" in j else "")
            lines.append(f"| {j['nproc']} | {j['batch_per_process']} | {j['steps_timed']} | {j['seconds_timed']:.1f} | "
                         f"{j['samples_per_s']:.0f} | {load} |")
        if "efficiency_vs_linear" in scaling:
            lines += ["", f"2 processes / 1 process: {scaling['speedup_1_to_2_processes']:.2f}x, efficiency vs "
                          f"linear {scaling['efficiency_vs_linear']:.0%}."]
        lines.append("")
    trainer = results.get("trainer", {})
    if trainer:
        lines += ["**Trainer step** (ms/step, single process, fp32, 1 thread, each preset's batch and model; "
                  "synthetic uint8 batch)", "",
                  "| model | bare loop | task step (DeepSpeed) | loop step (+logging) | task / bare | loop / task | "
                  "EMA | samples+ckpt amortised | trainer_step_vs_bare_loop |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for kind, t in trainer.items():
            ms = t["ms_per_step"]
            lines.append(f"| {kind} (batch {t['batch_size']}, {t['image_size']}px) | {ms['bare']:.1f} | "
                         f"{ms['task_step']:.1f} | {ms['loop_step']:.1f} | {t['task_step_vs_bare_loop']:.3f} | "
                         f"{t['loop_step_vs_task_step']:.3f} | {t['pieces_ms_per_step'].get('ema_ms', 0):.2f} | "
                         f"{t['amortised_ms_per_step']:.2f} | "
                         f"{_meets('trainer_step_vs_bare_loop', t['trainer_step_vs_bare_loop'])} |")
        lines += ["", "ms columns are medians over rounds of each loop on its own; the ratio columns are medians of "
                  "per-round paired ratios (the figure to trust on a loaded machine)."]
        lines.append("")
    memory = results.get("memory", {})
    if memory:
        lines += ["**Memory** (RSS sampled through the run; slope fitted after the first 30%; the reader is "
                  "ShardStream with its 512-sample shuffle window, batch 64, 64x64 JPEG (with workers: make_loader, RSS "
                  "summed over the main process and its workers); the trainer is the real "
                  "`gentrain train configs/vae_digits.yaml` process with the batch and model width shown, logging, "
                  "samples and checkpoints at the preset's cadence)", "",
                  "| process | length | RSS after warm-up | RSS end | peak RSS | slope | flat |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        notes = []
        for name, r in memory.items():
            if not isinstance(r, dict):
                continue
            if r.get("partial"):
                notes.append(f"{name}: {r['partial']}.")
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | | | |")
                continue
            unit = "batch" if "batchs" in r else "step"
            if "base_channels" in r:
                name = f"{name} (batch {r['batch_size']}, base_channels {r['base_channels']})"
            lines.append(f"| {name} | {r[unit + 's']} {unit}{'es' if unit == 'batch' else 's'} | "
                         f"{r['rss_after_warmup_mib']:.0f} MiB | {r['rss_end_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | "
                         f"{r['slope_mib_per_1k']:+.2f} MiB/1k {unit}{'es' if unit == 'batch' else 's'} | "
                         f"{'yes' if r['flat'] else 'NO'} |")
        lines += [""] + notes + ([f"Memory runs: `{memory['command']}`."] if isinstance(memory.get("command"), str) else [])
        lines.append("")
    remote = results.get("remote", {})
    if remote.get("configs"):
        lines += ["**Remote shards** (`make_loader` over `http://127.0.0.1:PORT/shard-{...}.tar` served by "
                  "bench.remote's server in its own process, against the same JPEG shards on local disk (8 shards of 256 "
                  "samples); batch 64, "
                  "shuffle window 512, channels_last; wall clock, the two loaders timed in alternation; ratio = median "
                  "of per-round ratios; load average "
                  f"{[round(x, 2) for x in remote['load_avg_at_start']]} at start, "
                  f"{[round(x, 2) for x in remote['load_avg_at_end']]} at end)", "",
                  "| size | loader workers | local disk images/s | HTTP images/s | HTTP / local | "
                  "HTTP / local per CPU second (incl. server) |",
                  "|---:|---:|---:|---:|---|---:|"]
        for size, by_workers in remote["configs"].items():
            for workers, r in by_workers.items():
                ratio = (_meets("remote_http_vs_local_256", r["http_vs_local"]) if size == "256"
                         else f"{r['http_vs_local']:.2f}")
                per_cpu = f"{r['cpu_http_vs_local']:.2f}" if r.get("cpu_http_vs_local") else "-"
                lines.append(f"| {size} | {workers.split('_')[1]} | {r['images_per_s']['local']:.0f} | "
                             f"{r['images_per_s']['http']:.0f} | {ratio} | {per_cpu} |")
        lines.append("")
    for part, info in results.get("runs", {}).items():
        if info.get("command") != results["command"]:
            lines.append(f"The {part} figures are from an earlier run: `{info.get('command')}` (load average at start "
                         f"{info.get('load_avg_at_start')}).")
    lines.append(f"Made by `{results['command']}` in {results['seconds']:.0f} s"
                 f"{'; load average at end ' + str([round(x, 2) for x in results['load_avg_at_end']]) if results.get('load_avg_at_end') else ''}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, few rounds: a smoke run (seconds)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where results.json/.md go")
    parser.add_argument("--work", default=None, help="scratch directory for shards and runs (default: a temp dir)")
    parser.add_argument("--only", default="reader,trainer,scaling,memory,remote", help="comma-separated parts to run")
    parser.add_argument("--memory-batches", type=int, default=None, help="reader memory run length (default 4000)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="trainer memory run length in steps (default 1500; 10000 takes about an hour here)")
    parser.add_argument("--scaling-steps", type=int, default=None, help="steps of each training-scaling job (default 200)")
    parser.add_argument("--train-override", action="append", default=[],
                        help="extra key=value override for the real training jobs (scaling, memory); repeatable")
    parser.add_argument("--render", action="store_true", help="only re-render results.md from results.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the parts of DIR/results.json that this run does not redo (each part records "
                             "its own command, machine load and time under 'runs')")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads((Path(args.out) / "results.json").read_text())
        (Path(args.out) / "results.md").write_text(to_markdown(results))
        print(to_markdown(results))
        return 0
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    work = Path(args.work or Path(tempfile.gettempdir()) / f"gentrain-bench{'-quick' if args.quick else ''}")
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    started = time.perf_counter()
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"machine": machine(), "quick": args.quick, "command": command, "targets": TARGETS}
    previous = Path(args.out) / "results.json"
    if args.merge and previous.is_file():
        kept = json.loads(previous.read_text())
        runs = kept.get("runs", {})
        for part in ("reader", "trainer", "scaling", "memory", "remote"):
            if part not in parts and part in kept:
                results[part] = kept[part]
                for name in {"reader": ("reader_vs_raw_decode", "reader_vs_webdataset"),
                             "trainer": ("trainer_step_vs_bare_loop",),
                             "remote": ("remote_http_vs_local_256",)}.get(part, ()):
                    if name in kept:
                        results[name] = kept[name]
                results.setdefault("runs", {})[part] = runs.get(part, {"command": kept.get("command"),
                                                                        "load_avg_at_start": kept["machine"].get("load_avg_at_start")})
    from bench import reader

    if "reader" in parts:
        print("[bench] reader ...", flush=True)
        results["reader"] = reader.run(quick=args.quick, root=work)
        for size, fmts in results["reader"]["reader"].items():  # the named ratios, per size and format
            for fmt, r in fmts.items():
                results.setdefault("reader_vs_raw_decode", {}).setdefault(size, {})[fmt] = r["reader_vs_raw_decode"]
                results.setdefault("reader_vs_webdataset", {}).setdefault(size, {})[fmt] = r["reader_vs_webdataset"]
    if "trainer" in parts:
        print("[bench] trainer ...", flush=True)
        from bench import trainer

        results["trainer"] = trainer.run(quick=args.quick, root=work)
        results["trainer_step_vs_bare_loop"] = {k: v["trainer_step_vs_bare_loop"] for k, v in results["trainer"].items()}
    if "scaling" in parts:
        print("[bench] training scaling ...", flush=True)
        from bench import scaling

        results["scaling"] = scaling.run(args.quick, work, args.scaling_steps, overrides=args.train_override)
    if "memory" in parts:
        print("[bench] memory ...", flush=True)
        from bench import memory

        size = 64
        n = 256 if args.quick else 2048
        shards = reader.build_bench_shards(work, size, "jpg", n, shard_size=max(n // 8, 16))
        results["memory"] = memory.run(args.quick, work, shards, size, args.memory_batches, args.memory_steps,
                                       args.train_override)
    if "remote" in parts:
        print("[bench] remote (HTTP vs local disk) ...", flush=True)
        from bench import remote

        results["remote"] = remote.run(quick=args.quick, root=work)
        results["remote_http_vs_local_256"] = results["remote"]["http_vs_local_256"]
    results["seconds"] = time.perf_counter() - started
    results["load_avg_at_end"] = os.getloadavg()
    for part in parts:
        if part in results:
            results.setdefault("runs", {})[part] = {"command": command, "seconds": results["seconds"],
                                                    "load_avg_at_start": results["machine"]["load_avg_at_start"],
                                                    "load_avg_at_end": results["load_avg_at_end"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results))
    print(to_markdown(results))
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
