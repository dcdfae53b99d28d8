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

import atexit
import json
import os
import random
import re
import tarfile
import warnings
import weakref
from collections import Counter
from contextlib import closing
from itertools import islice
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
    if scanned is not None:  # _group_members, inlined: this loop runs once per member
        buf, members = scanned
        current: dict | None = None
        current_key = None
        for key, ext, start, end in members:
            if key == current_key:
                if ext in current:
                    current["__duplicates__"] = current.get("__duplicates__", 0) + 1
                else:
                    current[ext] = buf[start:end]
                continue
            if current is not None:
                yield current
            current_key = key
            current = {"__key__": key, "__url__": url, ext: buf[start:end]}
        if current is not None:
            yield current
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
    members = _index_ustar(buf)
    if members is not None:
        return buf, members
    found = _walk_tar(buf)
    if found is None:
        return None
    members = []
    for name, start, end in found:
        key, ext = _split_name(name)
        if key is not None:
            members.append((key, ext.lower(), start, end))
    return buf, members


_USTAR_TAIL = np.frombuffer(b"star", dtype=np.uint8)


def _octal_fields(fields: np.ndarray) -> np.ndarray | None:
    """Values of [N, W] tar number fields as tarfile's ``nti`` reads them (octal digits up to
    the first NUL), or None if any field is not just that (spaces, base-256, garbage)."""
    digits = fields - np.uint8(ord("0"))  # non-digits wrap to >= 8
    width = fields.shape[1]
    for n in (width - 1, width - 2):  # the usual: n digits, then NUL ("%011o\0", "%06o\0 ")
        if (fields[:, n] == 0).all() and (digits[:, :n] < 8).all():
            return digits[:, :n].astype(np.int64) @ (8 ** np.arange(n - 1, -1, -1, dtype=np.int64))
    before = ~np.logical_or.accumulate(fields == 0, axis=1)  # bytes before the first NUL
    if (before & (digits > 7)).any():
        return None
    shift = 3 * (before.sum(1)[:, None] - 1 - np.arange(width))
    return np.where(before, digits.astype(np.int64) << np.maximum(shift, 0), 0).sum(1)


_LOW_BYTES = np.uint64(0x00FF00FF00FF00FF)


def _index_ustar(buf: bytes) -> list[tuple[str, str, int, int]] | None:
    """[(key, ext, start, end)] of the sample members of a ustar/GNU tar of regular files
    only (names split as :func:`_split_name` does), found with numpy: the
    blocks carrying the "ustar" magic must chain exactly from the first block (each header's
    size pointing at the next) to an end-of-archive block, with valid checksums and plain
    octal fields. None where it cannot vouch for that (then :func:`_walk_tar` decides)."""
    n_blocks = len(buf) // 512
    if n_blocks < 2:
        return None
    blocks = np.frombuffer(buf, dtype=np.uint8, count=n_blocks * 512).reshape(n_blocks, 512)
    heads = np.flatnonzero(blocks[:, 257] == ord("u"))
    if heads.size:
        heads = heads[(blocks[heads, 258:262] == _USTAR_TAIL).all(1)]
    if not heads.size or heads[0] != 0:
        return None
    kinds = blocks[heads, 156]
    if not ((kinds == _REG) | (kinds == _AREG)).all() or blocks[heads, 345].any():
        return None  # directories, links, extensions, prefixed long names: the walk's business
    sizes = _octal_fields(blocks[heads, 124:136])
    checksum_fields = blocks[heads, 148:156]
    wanted = _octal_fields(checksum_fields)
    if sizes is None or wanted is None:
        return None
    following = heads + 1 + (sizes + 511) // 512
    end = int(following[-1])
    if not (np.array_equal(following[:-1], heads[1:]) and end < n_blocks and not blocks[end].any()):
        return None
    # Checksums: byte sums of whole headers, two bytes at a time in 16-bit lanes of uint64 words.
    words = blocks.view(np.uint64)[heads]
    lanes = ((words & _LOW_BYTES) + ((words >> np.uint64(8)) & _LOW_BYTES)).sum(1)
    total = sum((lanes >> np.uint64(s)) & np.uint64(0xFFFF) for s in (0, 16, 32, 48)).astype(np.int64)
    unsigned = total - checksum_fields.sum(1, dtype=np.int64) + 256
    if not (unsigned == wanted).all() and not _checksums_match(blocks[heads], wanted):
        return None
    starts = (heads * 512 + 512).tolist()
    name_bytes = blocks[heads, :100]
    fast = _split_names_ascii(name_bytes)
    if fast is not None:  # every name a plain ASCII "dir/key.ext": split with numpy
        keys, exts, dots = fast
        return [(key, ext, start, start + size) for key, ext, start, size in zip(keys, exts, starts, sizes.tolist())]
    names = name_bytes.copy().view("S100").ravel().tolist()  # trailing NULs dropped
    members = []
    append = members.append
    for raw, offset, size in zip(names, starts, sizes.tolist()):
        if b"\0" in raw:
            raw = raw.split(b"\0", 1)[0]
        name = raw.decode("utf-8", "surrogateescape")
        if name[-1:] == "/" and buf[offset - 512 + 156] == _AREG:
            return None  # tarfile reads that as a directory (old V7 style)
        key, ext = _split_name(name)
        if key is not None:
            append((key, ext.lower(), offset, offset + size))
    return members


