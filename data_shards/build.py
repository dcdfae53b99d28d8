"""Build WebDataset shards (``shard-NNNNNN.tar`` + ``manifest.json``) from a data source.

Sources: ``digits`` and ``stacked-digits`` (scikit-learn's shipped 8x8 digits, no download),
the 2-D toy mixtures ``ring8`` and ``grid25``, and ``folder:PATH`` (any tree of images).

The output is byte-for-byte reproducible: the same source, seed and options give identical
tars (fixed member order, mtime 0, uid/gid 0, no user names), so the manifest's sha256 can
be used to check that two machines train on the same data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from data_shards.decode import DEFAULT_MAX_PIXELS, BadSample, decode_image

SOURCES = ("digits", "stacked-digits", "ring8", "grid25", "folder:PATH")
FOLDER_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
IMAGE_FORMATS = ("png", "jpg")
SHARD_NAME = "shard-{:06d}.tar"
MANIFEST_NAME = "manifest.json"
JPEG_QUALITY = 90
DIGITS_COUNT = 1797  # sklearn.datasets.load_digits
MODE_STD = {"ring8": 0.01, "grid25": 0.05}  # per-axis std of each Gaussian mode
# stacked-digits: 16, twice the digits' native 8x8; 32 would carry no more and cost the GAN
# and the loader ~4x (see configs/gan_stacked_digits.yaml).
_DEFAULT_IMAGE_SIZE = {"digits": 32, "stacked-digits": 16, "folder": 64}
_DEFAULT_NUM_SAMPLES = {"stacked-digits": 30_000, "ring8": 50_000, "grid25": 50_000}
_MAX_SKIPPED_LISTED = 100
_SHARD_RE = re.compile(r"shard-(\d{6})\.tar")


@dataclass
class _Plan:
    """What a source produces: metadata for the manifest plus a lazy sample iterator.

    ``samples`` yields ``(members, label)`` where members maps extension -> bytes (without
    ``cls``; the writer adds it from ``label``, which is ``None`` for unlabelled samples).
    """

    kind: str  # "image" | "points"
    fmt: str  # "png" | "jpg" | "npy"
    channels: int | None
    image_size: int | None
    num_classes: int | None
    total: int  # upper bound on the number of samples, for the progress bar
    samples: Iterable[tuple[dict[str, bytes], int | None]]
    classes: list[str] | None = None
    skipped_files: list[str] = field(default_factory=list)


def build_shards(
    source: str,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    image_size: int | None = None,
    seed: int = 0,
    image_format: str = "png",
    progress: bool = True,
    num_samples: int | None = None,
    split: str = "all",
    labels: Iterable[int] | None = None,
) -> dict:
    """Write ``source`` as WebDataset tars plus ``manifest.json`` into ``out_dir``.

    Args:
        source: ``digits``, ``stacked-digits``, ``ring8``, ``grid25`` or ``folder:PATH``.
        out_dir: output directory (created; stale ``shard-*.tar`` from a bigger earlier
            build are removed so the directory always holds exactly this data set).
        shard_size: samples per shard (the last shard may be smaller).
        image_size: output side in pixels (image sources; defaults 32 for digits, 16 for
            stacked-digits, 64 for folders). Ignored for the point sources.
        seed: controls the sample order and every random draw.
        image_format: ``png`` or ``jpg`` (quality 90) for image sources.
        progress: show a tqdm progress bar.
        num_samples: number of samples for generated sources (defaults: stacked-digits
            30,000, ring8/grid25 50,000); a cap for ``digits`` and ``folder:``.
        split: ``all``, or ``train`` / ``test``: a held-out fifth of the source's (seeded)
            sample order goes to ``test``, the rest to ``train``; the two never overlap.
        labels: keep only samples with these labels (e.g. digits 0-8 for an anomaly benchmark).

    Returns:
        The manifest dict that was written.

    Raises:
        ValueError: unknown source, bad option, or a folder without readable images.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    image_format = _normalise_format(image_format)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    plan = _plan(str(source), image_size, seed, image_format, num_samples)
    keep = None if labels is None else set(int(label) for label in labels)
    if split != "all" or keep is not None:
        plan.samples = _select(plan.samples, split, keep)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, class_counts = _write_shards(plan, out, shard_size, progress, desc=f"shards {source}")
    if not shards:
        raise ValueError(f"{source}: no readable samples (skipped {len(plan.skipped_files)} files)")
    _remove_stale_shards(out, len(shards))

    manifest = {
        "source": str(source),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "image_size": plan.image_size,
        "channels": plan.channels,
        "kind": plan.kind,
        "format": plan.fmt,
        "num_classes": plan.num_classes,
        "class_counts": {str(label): n for label, n in sorted(class_counts.items())},
        "shards": shards,
        "skipped": len(plan.skipped_files),
        "seed": seed,
        "split": split,
        "labels": None if keep is None else sorted(keep),
    }
    if plan.classes is not None:
        manifest["classes"] = plan.classes
    if plan.skipped_files:
        manifest["skipped_files"] = plan.skipped_files[:_MAX_SKIPPED_LISTED]
    _atomic_write(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


SPLITS = ("all", "train", "test")
HELD_OUT_EVERY = 5  # every 5th sample of the seeded order is held out: a 20% test split


def _select(samples, split: str, keep: set[int] | None):
    """The samples of one split (by position in the seeded order) with a kept label."""
    for i, (members, label) in enumerate(samples):
        held_out = i % HELD_OUT_EVERY == 0
        if (split == "train" and held_out) or (split == "test" and not held_out):
            continue
        if keep is not None and label not in keep:
            continue
        yield members, label


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """Load ``out_dir/manifest.json`` as written by :func:`build_shards`."""
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())


