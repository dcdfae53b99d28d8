"""Stream batches from WebDataset shards: split across ranks and workers, shuffle, decode, batch.

Design points (see ``ShardStream`` for the details):

* Work is split over *slots*: one slot per (rank, DataLoader worker) pair. With at least as
  many shards as slots each slot reads its own shards; with fewer, every slot reads all
  shards and keeps a disjoint, interleaved subset of the samples. Every slot therefore always
  has data, so no rank waits forever on a peer whose worker got no shard.
* The stream is infinite (unless ``passes`` is given): ranks never disagree about an epoch end.
* Bad data never raises and is never dropped silently: each skipped sample is counted under a
  reason and reported in the ``skipped`` dict of the next batch.

Tars are read by :mod:`data_shards.tars` (samples grouped as webdataset groups them, damage
reported instead of silently ending the shard).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import warnings
import weakref
from collections import Counter
from itertools import chain, islice
from dataclasses import dataclass, field
from glob import escape as glob_escape, glob
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from data_shards.errors import NoValidSamples
from data_shards.slabs import SlabTransport, _WorkerSlabs
from data_shards.decode import (
    _target_hw,
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
    decode_image_fast,
    decode_jpeg_into,
    decode_label,
    decode_png_rgb,
    decode_points,
)
from data_shards.tars import REMOTE_RE as _REMOTE_RE, ShardError, ShardTable, read_shard, record_sample, shard_samples

SKIP_REASONS = (DECODE_ERROR, BAD_LABEL, TOO_LARGE, TRUNCATED_TAR, MISSING_IMAGE, UNREADABLE_SHARD, DUPLICATE_MEMBER)
_GLOB_CHARS = re.compile(r"[*?\[]")


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


# ---------------------------------------------------------------------------- samples


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
        self.target: tuple[int, int] | None = None  # (height, width), once channels and size are known
        self.buffer: np.ndarray | None = None  # where the fast JPEG path may write the next image (HWC)
        # Whether plain JPEGs (decoded into the buffer) and 8-bit PNGs of the target size may
        # take the direct path (see row).
        self.direct = False

    def __call__(self, raw: dict) -> tuple[np.ndarray, int]:
        """(value, label) of a raw sample; raises BadSample. ``value`` may be a view of a buffer
        this decoder reuses: copy it out before the next call."""
        kind = self.kind or _detect_kind(raw)
        if kind is None:
            raise BadSample(MISSING_IMAGE, "no image or .npy member")
        payload_ext = _payload_ext(raw, kind)
        if payload_ext is None:
            raise BadSample(MISSING_IMAGE, f"no {kind} member")
        label = decode_label(raw["cls"]) if "cls" in raw else -1
        if kind == "image":
            value = None
            if self.target is not None:
                value = decode_image_fast(raw[payload_ext], self.channels, self.target, self.max_pixels, self.buffer)
            if value is None:
                value = decode_image(raw[payload_ext], payload_ext, self.channels, self.size, self.max_pixels)
                if self.target is None:
                    self.channels = value.shape[2]
                    self.size = self.size or (value.shape[0], value.shape[1])
                    self.target = _target_hw(self.size)
                    # decode_image_fast's own condition for decoding into the buffer (3 channels,
                    # an image of the target size within max_pixels), fixed from here on.
                    self.direct = self.channels == 3 and self.target[0] * self.target[1] <= self.max_pixels
        else:
            value = decode_points(raw[payload_ext], self.dim)
            self.dim = value.shape[0]
        self.kind = kind
        return value, label

    def row(self, record: tuple) -> tuple[np.ndarray, int]:
        """What ``self(record_sample(record))`` returns for a ShardTable record (see
        ``ShardTable.records``), without building the sample's dict once the stream's image
        target is known: from then on ``self.kind`` is "image", the payload is the table's
        image member and the label its parsed .cls."""
        buf, start, end, label, plain, _, _, _, (image_ext, _) = record
        if self.target is None or image_ext is None:
            return self(record_sample(record))
        if label is None:
            decode_label(record_sample(record)["cls"])  # raises BadSample, with the label in its message
        data = buf[start:end]
        buffer = self.buffer
        if self.direct and buffer is not None:  # the usual images, each with a single decoder call
            value = _decode_direct(data, plain, buffer)
            if value is not None:
                return value, label
        value = decode_image_fast(data, self.channels, self.target, self.max_pixels, buffer)
        if value is None:
            value = decode_image(data, image_ext, self.channels, self.size, self.max_pixels)
        return value, label


def _decode_direct(data, plain: bool, slot: np.ndarray) -> np.ndarray | None:
    """The direct path's one decoder call for an image whose HWC ``slot`` is its target: a plain
    JPEG is decoded into ``slot``, an 8-bit PNG of ``slot``'s shape into a new array (libspng
    takes no output buffer); None where the general path must decide."""
    return decode_jpeg_into(data, slot) if plain else decode_png_rgb(data, slot.shape)


def _detect_kind(raw: dict) -> str | None:
    if any(ext in IMAGE_EXTENSIONS for ext in raw):
        return "image"
    return "points" if "npy" in raw else None


def _payload_ext(raw: dict, kind: str) -> str | None:
    if kind == "points":
        return "npy" if "npy" in raw else None
    for ext in raw:  # the first image member, in member order
        if ext in IMAGE_EXTENSIONS:
            return ext
    return None


@dataclass
class _PassStats:
    valid: int = 0
    foreign: int = 0  # samples present but belonging to another slot
    skipped: Counter = field(default_factory=Counter)  # this pass only, for the error message


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

    Shuffling: each pass reads this slot's shards in an order drawn from (seed, pass, slot),
    cuts the stream of raw (undecoded) samples into windows of ``shuffle_buffer`` samples and
    visits each window in a permutation drawn from (seed, slot, pass, window). Unlike a
    reservoir buffer, the position in such a stream is three integers (pass, window, offset),
    which is what makes mid-pass resumption exact and cheap: skipped windows are read but not
    decoded. Memory: shuffle_buffer raw samples per worker, plus the index (keys, member
    offsets, labels) of up to 131,072 samples of plain local shards, kept across passes so
    that a later pass only reads the files again (see data_shards.tars).

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
        start_positions: ``{logical_worker: position}`` as found in the ``__worker__`` and
            ``__position__`` entries of earlier batches: each worker continues right after the
            last batch it produced, so a resumed stream yields exactly the batches the
            uninterrupted stream would have. Valid for the same urls, seed, shuffle_buffer,
            batch_size, world size and worker count.
        worker_offset: DataLoader worker i plays logical worker (i + offset) % num_workers.
            A fresh DataLoader takes its first batch from worker 0; after N batches the next
            one is due from logical worker N % num_workers, hence offset = N % num_workers.
        channels_last: yield images as a [B,C,H,W] view of [B,H,W,C] memory
            (``torch.channels_last``) instead of a contiguous tensor: same values, no HWC->CHW
            copy on the loader's core (about 13% of a 256x256 JPEG's decode time here). For
            consumers that move the batch to an accelerator first and reorder it there.

    Raises (while iterating):
        NoValidSamples: a whole pass over this slot's shards produced no valid sample.
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
        channels_last: bool = False,
        start_positions: dict | None = None,
        worker_offset: int = 0,
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
        self.channels_last = channels_last
        self.start_positions = dict(start_positions or {})
        self.worker_offset = worker_offset
        self.transport: SlabTransport | None = None  # make_loader's, with DataLoader workers

    def slot(self) -> tuple[int, int, int]:
        """(slot, num_slots, logical worker) of the calling process/worker."""
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker_id + self.worker_offset) % num_workers
        return self.rank * num_workers + logical, self.world_size * num_workers, logical

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, logical = self.slot()
        skipped: Counter = Counter()
        decoder = _SampleDecoder(self.kind, self.channels, self.image_size, self.max_pixels)
        slabs = self.transport.worker_slabs() if self.transport is not None else None
        batcher = _Batcher(self.batch_size, self.channels_last, self.return_keys, decoder, skipped, slot, logical,
                           slabs)
        yield from self._batches(slot, num_slots, skipped, self.start_positions.get(logical), decoder, batcher)
        if batcher.count:  # only reached when `passes` is finite
            end = {"pass": self.passes, "window": 0, "offset": 0, "share_all": False}
            yield batcher.emit(batcher.flush(), end)

    def _batches(self, slot: int, num_slots: int, skipped: Counter, start: dict | None, decoder: "_SampleDecoder",
                 batcher: "_Batcher"):
        """The batches of this slot, pass after pass, from `start` (a final partial one aside)."""
        share_all = bool(start and start.get("share_all"))
        pass_index = int(start["pass"]) if start else 0
        while self.passes is None or pass_index < self.passes:
            stats = _PassStats()
            resume = start if start and int(start["pass"]) == pass_index else None
            yield from self._one_pass(pass_index, slot, num_slots, share_all, decoder, batcher, skipped, stats, resume)
            if stats.valid == 0 and resume is None:
                if stats.foreign and not share_all:
                    # Fewer samples than slots: better to repeat data on this slot than to
                    # leave its rank without batches (which would hang the whole job).
                    warnings.warn(
                        f"slot {slot} of {num_slots}: no valid sample among this slot's share of "
                        f"{len(self.urls)} shard(s); it now reads all of them (samples may repeat across slots)"
                    )
                    share_all = True
                    continue
                raise NoValidSamples(
                    f"no valid samples in shards: {_describe(self._slot_urls(slot, num_slots, share_all))} "
                    f"(slot {slot} of {num_slots}; skipped {dict(stats.skipped)})"
                )
            pass_index += 1

    def _slot_urls(self, slot: int, num_slots: int, share_all: bool) -> list[tuple[int, str]]:
        indexed = list(enumerate(self.urls))
        return indexed if share_all or len(indexed) < num_slots else indexed[slot::num_slots]

    def _one_pass(self, pass_index, slot, num_slots, share_all, decoder, batcher, skipped, stats, resume):
        """One pass over this slot's shards: windows of raw samples, each visited in a seeded
        permutation, decoded lazily into `batcher`. `resume` skips the windows and offsets
        already consumed (read, not decoded, and not counted again). Yields the batches that
        fill up, each once the next valid sample is in (see _Batcher.add), with that sample's
        position (pass, window, offset, share_all)."""
        window_size = max(1, self.shuffle_buffer)
        first_window = int(resume["window"]) if resume else 0
        first_offset = int(resume["offset"]) if resume else 0
        counting = {"on": first_window == 0}

        def count(reason: str) -> None:
            if counting["on"]:
                skipped[reason] += 1
                stats.skipped[reason] += 1

        raw_samples = self._raw_samples(pass_index, slot, num_slots, share_all, stats, count)
        # Bound once: this loop runs once per sample, and its own work is most of what the
        # stream adds to the decode (64x64 images decode in tens of microseconds).
        row, decode, add, emit, put_rows = decoder.row, decoder, batcher.add, batcher.emit, batcher.put_rows
        w = 0
        while True:
            # Shard damage found while filling window w is counted iff window w - 1 was.
            window = list(islice(raw_samples, window_size))
            if not window:
                return
            counting["on"] = w >= first_window
            if w >= first_window:
                order = range(len(window))
                if window_size > 1:
                    order = random.Random(f"{self.seed}:{slot}:{pass_index}:{w}").sample(order, len(window))
                j, n = (first_offset if w == first_window else 0), len(window)
                while j < n:
                    stop = put_rows(window, order, j, n)  # the usual records, in bulk
                    stats.valid += stop - j
                    j = stop
                    if j == n:
                        break
                    raw = window[order[j]]
                    j += 1
                    try:
                        if type(raw) is tuple:  # a ShardTable record: no dict, no duplicates
                            value, label = row(raw)
                            key, url = raw[5], raw[6]
                        else:
                            if "__duplicates__" in raw:
                                for _ in range(raw.pop("__duplicates__")):
                                    count(DUPLICATE_MEMBER)
                            value, label = decode(raw)
                            key, url = raw["__key__"], raw["__url__"]
                    except BadSample as bad:
                        count(bad.reason)
                        continue
                    stats.valid += 1
                    full = add(value, label, key, url)
                    if full is not None:
                        yield emit(full, (pass_index, w, j - 1, share_all))
            w += 1

    def _raw_samples(self, pass_index, slot, num_slots, share_all, stats, count) -> Iterator[dict | tuple]:
        """This slot's undecoded samples of one pass, its shards in a seeded order: read_shard's
        dicts, or ShardTable records for shards indexed as tables. A table's records come as
        one list, chained in C: no Python frame resumed per sample."""
        shards = self._slot_urls(slot, num_slots, share_all)
        random.Random(f"{self.seed}:{pass_index}:{slot}").shuffle(shards)
        interleave = len(self.urls) < num_slots and not share_all
        return chain.from_iterable(self._shard_parts(shards, slot, num_slots, interleave, stats, count))

    def _shard_parts(self, shards, slot, num_slots, interleave, stats, count) -> Iterator[Iterable]:
        """Per shard, the iterable of this slot's samples in it (see _raw_samples)."""
        for k, url in shards:
            try:
                source = shard_samples(url)
            except ShardError as exn:
                self._shard_damage(k, slot, num_slots, exn, count)
                continue
            if isinstance(source, ShardTable):  # complete by construction: no ShardError
                picked = range(len(source))
                if interleave:  # sample j is this slot's iff (k + j) % num_slots == slot
                    picked = range((slot - k) % num_slots, len(source), num_slots)
                    stats.foreign += len(source) - len(picked)
                yield source.records(picked)
            else:
                yield self._dict_share(k, source, slot, num_slots, interleave, stats, count)

    def _dict_share(self, k, source, slot, num_slots, interleave, stats, count) -> Iterator[dict]:
        """This slot's samples among read_shard's dicts of shard k; damage counted, not raised."""
        try:
            if not interleave:
                yield from source
                return
            for j, raw in enumerate(source):
                if (k + j) % num_slots != slot:
                    stats.foreign += 1
                    continue
                yield raw
        except ShardError as exn:
            self._shard_damage(k, slot, num_slots, exn, count)

    @staticmethod
    def _shard_damage(k: int, slot: int, num_slots: int, exn: ShardError, count) -> None:
        # Every slot may read this shard; only its owner reports the damage so that the
        # counts summed over slots match what is in the data.
        if k % num_slots == slot:
            count(exn.reason)


