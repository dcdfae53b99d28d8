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

from data_shards.errors import NoValidSamples
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

    A local, uncompressed shard of plain members (what ``build_shards`` and most tar writers
    produce) is read whole and split by a header scan that is several times cheaper than
    ``tarfile``'s; any shard the scan does not fully vouch for (remote, compressed, damaged,
    pax/GNU extensions, links, ...) is read with ``tarfile``, as before.

    Raises:
        ShardError: after the last complete sample, if the shard could not be opened
            (``unreadable_shard``) or is damaged (``truncated_tar``). The sample being read
            when the damage was found is dropped, since its members may be incomplete.
    """
    scanned = _scan_local_tar(url)
    if scanned is not None:
        buf, members = scanned
        yield from _group_members(url, ((key, ext, buf[start:end]) for key, ext, start, end in members))
        return
    try:
        stream = gopen(url, "rb")
    except Exception as exn:
        raise ShardError(UNREADABLE_SHARD, url, str(exn)) from None
    with closing(stream):
        yield from _group_members(url, _tarfile_members(url, stream))


def _group_members(url: str, members: Iterator[tuple[str, str, bytes]]) -> Iterator[dict]:
    """Group consecutive (key, ext, bytes) members into samples; a ShardError from ``members``
    propagates after the last complete sample (the one being assembled is dropped)."""
    current: dict | None = None
    for key, ext, data in members:
        if current is not None and current["__key__"] == key:
            if ext in current:
                current["__duplicates__"] = current.get("__duplicates__", 0) + 1
            else:
                current[ext] = data
            continue
        if current is not None:
            yield current
        current = {"__key__": key, "__url__": url, ext: data}
    if current is not None:
        yield current


def _tarfile_members(url: str, stream) -> Iterator[tuple[str, str, bytes]]:
    """Sample members of a tar read with ``tarfile`` (any format, any source gopen opens)."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo)
        for info in tar:
            member = _read_member(tar, info)
            tar.members = []  # streaming mode keeps every TarInfo otherwise
            if member is not None:
                yield member
        stop = getattr(tar, "gentrain_stop", None)
    except Exception as exn:  # tarfile.ReadError, EOFError, zlib.error, OSError, ...
        raise ShardError(TRUNCATED_TAR, url, f"{type(exn).__name__}: {exn}") from None
    if not isinstance(stop, tarfile.EOFHeaderError):
        raise ShardError(TRUNCATED_TAR, url, f"no end-of-archive marker ({type(stop).__name__})")


_FAST_TAR_MAX_BYTES = 1 << 30  # larger local shards are streamed through tarfile instead
_COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4")
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_REG, _AREG, _DIR = ord("0"), 0, ord("5")