# ---------------------------------------------------------------------------- sources


def _plan(source: str, image_size, seed: int, fmt: str, num_samples) -> _Plan:
    """Dispatch on the source name."""
    if source == "digits":
        return _digits_plan(image_size or _DEFAULT_IMAGE_SIZE["digits"], seed, fmt, num_samples)
    if source == "stacked-digits":
        n = num_samples or _DEFAULT_NUM_SAMPLES["stacked-digits"]
        return _stacked_digits_plan(image_size or _DEFAULT_IMAGE_SIZE["stacked-digits"], seed, fmt, n)
    if source in ("ring8", "grid25"):
        return _points_plan(source, seed, num_samples or _DEFAULT_NUM_SAMPLES[source])
    if source.startswith("folder:"):
        size = image_size or _DEFAULT_IMAGE_SIZE["folder"]
        return _folder_plan(source[len("folder:") :], size, seed, fmt, num_samples)
    raise ValueError(f"unknown shard source {source!r}; valid sources: {', '.join(SOURCES)}")


def _upsampled_digits(image_size: int) -> tuple[list[Image.Image], np.ndarray]:
    """sklearn's digits (values 0..16) as uint8 "L" images of ``image_size`` pixels."""
    from sklearn.datasets import load_digits  # heavy import, only needed here

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    if image_size != pixels.shape[1]:
        # PIL's bicubic on "L" images clips to 0..255 itself (no overshoot wrap-around).
        images = [im.resize((image_size, image_size), Image.Resampling.BICUBIC) for im in images]
    return images, digits.target.astype(np.int64)


def _digits_plan(image_size: int, seed: int, fmt: str, num_samples) -> _Plan:
    if num_samples is not None and num_samples > DIGITS_COUNT:
        raise ValueError(f"digits has {DIGITS_COUNT} images; num_samples={num_samples} is too many")
    images, labels = _upsampled_digits(image_size)
    # Shuffle before sharding so that every shard holds every class.
    order = np.random.default_rng(seed).permutation(len(images))[: num_samples or len(images)]
    samples = (({fmt: _encode(images[i], fmt)}, int(labels[i])) for i in order)
    return _Plan("image", fmt, 1, image_size, 10, len(order), samples)


def _stacked_digits_plan(image_size: int, seed: int, fmt: str, num_samples: int) -> _Plan:
    images, labels = _upsampled_digits(image_size)
    arrays = [np.asarray(im) for im in images]
    picks = np.random.default_rng(seed).integers(0, len(arrays), size=(num_samples, 3))

    def samples():
        for a, b, c in picks:
            rgb = Image.fromarray(np.stack([arrays[a], arrays[b], arrays[c]], axis=-1))
            yield {fmt: _encode(rgb, fmt)}, int(100 * labels[a] + 10 * labels[b] + labels[c])

    return _Plan("image", fmt, 3, image_size, 1000, num_samples, samples())


