"""What bounds the shard reader at 64x64: where the decoder reads from and writes to, and what a
loader worker costs.

``python -m bench.reader_limits`` (about 2 minutes here) prints three tables and writes
``bench/reader_limits.json``:

* source: simplejpeg decoding the same 64x64 JPEGs (each into a fresh array, as raw decode)
  from in-memory bytes objects (``raw_decode``), from a bytes copy sliced out of the shard's
  mapping per image (what the reader's direct path does), from a ``memoryview`` slice of the
  mapping (no copy), and from a bytes copy sliced out of the shard read into memory instead of
  mapped. Measured 2026-12-02: the copy cost 0.83-0.95 of raw decode in these bare loops and the
  view 0.94-1.0, yet the same view in the reader (decoding into batch slots) measured
  0.97-1.02x the copy over 7 paired processes: not taken.
* destination: simplejpeg decoding the same in-memory 64x64 JPEGs as ``bench.reader``'s
  ``raw_decode`` (its own fresh output each time), against decoding into a reused 8-slot array
  (96 KiB, which stays in L2), a reused 64-slot array (one batch, 786 KiB), two alternating
  64-slot arrays, and a fresh 64-slot array per batch, as the reader does. Ratios to raw decode,
  medians of paired rounds in CPU seconds of this thread (see bench.common).
* worker: ``make_loader`` with 1 DataLoader worker at batch 16, 64 and 256 against the
  in-process stream at batch 64 (wall clock, the main process only receives). If the worker's
  cost were per image, the rate would not depend on the batch size; the fit
  ``seconds per image = a + b / batch`` gives the cost per batch sent.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, interleaved_timed, median, median_ratio
from bench.reader import build_bench_shards

SIZE = 64
BATCH = 64


def _vs_raw_decode(per_image: dict[str, list[float]]) -> dict:
    """Images/s of each interleaved loop and its paired ratio to the ``raw_decode`` loop."""
    return {name: {"images_per_s": 1.0 / median(t), "vs_raw_decode": median_ratio(per_image["raw_decode"], t)}
            for name, t in per_image.items()}


def source(shards: Path, rounds: int) -> dict:
    """Images/s of each source of the encoded bytes, and its ratio to raw decode."""
    from data_shards import decode
    from data_shards.specs import resolve_shards
    from data_shards.tars import ShardTable, shard_samples

    sj = decode._simplejpeg
    if sj is None:
        return {"skipped": "simplejpeg is not installed"}
    tables = [shard_samples(url) for url in resolve_shards(shards)]
    if not all(isinstance(table, ShardTable) for table in tables):
        return {"skipped": "the bench shards are not indexed as tables"}
    records = [(buf, start, end) for table in tables for buf, start, end, *_ in table.records(range(len(table)))]
    encoded = [bytes(buf[start:end]) for buf, start, end in records]
    views = {id(buf): memoryview(buf) for buf, _, _ in records}
    viewed = [(views[id(buf)], start, end) for buf, start, end in records]
    reads = {id(buf): bytes(buf) for buf, _, _ in records}  # the file's bytes, as a read would hold them
    read = [(reads[id(buf)], start, end) for buf, start, end in records]

    def raw() -> int:
        for data in encoded:
            sj.decode_jpeg(data, "RGB", False, False)
        return len(encoded)

    def sliced(spans):
        def run() -> int:
            for buf, start, end in spans:
                sj.decode_jpeg(buf[start:end], "RGB", False, False)
            return len(spans)
        return run

    fns = {"raw_decode": raw, "bytes_copy_of_mapping": sliced(records), "memoryview_of_mapping": sliced(viewed),
           "bytes_copy_of_read": sliced(read)}
    return _vs_raw_decode(interleaved(fns, rounds))


def destination(shards: Path, rounds: int) -> dict:
    """Images/s of each destination for the decoder's output, and its ratio to raw decode."""
    from data_shards import decode
    from data_shards.specs import resolve_shards
    from data_shards.tars import read_shard

    sj = decode._simplejpeg
    if sj is None:
        return {"skipped": "simplejpeg is not installed"}
    encoded = [raw["jpg"] for url in resolve_shards(shards) for raw in read_shard(url)]
    n = len(encoded) // BATCH * BATCH

    def raw() -> int:
        for data in encoded[:n]:
            sj.decode_jpeg(data, "RGB", False, False)
        return n

    def into_reused(slots: int, arrays: int):
        views = [list(np.empty((slots, SIZE, SIZE, 3), np.uint8)) for _ in range(arrays)]

        def run() -> int:
            for k, data in enumerate(encoded[:n]):
                sj.decode_jpeg(data, "RGB", False, False, 0, 0, 1.0, views[(k // slots) % arrays][k % slots], True)
            return n
        return run

    def into_fresh() -> int:
        for b in range(n // BATCH):
            batch = np.empty((BATCH, SIZE, SIZE, 3), np.uint8)
            for i in range(BATCH):
                sj.decode_jpeg(encoded[b * BATCH + i], "RGB", False, False, 0, 0, 1.0, batch[i], True)
        return n

    fns = {"raw_decode": raw, "reused_8_slots": into_reused(8, 1), "reused_64_slots": into_reused(BATCH, 1),
           "two_alternating_64_slots": into_reused(BATCH, 2), "fresh_64_slots_per_batch": into_fresh}
    return _vs_raw_decode(interleaved(fns, rounds))


def worker(shards: Path, rounds: int, images: int) -> dict:
    """Images/s of the 1-worker loader by batch size, the in-process stream, and the fitted
    per-image and per-batch costs of the worker path."""
    from data_shards.loader import make_loader

    setups = {"in_process_batch_64": (0, 64), "worker_batch_16": (1, 16), "worker_batch_64": (1, 64),
              "worker_batch_256": (1, 256)}
    loaders = {}
    for name, (workers, batch) in setups.items():
        loaders[name] = iter(make_loader(shards, batch, num_workers=workers, image_size=SIZE, channels=3,
                                         shuffle_buffer=512, channels_last=True))
        for _ in range(max(4, 1024 // batch)):  # start the worker, fill the shuffle window
            next(loaders[name])

    def run(name: str):
        workers, batch = setups[name]

        def go() -> float:
            for _ in range(2 * workers):  # what the worker prefetched while the others ran
                next(loaders[name])
            t0 = time.perf_counter()
            for _ in range(images // batch):
                next(loaders[name])
            return time.perf_counter() - t0
        return go

    per_image = interleaved_timed({name: run(name) for name in setups}, rounds, images)
    out = {name: {"images_per_s": 1.0 / median(t)} for name, t in per_image.items()}
    # Least squares of seconds per image = a + b / batch over the three worker batch sizes.
    batches = np.array([setups[k][1] for k in setups if k.startswith("worker")], dtype=float)
    seconds = np.array([median(per_image[k]) for k in setups if k.startswith("worker")])
    b, a = np.polyfit(1.0 / batches, seconds, 1)
    out["fit"] = {"us_per_image": a * 1e6, "ms_per_batch_sent": b * 1e3}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reader_limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per table (default 15)")
    parser.add_argument("--out", type=Path, default=Path("bench/reader_limits.json"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gentrain-bench",
                        help="where the bench shards are built once (shared with bench.reader)")
    parser.add_argument("--quick", action="store_true", help="256 images, one round: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, rounds = (256, 1) if args.quick else (2048, args.rounds)
    shards = build_bench_shards(args.work, SIZE, "jpg", images, shard_size=images // 8)
    results = {"quick": args.quick, "source": source(shards, rounds), "destination": destination(shards, rounds),
               "worker": worker(shards, max(1 if args.quick else 3, rounds // 3), 2 * images)}
    if args.quick:
        print("QUICK smoke run: not meaningful")
    for table in ("source", "destination"):
        for name, row in results[table].items():
            if isinstance(row, dict):
                print(f"{table:11s} {name:26s} {row['images_per_s']:8.0f} img/s  {row['vs_raw_decode']:.3f} of raw decode")
    for name, row in results["worker"].items():
        if name != "fit":
            print(f"loader      {name:26s} {row['images_per_s']:8.0f} img/s")
    fit = results["worker"]["fit"]
    print(f"worker fit: {fit['us_per_image']:.1f} us per image + {fit['ms_per_batch_sent']:.2f} ms per batch sent")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