_COLUMNS = np.arange(100)


def _split_names_ascii(names: np.ndarray) -> tuple[list[str], list[str], np.ndarray] | None:
    """(keys, lower-cased extensions, dot positions) of [N, 100] NUL-padded member names, where
    every name is printable ASCII of the usual "dir/key.ext" form (what :func:`_split_name`
    splits with string operations); None otherwise."""
    used = names != 0
    length = used.sum(1)
    if (used & (_COLUMNS >= length[:, None])).any():
        return None  # a NUL inside a name
    if ((names < 32) | (names > 126)).sum() != (~used).sum():
        return None  # non-ASCII or control characters (newlines) besides the NUL padding
    if ((names[:, 0] == ord("_")) & (names[:, 1] == ord("_"))).any():
        return None  # "__meta__" names and friends
    slash = np.where(names == ord("/"), _COLUMNS, -1).max(1) + 1  # start of the base name
    dots = (names == ord(".")) & (_COLUMNS > slash[:, None])
    dot = np.where(dots.any(1), dots.argmax(1), -1)
    if not (dot > slash).all():
        return None  # no extension, or a base name starting with a dot
    upper = (names >= ord("A")) & (names <= ord("Z")) & (_COLUMNS > dot[:, None])
    lowered = np.where(upper, names + 32, names)
    keys_padded = np.where(_COLUMNS < dot[:, None], names, 0).copy().view("S100").ravel()
    exts = np.where(_COLUMNS > dot[:, None], lowered, 0)
    exts = np.roll(exts, 0)  # extensions start right after the dot: shift each row left
    shift = (dot + 1)[:, None] + _COLUMNS
    exts = np.take_along_axis(exts, np.minimum(shift, 99), axis=1)
    exts[shift > 99] = 0
    ext_list = [e.decode("ascii") for e in exts.copy().view("S100").ravel().tolist()]
    key_list = [k.decode("ascii") for k in keys_padded.tolist()]
    return key_list, ext_list, dot


def _checksums_match(header: np.ndarray, wanted: np.ndarray) -> bool:
    """Header checksums as tarfile verifies them (unsigned sum, or the signed one old tars wrote)."""
    unsigned = header.sum(1, dtype=np.int64) - header[:, 148:156].sum(1, dtype=np.int64) + 256
    odd = np.flatnonzero(wanted != unsigned)
    if odd.size:
        signed = header[odd].view(np.int8)
        signed = signed.sum(1, dtype=np.int64) - signed[:, 148:156].sum(1, dtype=np.int64) + 256
        return bool((wanted[odd] == signed).all())
    return True


