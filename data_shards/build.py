"""Build WebDataset shards (``shard-NNNNNN.tar`` + ``manifest.json``) from a data source.

Sources (implemented in :mod:`data_shards.sources`):

- ``digits`` and ``stacked-digits``: scikit-learn's shipped 8x8 digits (no download);
- ``ring8`` and ``grid25``: 2-D Gaussian mixtures (``KEY.npy`` float32 points);
- ``photos``: labelled random crops of the 16 photographs shipped inside scikit-image,
  scikit-learn and matplotlib (default 64 px; 6,000 crops, 1,200 for ``--split test``).
  Train and test crops come from disjoint regions: ``test`` crops lie inside the
  bottom-right 45% x 45% block of each photo, ``train`` crops never touch it;
- ``folder:PATH``: any tree of images (first-level sub-folders are classes);
- ``pairs:sr4:SOURCE``, ``pairs:edges:SOURCE``, ``pairs:folder:PATH``: paired samples.

Sample layout: ``KEY.png`` / ``KEY.jpg`` (+ ``KEY.cls``, an ASCII integer label) for image
sources, ``KEY.npy`` (+ ``KEY.cls``) for points, and for paired sources ``KEY.src.png`` (the
input) + ``KEY.tgt.png`` (the target) (+ ``KEY.cls``): standard WebDataset members. A paired
manifest has ``"kind": "pairs"``, ``"paired": true``, ``"pair_kind"``, ``"src_size"``,
``"tgt_size"`` (= ``image_size``) and ``"channels"``. sr4's input is the target downscaled
4x with ``Image.resize((S//4, S//4), Image.BICUBIC)``; edges' input is a Sobel sketch of the
target; pairs:folder reads ``PATH/src/NAME.*`` + ``PATH/tgt/NAME.*`` or ``PATH/NAME_src.*`` +
``PATH/NAME_tgt.*`` (see :mod:`data_shards.sources.pairs`).

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
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from data_shards.sources import SOURCES, SPLITS, MissingPackage, Plan, plan_source
from data_shards.sources.base import HELD_OUT_EVERY, JPEG_QUALITY
from data_shards.sources.folder import FOLDER_EXTENSIONS
from data_shards.sources.toy import DIGITS_COUNT, MODE_STD, mode_centers

__all__ = ["SOURCES", "SPLITS", "HELD_OUT_EVERY", "IMAGE_FORMATS", "MODE_STD", "MissingPackage", "build_shards",
           "mode_centers", "parse_labels", "read_manifest", "FOLDER_EXTENSIONS", "JPEG_QUALITY", "DIGITS_COUNT"]

IMAGE_FORMATS = ("png", "jpg")
SHARD_NAME = "shard-{:06d}.tar"
MANIFEST_NAME = "manifest.json"
_MAX_SKIPPED_LISTED = 100
_SHARD_RE = re.compile(r"shard-(\d{6})\.tar")


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
    _publish=None,
) -> dict:
    """Write ``source`` as WebDataset tars plus ``manifest.json`` into ``out_dir``.

    Args:
        source: ``digits``, ``stacked-digits``, ``ring8``, ``grid25``, ``photos``,
            ``folder:PATH``, ``pairs:sr4:SOURCE``, ``pairs:edges:SOURCE`` or ``pairs:folder:PATH``.
        out_dir: output directory (created; stale ``shard-*.tar`` from a bigger earlier
            build are removed so the directory always holds exactly this data set), or
            ``s3://BUCKET/prefix``: each shard is uploaded as soon as it is written (and
            removed from a local staging directory, so at most one shard is on local disk),
            ``manifest.json`` last, then stale ``shard-*.tar`` under the prefix are deleted.
            Credentials and endpoint as for reading (data_shards.remote; needs boto3).
        shard_size: samples per shard (the last shard may be smaller).
        image_size: output side in pixels (image sources; defaults 32 for digits, 16 for
            stacked-digits, 64 for photos and folders; for pairs the target's side, the
            inner source's default; sr4 needs a multiple of 4). Ignored for the point sources.
        seed: controls the sample order and every random draw.
        image_format: ``png`` or ``jpg`` (quality 90) for image sources (both members of a pair).
        progress: show a tqdm progress bar.
        num_samples: number of samples for generated sources (defaults: stacked-digits
            30,000, ring8/grid25 50,000, photos 6,000 or 1,200 for ``test``); a cap for
            ``digits``, ``folder:`` and ``pairs:folder:``. Pairs pass it to their inner source.
        split: ``all``, or ``train`` / ``test``: a held-out fifth of the source's (seeded)
            sample order goes to ``test``, the rest to ``train``; the two never overlap.
            ``photos`` splits by region instead: test crops come from each photo's
            bottom-right block, which train crops never touch.
        labels: keep only samples with these labels (e.g. digits 0-8 for an anomaly benchmark).

    Returns:
        The manifest dict that was written.

    Raises:
        ValueError: unknown source, bad option, or a folder without readable images;
            :class:`MissingPackage` (a ValueError) when a source's package is not installed.
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
    bucket = _s3_out(out_dir)
    if bucket is not None:  # each shard uploaded once written (and deleted here), the manifest last
        with tempfile.TemporaryDirectory(prefix="gentrain-shards-") as staging:
            manifest = build_shards(source, staging, shard_size, image_size, seed, image_format, progress,
                                    num_samples, split, labels, _publish=lambda path: _upload(path, bucket))
            _upload(Path(staging) / MANIFEST_NAME, bucket)
            _remove_stale_s3_shards(bucket, manifest["num_shards"])
        return manifest
    keep = None if labels is None else set(int(label) for label in labels)
    plan = plan_source(str(source), image_size, seed, image_format, num_samples, split, keep)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, class_counts = _write_shards(plan, out, shard_size, progress, desc=f"shards {source}", publish=_publish)
    if not shards:
        raise ValueError(f"{source}: no readable samples (skipped {len(plan.skipped_files)} files)")
    if _publish is None:
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
    manifest.update(plan.extra)
    if plan.skipped_files:
        manifest["skipped_files"] = plan.skipped_files[:_MAX_SKIPPED_LISTED]
        manifest["skipped_reasons"] = dict(sorted(plan.skip_reasons.items()))
    _atomic_write(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def parse_labels(text: str | None) -> set[int] | None:
    """``'0-8'``, ``'0,3,7'`` or ``'0-3,7'`` -> a set of ints; None or ``''`` -> None (all labels)."""
    if not text:
        return None
    labels: set[int] = set()
    try:
        for part in str(text).split(","):
            low, _, high = part.strip().partition("-")
            labels.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"labels must look like 0-8, 0,3,7 or 0-3,7; got {text!r}") from None
    return labels


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """Load ``out_dir/manifest.json`` as written by :func:`build_shards` (``out_dir`` may be an
    ``s3://`` prefix)."""
    bucket = _s3_out(out_dir)
    if bucket is not None:
        from data_shards import remote

        data = remote.read_object(f"{bucket}/{MANIFEST_NAME}")
        if data is None:
            raise FileNotFoundError(f"no {MANIFEST_NAME} at {bucket}")
        return json.loads(data)
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())


