"""Stream batches from WebDataset shards: split across ranks and workers, shuffle, decode, batch.

Design points (see ``ShardStream`` for the details):

* Work is split over *slots*: one slot per (rank, DataLoader worker) pair. With at least as
  many shards as slots each slot reads its own shards; with fewer, every slot reads all
  shards and keeps a disjoint, interleaved subset of the samples. Every slot therefore always
  has data, so no rank waits forever on a peer whose worker got no shard.
* The stream is infinite (unless ``passes`` is given): ranks never disagree about an epoch end.
* Bad data never raises and is never dropped silently: each skipped sample is counted under a
  reason and reported in the ``skipped`` dict of the next batch.

This module reads tars itself (with the stdlib ``tarfile``, webdataset's key splitting and
``gopen``) instead of through ``webdataset.tariterators.tar_file_iterator``: Python's
tarfile reports a tar cut at a member boundary, or one with a garbage header mid-archive, as
a normal end of archive, and webdataset 1.0.2 then silently drops the rest of the shard.
"""

from __future__ import annotations

import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from glob import escape as glob_escape, glob
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from data_shards.decode import (
    BAD_LABEL,
    DECODE_ERROR,
    DEFAULT_MAX_PIXELS,
    DUPLICATE_MEMBER,
    IMAGE_EXTENSIONS,
    MISSING_IMAGE,
    TOO_LARGE,
    TRUNCATED_TAR,
    UNREADABLE_SHARD,
    BadSample,
    decode_image,
    decode_label,
    decode_points,
)

SKIP_REASONS = (DECODE_ERROR, BAD_LABEL, TOO_LARGE, TRUNCATED_TAR, MISSING_IMAGE, UNREADABLE_SHARD, DUPLICATE_MEMBER)
_REMOTE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # pipe:, s3://, https://; not C:
_GLOB_CHARS = re.compile(r"[*?\[]")
_META_RE = re.compile(r"__[^/]*__($|/)")  # the same rule as webdataset's tar_file_iterator


# ---------------------------------------------------------------------------- shard specs


def resolve_shards(spec: Any) -> list[str]:
    """Expand a shard spec into an ordered list of shard paths/URLs.

    ``spec`` is a directory (its ``*.tar`` files, sorted), a brace pattern such as
    ``dir/shard-{000000..000009}.tar``, a glob, a single ``.tar`` path, a remote URL
    (``pipe:``, ``s3://``, ... passed through unchecked), or a list (or OmegaConf ListConfig)
    of any of these. Duplicates are dropped, keeping the first occurrence.

    Raises:
        FileNotFoundError: a local shard is missing or the spec matches no shard.
    """
    urls = list(dict.fromkeys(_resolve(spec, spec)))
    if not urls:
        raise FileNotFoundError(f"no shards found for shard spec {spec!r}")
    return urls


def _resolve(part: Any, whole: Any) -> list[str]:
    if isinstance(part, os.PathLike):
        part = os.fspath(part)
    if isinstance(part, str):
        return _resolve_string(part.strip(), whole)
    if isinstance(part, Iterable) and not isinstance(part, (bytes, dict)):
        return [url for item in part for url in _resolve(item, whole)]
    raise TypeError(f"shard spec must be a path, pattern or list of them, got {type(part).__name__}: {part!r}")


def _resolve_string(spec: str, whole: Any) -> list[str]:
    match = _REMOTE_RE.match(spec)
    if match and match.group(1).lower() != "file":
        return expand_urls(spec)
    spec = os.path.expanduser(re.sub(r"^file://?", "", spec))
    if os.path.isdir(spec):
        tars = sorted(glob(os.path.join(glob_escape(spec), "*.tar")))
        if not tars:
            raise FileNotFoundError(f"no .tar shards in directory {spec} (shard spec {whole!r})")
        return tars
    # expand_urls handles {a..b} braces, '::'-joined lists and ${VAR} -> $WDS_VAR.
    urls: list[str] = []
    missing: list[str] = []
    for path in expand_urls(spec):
        if _GLOB_CHARS.search(path):
            found = sorted(glob(path))
            urls.extend(found)
            missing.extend([] if found else [path])
        elif os.path.isfile(path):
            urls.append(path)
        else:
            missing.append(path)
    if missing:
        raise FileNotFoundError(f"shard spec {whole!r}: {len(missing)} shard file(s) not found, e.g. {missing[0]}")
    return urls