def _scan_local_tar(url: str) -> tuple[bytes, list[tuple[str, str, int, int]]] | None:
    """(shard bytes, [(key, ext, start, end)] of its sample members) for a plain local tar,
    or None where ``tarfile`` must read it.

    Accepts only what it can vouch for exactly as ``tarfile`` would read it: regular files and
    directories (ustar/v7/GNU headers with octal fields and valid checksums, all verified at
    once with numpy), each member complete, ending with an end-of-archive block. Member names
    go through the same rules as :func:`_read_member`.
    """
    if _REMOTE_RE.match(url) or url.endswith(_COMPRESSED_SUFFIXES):
        return None
    try:
        if not 0 < os.path.getsize(url) <= _FAST_TAR_MAX_BYTES:
            return None
        with open(url, "rb") as f:
            buf = f.read()
    except OSError:
        return None  # let gopen report it
    length = len(buf)
    headers: list[int] = []
    checksums: list[int] = []
    found: list[tuple[str, int, int]] = []
    offset = 0
    try:
        while True:
            if offset + 512 > length:
                return None  # truncated: tarfile reports it
            block = buf[offset : offset + 512]
            if block == _ZERO_BLOCK:
                break
            kind = block[156]
            if kind not in (_REG, _AREG, _DIR) or block[124] & 0x80 or block[148] & 0x80:
                return None  # links, pax/GNU extensions, sparse, base-256 numbers: tarfile's business
            # Fields as tarfile's nts/nti read them: up to the first NUL, then octal.
            checksums.append(int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8))
            headers.append(offset)
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            data_start = offset + 512
            if kind == _DIR or name.endswith("/"):
                offset = data_start  # tarfile skips no data after a directory
                continue
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if size < 0 or data_start + size > length:
                return None
            if block[345]:
                prefix = block[345:500].split(b"\0", 1)[0]
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            found.append((name, data_start, data_start + size))
            offset = data_start + (size + 511) // 512 * 512
    except ValueError:
        return None  # a non-octal field: tarfile calls that an invalid header
    if headers:
        blocks = np.frombuffer(buf, dtype=np.uint8, count=(offset // 512) * 512).reshape(-1, 512)
        blocks = blocks[np.asarray(headers) // 512]
        wanted = np.asarray(checksums, dtype=np.int64)
        unsigned = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 256
        odd = np.flatnonzero(wanted != unsigned)
        if odd.size:  # tarfile also accepts the signed-char sum some old tars wrote
            signed = blocks[odd].view(np.int8)
            signed = signed.sum(1, dtype=np.int64) - signed[:, 148:156].sum(1, dtype=np.int64) + 256
            if not (wanted[odd] == signed).all():
                return None
    members = []
    for name, start, end in found:
        key, ext = _split_name(name)
        if key is not None:
            members.append((key, ext.lower(), start, end))
    return buf, members


def _split_name(name: str) -> tuple[str | None, str | None]:
    """(key, ext) of a member name as :func:`_read_member` splits it; (None, None) to skip.

    The usual "dir/key.ext" (a key not starting with a dot, no newline, not ``__meta__``) is
    split with string operations, which give what base_plus_ext's regex gives for such names;
    anything else goes through the regex itself.
    """
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot > slash and not name.startswith("__") and "\n" not in name:
        return name[:dot], name[dot + 1 :]
    if _META_RE.match(name):
        return None, None
    return base_plus_ext(name)


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


def _windows(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `size` items (the last one may be shorter)."""
    window: list[dict] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


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
    decoded. Memory: shuffle_buffer raw samples per worker.

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

    def slot(self) -> tuple[int, int, int]:
        """(slot, num_slots, logical worker) of the calling process/worker."""
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker_id + self.worker_offset) % num_workers
        return self.rank * num_workers + logical, self.world_size * num_workers, logical

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, logical = self.slot()
        skipped: Counter = Counter()
        batch: list[_Item] = []
        # A full batch goes out only once the next valid sample is decoded: bad samples in
        # between are then counted in this batch, and resuming at `here` (the next sample's
        # position) neither repeats nor recounts anything.
        for item, here in self._samples(slot, num_slots, skipped, self.start_positions.get(logical)):
            if len(batch) == self.batch_size:
                yield self._with_position(self._collate(batch, skipped, slot), logical, here)
                batch = []
            batch.append(item)
        if batch:  # only reached when `passes` is finite
            end = {"pass": self.passes, "window": 0, "offset": 0, "share_all": False}
            yield self._with_position(self._collate(batch, skipped, slot), logical, end)

    @staticmethod
    def _with_position(out: dict, logical: int, position: dict) -> dict:
        out["__worker__"] = logical
        out["__position__"] = position
        return out

    def _samples(self, slot: int, num_slots: int, skipped: Counter, start: dict | None):
        """(decoded sample, its position) of this slot, pass after pass, from `start`."""
        decoder = _SampleDecoder(self.kind, self.channels, self.image_size, self.max_pixels)
        share_all = bool(start and start.get("share_all"))
        pass_index = int(start["pass"]) if start else 0
        while self.passes is None or pass_index < self.passes:
            stats = _PassStats()
            resume = start if start and int(start["pass"]) == pass_index else None
            yield from self._one_pass(pass_index, slot, num_slots, share_all, decoder, skipped, stats, resume)
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

    def _one_pass(self, pass_index, slot, num_slots, share_all, decoder, skipped, stats, resume):
        """One pass over this slot's shards: windows of raw samples, each visited in a seeded
        permutation, decoded lazily. `resume` skips the windows and offsets already consumed
        (read, not decoded, and not counted again)."""
        window_size = max(1, self.shuffle_buffer)
        first_window = int(resume["window"]) if resume else 0
        first_offset = int(resume["offset"]) if resume else 0
        counting = {"on": first_window == 0}

        def count(reason: str) -> None:
            if counting["on"]:
                skipped[reason] += 1
                stats.skipped[reason] += 1

        raw_samples = self._raw_samples(pass_index, slot, num_slots, share_all, stats, count)
        for w, window in enumerate(_windows(raw_samples, window_size)):
            counting["on"] = w >= first_window
            if w < first_window:
                continue
            order = range(len(window))
            if window_size > 1:
                order = random.Random(f"{self.seed}:{slot}:{pass_index}:{w}").sample(order, len(window))
            for j in range(first_offset if w == first_window else 0, len(window)):
                raw = window[order[j]]
                for _ in range(raw.pop("__duplicates__", 0)):
                    count(DUPLICATE_MEMBER)
                try:
                    item = decoder(raw)
                except BadSample as bad:
                    count(bad.reason)
                    continue
                stats.valid += 1
                yield item, {"pass": pass_index, "window": w, "offset": j, "share_all": share_all}

    def _raw_samples(self, pass_index, slot, num_slots, share_all, stats, count) -> Iterator[dict]:
        """This slot's undecoded samples of one pass, its shards in a seeded order."""
        shards = self._slot_urls(slot, num_slots, share_all)
        random.Random(f"{self.seed}:{pass_index}:{slot}").shuffle(shards)
        interleave = len(self.urls) < num_slots and not share_all
        for k, url in shards:
            try:
                for j, raw in enumerate(read_shard(url)):
                    if interleave and (k + j) % num_slots != slot:
                        stats.foreign += 1
                        continue
                    yield raw
            except ShardError as exn:
                # Every slot may read this shard; only its owner reports the damage so that
                # the counts summed over slots match what is in the data.
                if k % num_slots == slot:
                    count(exn.reason)

    def _collate(self, batch: list[_Item], skipped: Counter, slot: int) -> dict:
        out: dict[str, Any] = {}
        first = batch[0].value
        if first.dtype == np.uint8 and self.channels_last:
            out["image"] = torch.from_numpy(np.stack([item.value for item in batch])).permute(0, 3, 1, 2)
        elif first.dtype == np.uint8:
            # HWC -> CHW straight into the batch array: one strided copy per image. (torch's
            # permute().contiguous() on uint8 measured 3-20x slower than this.)
            height, width, channels = first.shape
            images = np.empty((len(batch), channels, height, width), dtype=np.uint8)
            for i, item in enumerate(batch):
                images[i] = item.value.transpose(2, 0, 1)
            out["image"] = torch.from_numpy(images)
        else:
            out["points"] = torch.from_numpy(np.stack([item.value for item in batch]))
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
    worker_options = {"persistent_workers": True, "prefetch_factor": 2,
                      "worker_init_fn": _ignore_stop_signals} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # pinning only helps host-to-GPU copies
        **worker_options,
    )


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