# ---------------------------------------------------------------------------- s3:// output


def _s3_out(out_dir) -> str | None:
    """``s3://bucket/prefix`` (no trailing slash) for an s3 output; None for a local directory.

    Raises:
        ValueError: another URL scheme (shards are written to a directory or to S3).
    """
    text = os.fspath(out_dir) if isinstance(out_dir, os.PathLike) else str(out_dir)
    found = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+)://", text)
    if not found:
        return None
    if found.group(1).lower() != "s3" or not text[5:].strip("/"):
        raise ValueError(f"--out must be a directory or s3://BUCKET/prefix, got {text!r}")
    return text.rstrip("/")


def _upload(path: Path, prefix: str) -> None:
    from data_shards import remote

    remote.upload_file(path, f"{prefix}/{path.name}")
    if path.name != MANIFEST_NAME:
        path.unlink()


def _remove_stale_s3_shards(prefix: str, num_shards: int) -> None:
    """Delete shards of an earlier, larger build under the prefix (see _remove_stale_shards)."""
    from data_shards import remote

    stale = [name for name in remote.list_names(prefix + "/")
             if (match := _SHARD_RE.fullmatch(name)) and int(match.group(1)) >= num_shards]
    remote.delete_objects([f"{prefix}/{name}" for name in stale])


# ---------------------------------------------------------------------------- writing


def _write_shards(plan: Plan, out: Path, shard_size: int, progress: bool, desc: str, publish=None):
    """Stream ``plan.samples`` into ``shard-NNNNNN.tar`` files; return (shard entries, class counts).
    ``publish(path)`` is called on each shard once it is complete."""
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
                if publish is not None:
                    publish(writer.path)
                writer = None
        if writer is not None:
            shards.append(writer.close())
            if publish is not None:
                publish(writer.path)
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


def _normalise_format(image_format: str) -> str:
    fmt = str(image_format).lower()
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    return fmt