def _position(pass_index: int, window: int, offset: int, share_all: bool) -> dict:
    return {"pass": pass_index, "window": window, "offset": offset, "share_all": share_all}


class _Batcher:
    """Fills one slot's batches: each valid sample lands in its batch's array as it comes.

    Images are kept as HWC slots of a [B,H,W,C] array (channels_last: the batch is a
    [B,C,H,W] view of it, and the fast JPEG path decodes straight into the slot, see
    ``decoder.buffer``) or copied HWC -> CHW into a [B,C,H,W] array (contiguous) from a
    reused decode buffer.

    A full batch goes out only once the next valid sample is in (decoded into the next
    batch's array, allocated as soon as this one is full): samples skipped in between are
    then counted in this batch, and resuming at that sample's position neither repeats nor
    recounts anything.
    """

    __slots__ = ("size", "channels_last", "return_keys", "decoder", "skipped", "slot", "logical", "count",
                 "array", "labels", "keys", "urls", "transpose", "scratch", "spare", "slabs", "new_array")

    def __init__(self, size: int, channels_last: bool, return_keys: bool, decoder: _SampleDecoder,
                 skipped: Counter, slot: int, logical: int, slabs: "_WorkerSlabs | None" = None):
        self.size, self.channels_last, self.return_keys = size, channels_last, return_keys
        self.decoder, self.skipped, self.slot, self.logical = decoder, skipped, slot, logical
        self.count = 0
        self.array: np.ndarray | None = None  # allocated from the first value's shape
        self.labels = np.empty(size, dtype=np.int64)
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.transpose = False  # contiguous images: HWC -> CHW copy per sample
        self.scratch: np.ndarray | None = None  # contiguous mode: the reused HWC decode buffer
        self.spare: np.ndarray | None = None  # the next batch's array, once this one is full
        # In a DataLoader worker, batch arrays are reused shared-memory slabs (data_shards.slabs).
        self.slabs = slabs
        self.new_array = slabs.allocate if slabs is not None else np.empty

    def add(self, value: np.ndarray, label: int, key: str, url: str) -> tuple | None:
        """Put a valid sample in; returns the full batch its arrival releases (see emit), or None.

        ``value`` may already sit in its slot (decoded into ``decoder.buffer``); anything
        else is copied there. Runs once per sample: kept to plain attribute and index work."""
        i = self.count
        full = None
        if i == self.size:
            full = (self.array, self.labels, self.keys, self.urls)
            self.array, self.spare = self.spare, None
            self.labels = np.empty(self.size, dtype=np.int64)
            if self.return_keys:
                self.keys, self.urls = [], []
            i = 0
        array = self.array
        if array is None:
            array = self._allocate(value)
        if self.transpose:
            # HWC -> CHW straight into the batch array: one strided copy per image. (torch's
            # permute().contiguous() on uint8 measured 3-20x slower than this.)
            array[i] = value.transpose(2, 0, 1)
        elif value.base is not array:
            array[i] = value  # not decoded in place
        self.labels[i] = label
        if self.return_keys:
            self.keys.append(key)
            self.urls.append(url)
        self._advance(i + 1)
        return full

    def _advance(self, count: int) -> None:
        """``count`` samples are in: allocate the next batch's array once full, and point the
        decoder at the slot the next image may be decoded into (HWC)."""
        self.count = count
        array = self.array
        if count == self.size:
            self.spare = self.new_array(array.shape, array.dtype)
        if array.ndim == 4 and not self.transpose:
            self.decoder.buffer = array[count] if count < self.size else self.spare[0]

    def put_rows(self, window: list, order, j: int, n: int) -> int:
        """Decode the ShardTable records ``window[order[j]]``, ``window[order[j + 1]]``, ...
        into this batch while they take the decoder's direct path (``_SampleDecoder.row``:
        plain JPEGs and 8-bit PNGs of the target size, with valid labels), up to ``n`` or
        until the batch is full; return where it stopped. The sample there (if any) goes
        through the general path (row or the dict decoder, then add), which also releases a
        full batch. Same result as that path for every record it takes, in a loop with no
        call per sample but the decoder's (a 64x64 JPEG decodes in ~40 us here, and the
        general path's calls and generator hops took ~5 us of Python per sample on top).
        """
        i, size, array = self.count, self.size, self.array
        if array is None or i >= size or array.ndim != 4 or not self.decoder.direct:
            return j
        labels, transpose, scratch = self.labels, self.transpose, self.scratch
        keys, urls = (self.keys, self.urls) if self.return_keys else (None, None)
        start_j = j
        while j < n and i < size:
            raw = window[order[j]]
            if type(raw) is not tuple:
                break
            buf, start, end, label, plain, key, url, _, (image_ext, _) = raw
            if label is None or image_ext is None:
                break
            value = _decode_direct(buf[start:end], plain, scratch if transpose else array[i])
            if value is None:
                break
            if transpose:
                array[i] = value.transpose(2, 0, 1)
            elif not plain:
                array[i] = value
            labels[i] = label
            if keys is not None:
                keys.append(key)
                urls.append(url)
            i += 1
            j += 1
        if j > start_j:
            self._advance(i)
        return j

    def _allocate(self, value: np.ndarray) -> np.ndarray:
        if value.dtype == np.uint8 and not self.channels_last:
            height, width, channels = value.shape
            self.array = self.new_array((self.size, channels, height, width), np.uint8)
            self.transpose = True
            if channels == 3:
                self.scratch = self.decoder.buffer = np.empty((height, width, 3), dtype=np.uint8)
        else:
            self.array = self.new_array((self.size, *value.shape), value.dtype)
        return self.array

    def flush(self) -> tuple:
        """The batch being filled, however full, as ``add`` returns a full one; then empty."""
        n = self.count
        images = self.array[:n]
        if self.slabs is not None:  # a partial slab goes out the usual way; the slab is free again
            images = images.copy()
            self.slabs.give_back(self.array)
        out = (images, self.labels[:n], self.keys, self.urls)
        self.count, self.keys, self.urls = 0, [], []
        return out

    def emit(self, batch: tuple, position: tuple | dict) -> dict:
        """The dict yielded for ``batch`` (from add or flush): it reports the samples skipped
        since the previous one, and ``position`` (pass, window, offset, share_all), where a
        resumed stream starts."""
        array, labels, keys, urls = batch
        out: dict[str, Any] = {}
        key = "image" if array.dtype == np.uint8 else "points"
        slab = None
        if self.slabs is not None:
            slab = self.slabs.reference(array, key, len(array), key == "image" and self.channels_last)
        if slab is not None:
            out["__slab__"] = slab  # the main process's loader puts out[key] back (SlabTransport.resolve)
        else:
            array = torch.from_numpy(array)
            out[key] = array.permute(0, 3, 1, 2) if key == "image" and self.channels_last else array
        # With a slab, labels go as a list (a few hundred bytes pickled; DataLoader would turn a
        # numpy array into a second shared-memory tensor); SlabTransport.resolve makes the tensor.
        out["label"] = labels.tolist() if slab is not None else torch.from_numpy(labels)
        skipped = self.skipped
        out["skipped"] = {reason: k for reason, k in skipped.items() if k}
        skipped.clear()
        if self.return_keys:
            out["__key__"] = keys
            out["__url__"] = urls
            out["__slot__"] = self.slot
        out["__worker__"] = self.logical
        out["__position__"] = _position(*position) if type(position) is tuple else position
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
    prefetch_factor = 2
    pin_memory = torch.cuda.is_available()  # pinning only helps host-to-GPU copies
    worker_options = {"persistent_workers": True, "prefetch_factor": prefetch_factor,
                      "worker_init_fn": _ignore_stop_signals} if num_workers > 0 else {}
    if num_workers > 0:
        dataset.transport = SlabTransport(num_workers, prefetch_factor + 3, pin_memory)
    loader = _Loader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        **worker_options,
    )
    return loader