def find_manifest(spec: Any) -> dict | None:
    """The ``manifest.json`` next to the first shard of ``spec``, or None if there is none."""
    first = resolve_shards(spec)[0]
    if _REMOTE_RE.match(first):
        return None
    path = Path(first).parent / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------- tar reading


class ShardError(Exception):
    """A shard that could not be read to its end; ``reason`` is a skip reason."""

    def __init__(self, reason: str, url: str, detail: str):
        super().__init__(f"{reason}: {url}: {detail}")
        self.reason = reason


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped, so that truncation is not mistaken for a clean end.

    tarfile ends iteration silently both on the proper end-of-archive block (EOFHeaderError)
    and on an archive cut at a header boundary or with a corrupt header mid-way (Empty-,
    Truncated-, InvalidHeaderError). Only the first is a complete shard.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exn:
            tar.gentrain_stop = exn
            raise


def read_shard(url: str) -> Iterator[dict]:
    """Yield the samples of one tar, in order, as ``{"__key__", "__url__", ext: bytes, ...}``.

    Members are grouped into samples by key exactly as webdataset does (``base_plus_ext``,
    lower-cased extensions, ``__*__`` metadata members ignored). A repeated member is dropped
    and counted in the sample's ``__duplicates__``.

    Raises:
        ShardError: after the last complete sample, if the shard could not be opened
            (``unreadable_shard``) or is damaged (``truncated_tar``). The sample being read
            when the damage was found is dropped, since its members may be incomplete.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as exn:
        raise ShardError(UNREADABLE_SHARD, url, str(exn)) from None
    with closing(stream):
        current: dict | None = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo)
            for info in tar:
                member = _read_member(tar, info)
                tar.members = []  # streaming mode keeps every TarInfo otherwise
                if member is None:
                    continue
                key, ext, data = member
                if current is not None and current["__key__"] == key:
                    if ext in current:
                        current["__duplicates__"] = current.get("__duplicates__", 0) + 1
                    else:
                        current[ext] = data
                    continue
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url, ext: data}
            stop = getattr(tar, "gentrain_stop", None)
        except Exception as exn:  # tarfile.ReadError, EOFError, zlib.error, OSError, ...
            raise ShardError(TRUNCATED_TAR, url, f"{type(exn).__name__}: {exn}") from None
        if not isinstance(stop, tarfile.EOFHeaderError):
            raise ShardError(TRUNCATED_TAR, url, f"no end-of-archive marker ({type(stop).__name__})")
        if current is not None:
            yield current


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[str, str, bytes] | None:
    """(key, extension, bytes) of a regular member, or None for members that are not sample data."""
    if not info.isreg():
        return None
    if _META_RE.match(info.name):
        return None  # webdataset's metadata members (__index__ and the like) are not samples
    key, ext = base_plus_ext(info.name)
    if key is None:
        return None
    return key, ext.lower(), tar.extractfile(info).read()


# ---------------------------------------------------------------------------- samples


@dataclass
class _Item:
    """One decoded sample."""

    key: str
    url: str
    value: np.ndarray  # HWC uint8 image or float32 vector
    label: int


class _SampleDecoder:
    """Decodes raw samples; learns kind, channels and size from the first valid one.

    Fixing them after the first sample is what lets mixed data (a grey PNG among RGB JPEGs,
    an odd-sized image) be converted instead of breaking the batch.
    """

    def __init__(self, kind: str | None, channels: int | None, image_size: int | None, max_pixels: int):
        self.kind = kind
        self.channels = channels
        self.size: int | tuple[int, int] | None = image_size
        self.max_pixels = max_pixels
        self.dim: int | None = None  # points dimension

    def __call__(self, raw: dict) -> _Item:
        kind = self.kind or _detect_kind(raw)
        if kind is None:
            raise BadSample(MISSING_IMAGE, "no image or .npy member")
        payload_ext = _payload_ext(raw, kind)
        if payload_ext is None:
            raise BadSample(MISSING_IMAGE, f"no {kind} member")
        label = decode_label(raw["cls"]) if "cls" in raw else -1
        if kind == "image":
            value = decode_image(raw[payload_ext], payload_ext, self.channels, self.size, self.max_pixels)
            self.channels = value.shape[2]
            self.size = self.size or (value.shape[0], value.shape[1])
        else:
            value = decode_points(raw[payload_ext], self.dim)
            self.dim = value.shape[0]
        self.kind = kind
        return _Item(raw["__key__"], raw["__url__"], value, label)


def _detect_kind(raw: dict) -> str | None:
    if any(ext in IMAGE_EXTENSIONS for ext in raw):
        return "image"
    return "points" if "npy" in raw else None


def _payload_ext(raw: dict, kind: str) -> str | None:
    if kind == "points":
        return "npy" if "npy" in raw else None
    return next((ext for ext in raw if ext in IMAGE_EXTENSIONS), None)


@dataclass
class _PassStats:
    valid: int = 0
    foreign: int = 0  # samples present but belonging to another slot
    skipped: Counter = field(default_factory=Counter)  # this pass only, for the error message


def _shuffled(items: Iterable[_Item], size: int, rng: random.Random) -> Iterator[_Item]:
    """Classic shuffle buffer: once full, emit a random resident for every new arrival."""
    if size <= 1:
        yield from items
        return
    buffer: list[_Item] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------- the stream


class ShardStream(IterableDataset):
    """Infinite stream of batches from WebDataset shards, split over ranks and workers.

    Yields dicts ``{"image": uint8 [B,C,H,W], "label": int64 [B], "skipped": {reason: n}}``
    for image shards, or ``{"points": float32 [B,D], "label": ..., "skipped": ...}`` for
    ``.npy`` shards. ``label`` is -1 where a sample has no ``.cls``; ``skipped`` counts the
    samples skipped since the previous batch of this slot (only non-zero reasons appear).

    Splitting: slot = rank * num_workers + worker_id over world_size * num_workers slots.
    If there are at least as many shards as slots, slot s reads shards ``urls[s::slots]``.
    Otherwise every slot reads every shard and keeps sample j of shard k iff
    ``(k + j) % slots == s``: the rule depends on the shard's position in ``urls`` and the
    sample's position in the shard, not on the (per-slot shuffled) reading order, so the
    slots stay disjoint and together cover each sample exactly once per pass.

    Shuffling: each pass reads this slot's shards in an order drawn from (seed, pass, slot);
    a shuffle buffer of ``shuffle_buffer`` decoded samples, seeded by (seed, slot), mixes them
    (memory: shuffle_buffer * H * W * C bytes per worker).

    Args:
        urls: anything :func:`resolve_shards` accepts.
        batch_size: samples per batch (per rank).
        rank, world_size: this process's place in the job; torch.distributed is not consulted.
        seed: base seed for shard order and shuffle buffer.
        shuffle_buffer: samples held for shuffling (<= 1 disables it).
        channels: 1 or 3 to convert every image; None keeps the first image's channel count.
        image_size: resize/centre-crop every image to this side; None keeps the first
            image's size (later images are fitted to it).
        kind: "image" or "points"; None detects it from the first sample's extension.
        max_pixels: images whose header announces more pixels are skipped as ``too_large``.
        passes: stop after this many passes (flushing a final partial batch); None = forever.
        return_keys: also yield ``__key__``/``__url__`` lists and the ``__slot__`` index.

    Raises (while iterating):
        RuntimeError: a whole pass over this slot's shards produced no valid sample.
    """

    def __init__(
        self,
        urls: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 512,
        channels: int | None = None,
        image_size: int | None = None,
        kind: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        passes: int | None = None,
        return_keys: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
        if kind not in (None, "image", "points"):
            raise ValueError(f"kind must be 'image', 'points' or None, got {kind!r}")
        if passes is not None and passes < 1:
            raise ValueError(f"passes must be >= 1 or None, got {passes}")
        self.urls = resolve_shards(urls)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.channels, self.image_size, self.kind = channels, image_size, kind
        self.max_pixels = max_pixels
        self.passes = passes
        self.return_keys = return_keys

    def slot(self) -> tuple[int, int]:
        """(slot, num_slots) of the calling process/worker."""
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots = self.slot()
        skipped: Counter = Counter()
        samples = self._samples(slot, num_slots, skipped)
        samples = _shuffled(samples, self.shuffle_buffer, random.Random(f"{self.seed}:{slot}"))
        batch: list[_Item] = []
        for item in samples:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped, slot)
                batch = []
        if batch:  # only reached when `passes` is finite
            yield self._collate(batch, skipped, slot)

    def _samples(self, slot: int, num_slots: int, skipped: Counter) -> Iterator[_Item]:
        """Decoded samples of this slot, pass after pass."""
        decoder = _SampleDecoder(self.kind, self.channels, self.image_size, self.max_pixels)
        share_all = False
        pass_index = 0
        while self.passes is None or pass_index < self.passes:
            stats = _PassStats()
            yield from self._one_pass(pass_index, slot, num_slots, share_all, decoder, skipped, stats)
            if stats.valid == 0:
                if stats.foreign and not share_all:
                    # Fewer samples than slots: better to repeat data on this slot than to
                    # leave its rank without batches (which would hang the whole job).
                    warnings.warn(
                        f"slot {slot} of {num_slots}: no valid sample among this slot's share of "
                        f"{len(self.urls)} shard(s); it now reads all of them (samples may repeat across slots)"
                    )
                    share_all = True
                    continue
                raise RuntimeError(
                    f"no valid samples in shards: {_describe(self._slot_urls(slot, num_slots, share_all))} "
                    f"(slot {slot} of {num_slots}; skipped {dict(stats.skipped)})"
                )
            pass_index += 1

    def _slot_urls(self, slot: int, num_slots: int, share_all: bool) -> list[tuple[int, str]]:
        indexed = list(enumerate(self.urls))
        return indexed if share_all or len(indexed) < num_slots else indexed[slot::num_slots]

    def _one_pass(self, pass_index, slot, num_slots, share_all, decoder, skipped, stats) -> Iterator[_Item]:
        shards = self._slot_urls(slot, num_slots, share_all)
        random.Random(f"{self.seed}:{pass_index}:{slot}").shuffle(shards)
        interleave = len(self.urls) < num_slots and not share_all

        def count(reason: str) -> None:
            skipped[reason] += 1
            stats.skipped[reason] += 1

        for k, url in shards:
            try:
                for j, raw in enumerate(read_shard(url)):
                    if interleave and (k + j) % num_slots != slot:
                        stats.foreign += 1
                        continue
                    for _ in range(raw.pop("__duplicates__", 0)):
                        count(DUPLICATE_MEMBER)
                    try:
                        item = decoder(raw)
                    except BadSample as bad:
                        count(bad.reason)
                        continue
                    stats.valid += 1
                    yield item
            except ShardError as exn:
                # Every slot may read this shard; only its owner reports the damage so that
                # the counts summed over slots match what is in the data.
                if k % num_slots == slot:
                    count(exn.reason)

    def _collate(self, batch: list[_Item], skipped: Counter, slot: int) -> dict:
        values = np.stack([item.value for item in batch])
        out: dict[str, Any] = {}
        if values.dtype == np.uint8:
            out["image"] = torch.from_numpy(values).permute(0, 3, 1, 2).contiguous()
        else:
            out["points"] = torch.from_numpy(values)
        out["label"] = torch.tensor([item.label for item in batch], dtype=torch.int64)
        out["skipped"] = {reason: n for reason, n in skipped.items() if n}
        skipped.clear()
        if self.return_keys:
            out["__key__"] = [item.key for item in batch]
            out["__url__"] = [item.url for item in batch]
            out["__slot__"] = slot
        return out


def _describe(shards: list[tuple[int, str]], limit: int = 3) -> str:
    names = [url for _, url in sorted(shards)]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------- loader


def make_loader(
    urls: Any,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 512,
    channels: int | None = None,
    image_size: int | None = None,
    **stream_options: Any,
) -> DataLoader:
    """A DataLoader over a :class:`ShardStream` (which batches itself, hence batch_size=None).

    Extra keyword arguments (kind, max_pixels, passes, return_keys) go to ShardStream.
    """
    dataset = ShardStream(
        urls,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        channels=channels,
        image_size=image_size,
        **stream_options,
    )
    worker_options = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # pinning only helps host-to-GPU copies
        **worker_options,
    )


def batch_to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 images (0..255) to floats in [-1, 1]."""
    return images.to(dtype).div_(127.5).sub_(1.0)