def _walk_tar(buf: bytes) -> list[tuple[str, int, int]] | None:
    """[(name, start, end)] of a plain tar's members, header by header; None where tarfile must decide."""
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
            if kind == _DIR or (kind == _AREG and name.endswith("/")):  # tarfile: V7 directory
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
        if not _checksums_match(blocks[np.asarray(headers) // 512], np.asarray(checksums, dtype=np.int64)):
            return None
    return found


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
        else:
            value = decode_points(raw[payload_ext], self.dim)
            self.dim = value.shape[0]
        self.kind = kind
        return value, label


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
        decoder = _SampleDecoder(self.kind, self.channels, self.image_size, self.max_pixels)
        batch = _Batch(self.batch_size, self.channels_last, self.return_keys)
        # A full batch goes out only once the next valid sample is decoded: bad samples in
        # between are then counted in this batch, and resuming at `here` (the next sample's
        # position) neither repeats nor recounts anything. Each sample lands in its batch's
        # array as it is decoded: JPEGs straight into their slot (channels_last) or into a
        # reused buffer, then one HWC -> CHW copy.
        samples = self._samples(slot, num_slots, skipped, self.start_positions.get(logical), decoder)
        for value, label, key, url, here in samples:
            if batch.full:
                following = batch.following
                yield batch.emit(skipped, slot, logical, _position(*here))
                batch = following
            batch.add(value, label, key, url)
            decoder.buffer = batch.next_buffer()
        if batch.count:  # only reached when `passes` is finite
            end = {"pass": self.passes, "window": 0, "offset": 0, "share_all": False}
            yield batch.emit(skipped, slot, logical, end)

    def _samples(self, slot: int, num_slots: int, skipped: Counter, start: dict | None, decoder: _SampleDecoder):
        """(decoded sample, its position) of this slot, pass after pass, from `start`."""
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
        (read, not decoded, and not counted again). Yields (value, label, key, url,
        (pass, window, offset, share_all))."""
        window_size = max(1, self.shuffle_buffer)
        first_window = int(resume["window"]) if resume else 0
        first_offset = int(resume["offset"]) if resume else 0
        counting = {"on": first_window == 0}

        def count(reason: str) -> None:
            if counting["on"]:
                skipped[reason] += 1
                stats.skipped[reason] += 1

        raw_samples = self._raw_samples(pass_index, slot, num_slots, share_all, stats, count)
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
                for j in range(first_offset if w == first_window else 0, len(window)):
                    raw = window[order[j]]
                    if "__duplicates__" in raw:
                        for _ in range(raw.pop("__duplicates__")):
                            count(DUPLICATE_MEMBER)
                    try:
                        value, label = decoder(raw)
                    except BadSample as bad:
                        count(bad.reason)
                        continue
                    stats.valid += 1
                    yield value, label, raw["__key__"], raw["__url__"], (pass_index, w, j, share_all)
            w += 1

    def _raw_samples(self, pass_index, slot, num_slots, share_all, stats, count) -> Iterator[dict]:
        """This slot's undecoded samples of one pass, its shards in a seeded order."""
        shards = self._slot_urls(slot, num_slots, share_all)
        random.Random(f"{self.seed}:{pass_index}:{slot}").shuffle(shards)
        interleave = len(self.urls) < num_slots and not share_all
        for k, url in shards:
            try:
                if not interleave:
                    yield from read_shard(url)
                    continue
                for j, raw in enumerate(read_shard(url)):
                    if (k + j) % num_slots != slot:
                        stats.foreign += 1
                        continue
                    yield raw
            except ShardError as exn:
                # Every slot may read this shard; only its owner reports the damage so that
                # the counts summed over slots match what is in the data.
                if k % num_slots == slot:
                    count(exn.reason)


def _position(pass_index: int, window: int, offset: int, share_all: bool) -> dict:
    return {"pass": pass_index, "window": window, "offset": offset, "share_all": share_all}


class _Batch:
    """One batch being filled: decoded samples are copied into its array as they come.

    Images are kept as HWC slots of a [B,H,W,C] array (channels_last: the batch is a
    [B,C,H,W] view of it, and the fast JPEG path decodes straight into the slot) or copied
    HWC -> CHW into a [B,C,H,W] array (contiguous) from a reused decode buffer.
    """

    __slots__ = ("size", "channels_last", "return_keys", "count", "full", "array", "labels", "keys", "urls",
                 "scratch", "following")

    def __init__(self, size: int, channels_last: bool, return_keys: bool, like: "_Batch | None" = None):
        self.size, self.channels_last, self.return_keys = size, channels_last, return_keys
        self.count = 0
        self.full = False
        self.array: np.ndarray | None = None
        self.labels = np.empty(size, dtype=np.int64)
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.scratch: np.ndarray | None = None  # contiguous mode: the reused HWC decode buffer
        self.following: _Batch | None = None  # the next batch, allocated once this one is full
        if like is not None:
            self.array = np.empty_like(like.array)
            self.scratch = like.scratch

    def add(self, value: np.ndarray, label: int, key: str, url: str) -> None:
        i = self.count
        array = self.array
        if array is None:
            if value.dtype == np.uint8 and not self.channels_last:
                height, width, channels = value.shape
                array = self.array = np.empty((self.size, channels, height, width), dtype=np.uint8)
                if channels == 3:
                    self.scratch = np.empty((height, width, 3), dtype=np.uint8)
            else:
                array = self.array = np.empty((self.size, *value.shape), dtype=value.dtype)
        if array.ndim == 4 and not self.channels_last:
            # HWC -> CHW straight into the batch array: one strided copy per image. (torch's
            # permute().contiguous() on uint8 measured 3-20x slower than this.)
            array[i] = value.transpose(2, 0, 1)
        else:
            base = value.base
            if base is None or (base is not array and getattr(base, "base", None) is not array):
                array[i] = value  # not decoded in place by the fast JPEG path
        self.labels[i] = label
        if self.return_keys:
            self.keys.append(key)
            self.urls.append(url)
        self.count = i + 1
        if self.count == self.size:
            self.full = True
            self.following = _Batch(self.size, self.channels_last, self.return_keys, like=self)

    def next_buffer(self) -> np.ndarray | None:
        """Where the next sample's image may be decoded (HWC), or None."""
        if self.array is None or self.array.ndim != 4:
            return None
        if not self.channels_last:
            return self.scratch
        if self.full:
            return self.following.array[0]
        return self.array[self.count]

    def emit(self, skipped: Counter, slot: int, logical: int, position: dict) -> dict:
        n = self.count
        array = torch.from_numpy(self.array[:n] if n < self.size else self.array)
        out: dict[str, Any] = {}
        if array.dtype != torch.uint8:
            out["points"] = array
        elif self.channels_last:
            out["image"] = array.permute(0, 3, 1, 2)
        else:
            out["image"] = array
        out["label"] = torch.from_numpy(self.labels[:n] if n < self.size else self.labels)
        out["skipped"] = {reason: k for reason, k in skipped.items() if k}
        skipped.clear()
        if self.return_keys:
            out["__key__"] = self.keys
            out["__url__"] = self.urls
            out["__slot__"] = slot
        out["__worker__"] = logical
        out["__position__"] = position
        self.following = None
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
    loader = _Loader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # pinning only helps host-to-GPU copies
        **worker_options,
    )
    return loader


# Live iterators of our loaders, whose workers must stop before interpreter exit (see _stop_workers).
_ITERATORS: weakref.WeakSet = weakref.WeakSet()


class _Loader(DataLoader):
    """A DataLoader that remembers its iterators (see _stop_workers)."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        _ITERATORS.add(iterator)
        return iterator


@atexit.register
def _stop_workers() -> None:
    """Shut down the workers of iterators still alive at exit. multiprocessing's own exit hook
    terminate()s daemonic children with SIGTERM, which our workers ignore, and then joins them
    forever. atexit runs hooks in reverse order of registration, and torch imported
    multiprocessing before this module, so this hook runs first."""
    for iterator in list(_ITERATORS):
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


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