# Live iterators of our loaders and their worker processes, which must stop before interpreter
# exit (see _stop_workers). A worker outlives its iterator when the iterator's shutdown failed.
_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_WORKERS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_LAST = False


class _Loader(DataLoader):
    """A DataLoader that remembers its iterators (see _stop_workers) and, with workers, puts
    back the batches they sent through shared-memory slabs (data_shards.slabs)."""

    def __iter__(self):
        iterator = super().__iter__()
        transport = getattr(self.dataset, "transport", None)
        return _Resolving(iterator, transport) if transport is not None and self.num_workers > 0 else iterator

    def _get_iterator(self):
        global _EXIT_HOOK_LAST
        iterator = super()._get_iterator()
        _ITERATORS.add(iterator)
        _WORKERS.update(getattr(iterator, "_workers", ()))
        if not _EXIT_HOOK_LAST:
            # atexit runs hooks last-registered first. Registering again now, after torch and
            # multiprocessing have registered theirs (they have: workers exist), puts this hook
            # before multiprocessing's join and before torch's exit flag, which turns
            # _shutdown_workers into a no-op, whatever order the modules were imported in.
            atexit.unregister(_stop_workers)
            atexit.register(_stop_workers)
            _EXIT_HOOK_LAST = True
        return iterator


class _Resolving:
    """The DataLoader iterator with each slab batch copied out of its slab (SlabTransport.resolve)."""

    def __init__(self, iterator, transport: SlabTransport):
        self._iterator, self._transport = iterator, transport

    def __iter__(self):
        return self

    def __next__(self):
        return self._transport.resolve(next(self._iterator))

    def __getattr__(self, name):  # _workers, _shutdown_workers, ...: the DataLoader iterator's
        return getattr(self._iterator, name)


def _stop_workers() -> None:
    """Stop the workers of iterators still alive at exit. multiprocessing's own exit hook
    terminate()s daemonic children with SIGTERM, which our workers ignore, and then joins them
    forever. Each iterator is shut down the normal way; a worker still alive after that (its
    iterator's shutdown failed, was skipped, or the iterator is gone) is killed: it only reads shards."""
    for iterator in list(_ITERATORS):
        try:
            iterator._shutdown_workers()
        except Exception:  # noqa: BLE001 - one broken iterator must not leave the others' workers running
            pass
    for worker in list(_WORKERS):
        try:
            worker.join(timeout=1.0)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5.0)
        except (AssertionError, ValueError, OSError):  # not started, already closed, or gone
            pass


atexit.register(_stop_workers)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: SLURM signals every process of a job step, and a
    worker killed by it would crash the trainer before it can checkpoint. The trainer decides
    when to stop; the DataLoader then shuts its workers down itself."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def batch_to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 images (0..255) to floats in [-1, 1]."""
    return images.to(dtype).div_(127.5).sub_(1.0)
