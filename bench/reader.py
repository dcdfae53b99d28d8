"""Shard reader throughput against the raw decode limit and the plain webdataset pipeline.

Data: scikit-learn's two sample photographs cut into random square crops (side drawn between
the target size and the photo's short side), resized (bicubic) to 64x64 or 256x256 and
written with ``build_shards`` as JPEG (quality 90) and PNG shards. Nothing is downloaded.

Per (size, format), the loops below run side by side, round-robin, on one core each, timed in
CPU seconds of this thread (bench.common). Each (size, format) runs in ``PROCESSES`` fresh
processes and the figures are medians over them: on this VM one process's raw decode ran
anywhere from 33k to 47k 64x64 JPEGs/s against a steadier reader (36-39k), as if some memory
placements favoured it, so one process's reader_vs_raw_decode was a draw between 0.78 and 0.97
(11 processes, 2026-12-02). The per-process ratios are kept (``per_process``).

* ``reader``: gentrain's ``ShardStream`` (tar -> samples -> shuffle window of 512 -> decode ->
  uint8 [B,C,H,W] batches), num_workers=0, iterated past its shuffle-buffer warm-up, yielding
  channels_last batches (``channels_last=True``: [B,C,H,W] tensors over [B,H,W,C] memory, each
  JPEG decoded straight into its slot). That is the layout channels_last networks
  (``trainer.channels_last``) take, and the decoders' own layout.
* ``reader_contiguous``: the same with contiguous [B,C,H,W] memory (one HWC -> CHW copy per image).
* ``raw_decode``: only the decoder the reader uses, on the same encoded bytes already in
  memory (simplejpeg for JPEG, pyspng for PNG; PIL where they are missing): the limit.
* ``raw_decode_into_batch``: the same decoder on the same bytes, each image written into its slot
  of a fresh [B,H,W,C] batch array (decoded in place where the decoder takes an output buffer,
  copied there where it does not), as any loader that yields batches must. ``raw_decode`` gets
  a new small array per image, which the allocator hands back hot in L1; a batch's slots are
  not: the difference is what landing in a batch costs (64x64 JPEGs, 11 processes here on
  2026-12-02: 0.89-1.17 of raw decode, median 0.975; the reader measured a median 0.89 of it).
* ``webdataset``: ``wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg;png",
  "cls")``, batched the same way (stacked [B,H,W,C], viewed as [B,C,H,W]); ``webdataset_contiguous``
  the same batched into contiguous [B,C,H,W] (compared with ``reader_contiguous``).
"""
from __future__ import annotations

import gc
import io
import itertools
import json
import os
import subprocess
import sys
import time
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import interleaved, interleaved_timed, median, median_ratio

BATCH = 64
PROCESSES = 3  # fresh processes per (size, format), see the module docstring


def make_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random square crops of sklearn's sample photographs, resized to ``size``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(size, min(h, w)), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BICUBIC)
        crops.append(np.asarray(crop))
    return crops


def build_bench_shards(root: Path, size: int, fmt: str, n: int, shard_size: int) -> Path:
    """Shards of ``n`` crops (``size``, ``fmt``) under ``root``; built once, reused after."""
    from data_shards.build import build_shards

    out = root / f"shards-{size}-{fmt}-{n}-labelled"
    if (out / "manifest.json").is_file():
        return out
    folder = root / f"crops-{size}-{n}-labelled"
    if not folder.is_dir():
        tmp = root / f".crops-{size}-{n}-labelled.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(make_crops(n, size)):
            label_dir = tmp / f"photo{i % 2}"  # ImageFolder layout: the shards get .cls labels
            label_dir.mkdir(exist_ok=True)
            Image.fromarray(crop).save(label_dir / f"{i:06d}.png")  # lossless: the shard holds the only lossy step
        os.replace(tmp, folder)
    build_shards(f"folder:{folder}", out, shard_size=shard_size, image_size=size, image_format=fmt, progress=False)
    return out