def mode_centers(source: str) -> np.ndarray:
    """The mixture means of ``ring8`` (8 on the unit circle) or ``grid25`` ({-4..4 step 2}^2)."""
    if source == "ring8":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if source == "grid25":
        axis = np.arange(-4.0, 5.0, 2.0)
        return np.array([(x, y) for x in axis for y in axis])
    raise ValueError(f"no mode centers for {source!r}")


def _points_plan(source: str, seed: int, num_samples: int) -> _Plan:
    centers = mode_centers(source)
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, len(centers), size=num_samples)
    points = (centers[modes] + MODE_STD[source] * rng.standard_normal((num_samples, 2))).astype(np.float32)
    samples = (({"npy": _npy_bytes(p)}, int(m)) for p, m in zip(points, modes))
    return _Plan("points", "npy", None, None, len(centers), num_samples, samples)


def _folder_plan(path: str, image_size: int, seed: int, fmt: str, num_samples) -> _Plan:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder:{path}: not a directory")
    files = sorted(
        p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(f"folder:{path}: no images found (looked for {', '.join(sorted(FOLDER_EXTENSIONS))})")
    # Labelled only when every image sits in a first-level subfolder (ImageFolder layout);
    # a mix of loose and foldered images is treated as unlabelled rather than guessed at.
    labelled = all(len(f.parts) >= 2 for f in files)
    classes = sorted({f.parts[0] for f in files}) if labelled else None
    class_index = {name: i for i, name in enumerate(classes or [])}
    order = np.random.default_rng(seed).permutation(len(files))
    limit = num_samples or len(files)
    plan = _Plan("image", fmt, 3, image_size, len(classes) if classes else None, min(limit, len(files)), [], classes)

    def samples():
        written = 0
        for i in order:
            if written >= limit:
                return
            rel = files[i]
            image = _load_folder_image(root / rel, image_size)
            if image is None:
                plan.skipped_files.append(rel.as_posix())
                continue
            written += 1
            yield {fmt: _encode(image, fmt)}, class_index[rel.parts[0]] if labelled else None

    plan.samples = samples()
    return plan


def _load_folder_image(path: Path, image_size: int) -> Image.Image | None:
    """RGB, EXIF-upright, shorter side scaled to ``image_size``, centre-cropped; None if unreadable."""
    try:
        data = path.read_bytes()
        array = decode_image(data, path.suffix[1:], 3, image_size, DEFAULT_MAX_PIXELS, exif_transpose=True)
    except (BadSample, OSError):
        return None
    return Image.fromarray(array)


# ---------------------------------------------------------------------------- writing


def _write_shards(plan: _Plan, out: Path, shard_size: int, progress: bool, desc: str):
    """Stream ``plan.samples`` into ``shard-NNNNNN.tar`` files; return (shard entries, class counts)."""
    from tqdm.auto import tqdm

    shards: list[dict] = []
    class_counts: Counter = Counter()
    writer = None
    bar = tqdm(total=plan.total, desc=desc, unit="sample", disable=not progress)
    try:
        for index, (members, label) in enumerate(plan.samples):
            if writer is None:
                writer = _ShardWriter(out / SHARD_NAME.format(len(shards)))
            if label is not None:
                members = {**members, "cls": str(label).encode("ascii")}
                class_counts[label] += 1
            writer.add(f"{index:08d}", members)
            bar.update(1)
            if writer.count == shard_size:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        bar.close()
        if writer is not None:  # an exception mid-shard: leave no temp file behind
            writer.abort()
    return shards, class_counts


class _ShardWriter:
    """One deterministic tar, written to a hidden temp name and renamed into place on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):  # fixed member order -> reproducible bytes
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
            self.tar.addfile(info, io.BytesIO(members[ext]))
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        digest, size = _sha256(self.tmp)
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "num_samples": self.count, "sha256": digest, "bytes": size}

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, num_shards: int) -> None:
    """Delete shards of an earlier, larger build so a directory spec reads only this build."""
    for path in out.iterdir():
        match = _SHARD_RE.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _npy_bytes(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _normalise_format(image_format: str) -> str:
    fmt = str(image_format).lower()
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    return fmt