def raw_decoder(fmt: str):
    """The bare decode call the reader's decode path ends in, for bytes -> HWC uint8."""
    from data_shards import decode

    if fmt == "jpg" and decode._simplejpeg is not None:
        sj = decode._simplejpeg
        return "simplejpeg", lambda data: sj.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False)
    if fmt == "png" and decode._pyspng is not None:
        spng = decode._pyspng
        return "pyspng", lambda data: spng.load(data, "RGB")
    return "PIL", lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def raw_decoder_into(fmt: str):
    """``raw_decoder``'s decode writing into a given HWC uint8 slot instead of a new array."""
    from data_shards import decode

    name, plain = raw_decoder(fmt)
    if name == "simplejpeg":
        sj = decode._simplejpeg
        return lambda data, slot: sj.decode_jpeg(data, "RGB", False, False, 0, 0, 1.0, slot, True)

    def copy_into(data, slot):
        slot[...] = plain(data)
    return copy_into


def collate_contiguous(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [B,C,H,W] in contiguous memory, as the reader's default batches (same copy strategy)."""
    h, w, c = images[0].shape
    out = np.empty((len(images), c, h, w), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = image.transpose(2, 0, 1)
    return torch.from_numpy(out)


def collate_channels_last(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [B,C,H,W] over [B,H,W,C] memory, as the reader's channels_last batches."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def bench_config(shards: Path, size: int, fmt: str, images: int, rounds: int) -> dict:
    """Images/s of reader, raw decode and webdataset for one (size, format), and the ratios."""
    import webdataset as wds

    from data_shards.specs import resolve_shards
    from data_shards.stream import ShardStream
    from data_shards.tars import read_shard

    urls = resolve_shards(shards)
    encoded = [raw[fmt] for url in urls for raw in read_shard(url)]
    decoder_name, decode = raw_decoder(fmt)
    batches = max(1, images // BATCH)
    n_images = batches * BATCH

    stream = iter(ShardStream(urls, BATCH, image_size=size, channels=3, shuffle_buffer=512, seed=0,
                              channels_last=True))
    stream_contiguous = iter(ShardStream(urls, BATCH, image_size=size, channels=3, shuffle_buffer=512, seed=0))

    def wds_batches(collate):
        group = []  # batches run across passes, as the reader's do
        while True:
            pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8").to_tuple("jpg;png", "cls")
            for image, _label in pipeline:
                group.append(image)
                if len(group) == BATCH:
                    yield {"image": collate(group)}
                    group = []

    wds_iter = wds_batches(collate_channels_last)
    wds_contiguous_iter = wds_batches(collate_contiguous)
    cycle = itertools.cycle(encoded)

    def run_reader() -> int:
        for _ in range(batches):
            next(stream)
        return n_images

    def run_reader_contiguous() -> int:
        for _ in range(batches):
            next(stream_contiguous)
        return n_images

    def run_raw() -> int:
        for _ in range(n_images):
            decode(next(cycle))
        return n_images

    decode_into = raw_decoder_into(fmt)

    def run_raw_into_batch() -> int:
        for _ in range(batches):
            batch = np.empty((BATCH, size, size, 3), dtype=np.uint8)
            for i in range(BATCH):
                decode_into(next(cycle), batch[i])
        return n_images

    def run_wds() -> int:
        for _ in range(batches):
            next(wds_iter)
        return n_images

    def run_wds_contiguous() -> int:
        for _ in range(batches):
            next(wds_contiguous_iter)
        return n_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Warm-up: fill the reader's shuffle buffer, open the first shards, touch every byte.
        for _ in range(512 // BATCH + 2):
            next(stream)
            next(stream_contiguous)
        next(wds_iter)
        next(wds_contiguous_iter)
        for data in encoded[:BATCH]:
            decode(data)
        gc.collect()  # the first full collection after importing torch is slow: not in any round
        per_image = interleaved({"reader": run_reader, "raw_decode": run_raw, "webdataset": run_wds,
                                 "raw_decode_into_batch": run_raw_into_batch,
                                 "reader_contiguous": run_reader_contiguous,
                                 "webdataset_contiguous": run_wds_contiguous}, rounds)
    return {
        "images_per_round": n_images,
        "rounds": rounds,
        "decoder": decoder_name,
        "images_per_s": {name: 1.0 / median(times) for name, times in per_image.items()},
        "reader_vs_raw_decode": median_ratio(per_image["raw_decode"], per_image["reader"]),
        "reader_vs_webdataset": median_ratio(per_image["webdataset"], per_image["reader"]),
        "reader_vs_raw_decode_into_batch": median_ratio(per_image["raw_decode_into_batch"], per_image["reader"]),
        "reader_contiguous_vs_raw_decode": median_ratio(per_image["raw_decode"], per_image["reader_contiguous"]),
        "reader_contiguous_vs_webdataset": median_ratio(per_image["webdataset_contiguous"],
                                                        per_image["reader_contiguous"]),
        "per_round_reader_vs_raw_decode": [a / b for a, b in zip(per_image["raw_decode"], per_image["reader"])],
    }


def bench_config_processes(shards: Path, size: int, fmt: str, images: int, rounds: int, processes: int) -> dict:
    """:func:`bench_config` in ``processes`` fresh processes, one after the other: per-process
    results under ``per_process``, and the medians over processes of every figure."""
    runs = []
    for _ in range(processes):
        proc = subprocess.run([sys.executable, "-m", "bench.reader", "--config", str(shards), str(size), fmt,
                               str(images), str(rounds)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise RuntimeError(f"bench.reader --config {size} {fmt} failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = dict(runs[0])
    out["processes"] = processes
    out["images_per_s"] = {name: median([r["images_per_s"][name] for r in runs]) for name in runs[0]["images_per_s"]}
    for key, value in runs[0].items():
        if key.startswith("reader") and isinstance(value, float):
            out[key] = median([r[key] for r in runs])
    out["per_round_reader_vs_raw_decode"] = [x for r in runs for x in r["per_round_reader_vs_raw_decode"]]
    out["per_process"] = [{key: r[key] for key in ("reader_vs_raw_decode", "reader_vs_raw_decode_into_batch",
                                                   "reader_vs_webdataset")}
                          | {"raw_decode_images_per_s": r["images_per_s"]["raw_decode"],
                             "reader_images_per_s": r["images_per_s"]["reader"]} for r in runs]
    return out


def bench_decoders(shards: Path, size: int, images: int, rounds: int, fmt: str = "jpg") -> dict:
    """Decoder choice on the shards' bytes: images/s and ratio to PIL. JPEG: PIL (full decode),
    PIL with draft, simplejpeg, gentrain's decode_image; PNG: PIL, pyspng, decode_image."""
    from data_shards import decode as dec
    from data_shards.specs import resolve_shards
    from data_shards.tars import read_shard

    encoded = [raw[fmt] for url in resolve_shards(shards) for raw in read_shard(url)][:images]

    def pil(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def pil_draft(data):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        return np.asarray(img.convert("RGB"))

    fns = {"pil": pil}
    if fmt == "jpg":
        fns["pil_draft"] = pil_draft
        if dec._simplejpeg is not None:
            fns["simplejpeg"] = lambda data: dec._simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False)
    elif dec._pyspng is not None:
        fns["pyspng"] = lambda data: dec._pyspng.load(data, "RGB")
    fns["gentrain_decode_image"] = lambda data: dec.decode_image(data, fmt, 3, size)

    def loop(fn):
        def run():
            for data in encoded:
                fn(data)
            return len(encoded)
        return run

    per_image = interleaved({name: loop(fn) for name, fn in fns.items()}, rounds)
    return {
        "images_per_s": {name: 1.0 / median(t) for name, t in per_image.items()},
        "vs_pil": {name: median_ratio(per_image["pil"], t) for name, t in per_image.items()},
    }


def bench_scaling(shards: Path, size: int, images: int, rounds: int) -> dict:
    """The reader under a DataLoader with 0, 1 and 2 workers; efficiency against linear."""
    from data_shards.loader import make_loader

    batches = max(1, images // BATCH)
    loaders = {}
    for workers in (0, 1, 2):
        loader = make_loader(shards, BATCH, num_workers=workers, image_size=size, channels=3, shuffle_buffer=512,
                             channels_last=True)
        loaders[workers] = iter(loader)
        for _ in range(512 // BATCH + 2 + 2 * workers):  # start workers, fill their buffers
            next(loaders[workers])

    def run(workers):
        def go():
            # Batches the workers prefetched while other loaders were timed are not theirs
            # to count: drain them (prefetch_factor 2 per worker) before the clock starts.
            for _ in range(2 * workers):
                next(loaders[workers])
            t0 = time.perf_counter()
            for _ in range(batches):
                next(loaders[workers])
            return time.perf_counter() - t0
        return go

    per_image = interleaved_timed({f"workers_{w}": run(w) for w in loaders}, rounds, batches * BATCH)
    rate = {name: 1.0 / median(t) for name, t in per_image.items()}
    out = {
        "images_per_s": rate,
        "speedup_1_to_2_workers": median_ratio(per_image["workers_1"], per_image["workers_2"]),
        "workers_1_vs_in_process": median_ratio(per_image["workers_0"], per_image["workers_1"]),
    }
    out["efficiency_2_workers_vs_linear"] = out["speedup_1_to_2_workers"] / 2
    for it in loaders.values():
        del it
    return out


def run(quick: bool = False, root: Path | None = None) -> dict:
    """All reader figures; ``quick`` uses tiny inputs (a smoke run)."""
    torch.set_num_threads(1)
    root = Path(root or Path(tempfile.gettempdir()) / "gentrain-bench")
    root.mkdir(parents=True, exist_ok=True)
    sizes = {64: 2048, 256: 512}
    images = {(64, "jpg"): 2048, (64, "png"): 1024, (256, "jpg"): 256, (256, "png"): 128}
    rounds = 9
    if quick:
        sizes = {64: 64, 256: 16}
        images = {key: 64 if key[0] == 64 else 16 for key in images}
        rounds = 1
    results: dict = {"reader": {}, "decoders": {}}
    for size, n in sizes.items():
        for fmt in ("jpg", "png"):
            shards = build_bench_shards(root, size, fmt, n, shard_size=max(n // 8, 16))
            if quick:  # one round in this process: a smoke run
                figures = bench_config(shards, size, fmt, images[(size, fmt)], rounds)
            else:
                figures = bench_config_processes(shards, size, fmt, images[(size, fmt)], rounds, PROCESSES)
            results["reader"].setdefault(str(size), {})[fmt] = figures
            results["decoders"].setdefault(str(size), {})[fmt] = bench_decoders(
                shards, size, min(n, images[(size, fmt)]), rounds, fmt)
    if not quick:  # starting workers costs seconds: not for a smoke run
        shards = build_bench_shards(root, 64, "jpg", sizes[64], shard_size=max(sizes[64] // 8, 16))
        results["scaling"] = bench_scaling(shards, 64, images[(64, "jpg")], rounds)
    return results


if __name__ == "__main__":  # one configuration, for bench_config_processes: JSON on the last line
    if len(sys.argv) != 7 or sys.argv[1] != "--config":
        sys.exit("usage: python -m bench.reader --config SHARDS SIZE FORMAT IMAGES ROUNDS")
    torch.set_num_threads(1)
    _, _, shards_dir, size_arg, fmt_arg, images_arg, rounds_arg = sys.argv
    print(json.dumps(bench_config(Path(shards_dir), int(size_arg), fmt_arg, int(images_arg), int(rounds_arg))))
