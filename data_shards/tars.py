"""Reading WebDataset tars: members grouped into samples exactly as webdataset groups them.

We read tars ourselves (the stdlib ``tarfile``, webdataset's key splitting and ``gopen``)
instead of through ``webdataset.tariterators.tar_file_iterator``: Python's tarfile reports a
tar cut at a member boundary, or one with a garbage header mid-archive, as a normal end of
archive, and webdataset 1.0.2 then silently drops the rest of the shard.

A plain local shard (what ``build_shards`` and most tar writers produce) is mapped whole
(see :func:`_map_file`) and indexed with numpy instead of ``tarfile``; if every sample in it
has the same members in the same order (the usual ``KEY.cls`` + ``KEY.jpg``), it becomes a
:class:`ShardTable`: columns of keys, member spans and labels, built in bulk, so the stream's
per-sample work is little more than the decode. Anything the index cannot vouch for goes through ``tarfile`` as before.
"""

from __future__ import annotations

import mmap
import operator
import os
import re
import struct
import tarfile
import zlib
from collections import OrderedDict
from contextlib import closing
from itertools import islice, repeat
from typing import Iterator, NamedTuple

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from data_shards import remote
from data_shards.decode import IMAGE_EXTENSIONS, decode_label, plain_jpegs
from data_shards.errors import TRUNCATED_TAR, UNREADABLE_SHARD, BadSample, ShardError
from data_shards.specs import REMOTE_RE

_META_RE = re.compile(r"__[^/]*__($|/)")  # the same rule as webdataset's tar_file_iterator


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
            (``unreadable_shard``) or is damaged (``truncated_tar``). Of the sample being
            read when the damage was found, only a complete one is yielded (see
            :func:`_group_members`); a cut one is dropped with the damage.
    """
    source = shard_samples(url)
    if isinstance(source, ShardTable):
        yield from map(source.sample, range(len(source)))
    else:
        for raw in source:
            yield record_sample(raw) if type(raw) is tuple else raw


def shard_samples(url: str) -> "ShardTable | Iterator[dict | tuple]":
    """The samples of one tar: a :class:`ShardTable` where the shard is a plain local tar of
    uniform samples, else an iterator of the dicts :func:`read_shard` yields (which may raise
    ShardError after the last complete sample), in which a remote shard's samples come as
    ShardTable records where runs of them are uniform (see :func:`_stream_samples`). All hold
    the same samples in the same order."""
    scanned = _scan(url)
    if isinstance(scanned, ShardTable):
        return scanned
    return _dict_samples(url, scanned)


def _dict_samples(url: str, scanned: tuple[bytes, list] | None) -> Iterator[dict | tuple]:
    if scanned is not None:
        buf, members = scanned
        yield from _span_samples(url, buf, members)
        return
    if remote.scheme(url) is not None:  # http(s)://, s3://, pipe: (data_shards.remote)
        ahead = _PREFETCHED.pop(url, None)
        chunks = ahead[1] if ahead is not None and ahead[0] == os.getpid() else remote.ShardChunks(url)
        try:
            for part in _stream_samples(url, chunks):
                yield from part
        finally:
            chunks.close()
        return
    try:
        stream = gopen(url, "rb")
    except Exception as exn:
        raise ShardError(UNREADABLE_SHARD, url, str(exn)) from None
    with closing(stream):
        yield from _group_members(url, _tarfile_members(url, stream))


_PREFETCHED: dict[str, tuple[int, "remote.ShardChunks"]] = {}  # url -> (pid, reader started ahead)


def prefetch(url: str) -> None:
    """Start reading a remote shard (its first read-ahead chunks) for the next
    ``shard_samples(url)`` of this process; local shards are left alone. A shard that is not
    read after all must be dropped (:func:`drop_prefetched`)."""
    if remote.scheme(url) is not None and url not in _PREFETCHED:
        _PREFETCHED[url] = (os.getpid(), remote.ShardChunks(url))


def drop_prefetched(url: str) -> None:
    """Stop and forget the reader :func:`prefetch` started for ``url``, if it was not used."""
    ahead = _PREFETCHED.pop(url, None)
    if ahead is not None and ahead[0] == os.getpid():
        ahead[1].close()


def _span_samples(url: str, buf: bytes, members) -> list[dict]:
    """read_shard's dicts of complete (key, ext, start, end) members of ``buf``, in order:
    _group_members, inlined (this loop runs once per member)."""
    out: list[dict] = []
    current: dict | None = None
    current_key = None
    for key, ext, start, end in members:
        if key == current_key:
            if ext in current:
                current["__duplicates__"] = current.get("__duplicates__", 0) + 1
            else:
                current[ext] = buf[start:end]
            continue
        current_key = key
        current = {"__key__": key, "__url__": url, ext: buf[start:end]}
        out.append(current)
    return out


def _group_members(url: str, members: Iterator[tuple[str, str, bytes]], previous: dict | None = None
                   ) -> Iterator[dict]:
    """Group consecutive (key, ext, bytes) members into samples; a ShardError from ``members``
    propagates after the last complete sample.

    The sample being assembled when the damage is found is complete, and yielded before the
    error, when the damage lies in another sample's member (``ShardError.cut_key``: all its
    members were read, and members of a sample are consecutive), or, where the damage is at a
    header (a tar cut between members, a garbage header), when it has the same members as the
    sample before it. Otherwise it may lack members and is dropped: the damage counts it.
    ``previous``: the sample before the first member's, where the members continue a shard
    whose earlier samples went another way (only its member extensions matter).
    """
    current: dict | None = None
    try:
        for key, ext, data in members:
            if current is not None and current["__key__"] == key:
                if ext in current:
                    current["__duplicates__"] = current.get("__duplicates__", 0) + 1
                else:
                    current[ext] = data
                continue
            if current is not None:
                yield current
                previous = current
            current = {"__key__": key, "__url__": url, ext: data}
    except ShardError as exn:
        if current is not None and _complete(current, exn.cut_key, previous):
            yield current
        raise
    if current is not None:
        yield current


def _complete(sample: dict, cut_key: str | None, previous: dict | None) -> bool:
    """Whether ``sample``, being assembled when the damage was found, has all its members (see
    _group_members)."""
    if cut_key is not None:
        return cut_key != sample["__key__"]
    return previous is not None and _member_exts(sample) == _member_exts(previous)


def _member_exts(sample: dict) -> set[str]:
    return {ext for ext in sample if not ext.startswith("__")}  # no __key__, __url__, __duplicates__


def _tarfile_members(url: str, stream) -> Iterator[tuple[str, str, bytes]]:
    """Sample members of a tar read with ``tarfile`` (any format, any source gopen opens).
    Damage raises ShardError, with the key of the member whose data it cut, if it did."""
    reading = None  # the key of the member whose data is being read
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo)
        for info in tar:
            tar.members = []  # streaming mode keeps every TarInfo otherwise
            named = _sample_member(info)
            if named is None:
                continue
            reading = named[0]
            data = tar.extractfile(info).read()
            reading = None
            yield named[0], named[1], data
        stop = getattr(tar, "gentrain_stop", None)
    except remote.SourceLost as exn:  # a remote shard's bytes stopped, retries spent
        raise ShardError(UNREADABLE_SHARD, url, str(exn), cut_key=reading) from None
    except Exception as exn:  # tarfile.ReadError, EOFError, zlib.error, OSError, ...
        raise ShardError(TRUNCATED_TAR, url, f"{type(exn).__name__}: {exn}", cut_key=reading) from None
    if not isinstance(stop, tarfile.EOFHeaderError):
        raise ShardError(TRUNCATED_TAR, url, f"no end-of-archive marker ({type(stop).__name__})")


# ---------------------------------------------------------------------------- streamed tars


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00\x80", b"\x28\xb5\x2f\xfd")
_SIGNED_HEADER = struct.Struct("148b8x356b")


def _stream_members(url: str, chunks, first: bool = True) -> Iterator[tuple[str, str, bytes]]:
    """The sample members of a tar arriving as chunks (``chunks.next()``: bytes, None at the
    end, raising remote.SourceLost), as :func:`_tarfile_members` reads them: the same members,
    and the same ShardError (reason and ``cut_key``) where the tar is damaged, but parsed as the
    bytes stream in, with no copy beyond each member's own bytes.

    Plain headers (regular files and directories, octal fields, a valid checksum) are parsed
    here with :func:`_walk_tar`'s rules; at the first other header (pax or GNU extensions,
    links, base-256 numbers, garbage) and for a compressed tar, ``tarfile`` reads the rest of
    the stream from that header on and judges it. Bytes lost for good (SourceLost) end the shard
    with ``unreadable_shard``; what arrived before counts as for any damage (_group_members).
    ``first``: the chunks start at the shard's first byte (where a compressed tar shows).
    """
    reader = _ChunkReader(chunks)
    reading = None  # the key of the member whose data is being read
    try:
        while True:
            block = reader.take(512)
            compressed = first and block.startswith(_COMPRESSED_MAGIC)
            first = False
            if len(block) < 512 and not compressed:
                raise ShardError(TRUNCATED_TAR, url, "no end-of-archive marker (the stream ends at a header)")
            if block == _ZERO_BLOCK:
                return
            header = None if compressed else _plain_header(block)
            if header is None:  # tarfile's business, from this header on
                yield from _tarfile_members(url, _ChunkFile(block, reader))
                return
            name, size = header
            if size < 0:  # a directory: tarfile skips no data after one
                continue
            key, ext = _split_name(name)
            if key is None:
                if len(reader.take(size + (-size % 512))) < size + (-size % 512):
                    raise ShardError(TRUNCATED_TAR, url, "unexpected end of data")
                continue
            reading = key
            data = reader.take(size)
            if len(data) < size:
                raise ShardError(TRUNCATED_TAR, url, "unexpected end of data", cut_key=key)
            reading = None
            yield key, ext.lower(), data
            pad = -size % 512
            if pad and len(reader.take(pad)) < pad:
                raise ShardError(TRUNCATED_TAR, url, "unexpected end of data")
    except remote.SourceLost as exn:
        raise ShardError(UNREADABLE_SHARD, url, str(exn), cut_key=reading) from None


STREAM_BATCH = 4 << 20  # bytes gathered before the members in them are indexed at once


def _stream_samples(url: str, chunks, batch: int = STREAM_BATCH) -> Iterator[list]:
    """The samples of a tar arriving as chunks (see :func:`_stream_members`), in lists: those
    of about ``batch`` bytes at a time, as ShardTable records where they are uniform (a table
    over those bytes), else as read_shard's dicts. In all, exactly the samples (and the
    ShardError) of ``_group_members(url, _stream_members(url, chunks))``.

    The complete plain members among the gathered bytes are indexed at once (with numpy where
    they chain as :func:`_ustar_columns` wants, header by header otherwise); the samples of all
    but the last key are given out, the last key's members wait for the next bytes (the sample
    may go on). What comes after the last complete member when the bytes end (a clean end
    without end-of-archive blocks, a cut, a loss) or at a header only ``tarfile`` may judge,
    goes through :func:`_stream_members` with the same grouping rules.
    """
    buf, pos, first, previous = b"", 0, True, None
    lost: remote.SourceLost | None = None
    ended, want = False, batch
    while True:
        pieces: list = []
        gathered = len(buf) - pos
        while not ended and (gathered < want or not pieces):  # at least one new piece each round
            try:
                piece = chunks.next()
            except remote.SourceLost as exn:
                piece, lost = None, exn
            if piece is None:
                ended = True
                break
            pieces.append(piece)
            gathered += len(piece)
        if pieces:
            buf = b"".join([memoryview(buf)[pos:], *pieces]) if pos < len(buf) else b"".join(pieces)
            pos = 0
        if first and buf.startswith(_COMPRESSED_MAGIC):
            break  # tarfile's business, from the first byte
        first = first and len(buf) < 512
        members, stop_at, stop = _index_members(buf, pos)
        careful = stop == "other" or (ended and stop != "end")
        if stop != "end" and members:  # the last key's members may go on: they wait
            held = len(members)
            while held and members[held - 1][0] == members[-1][0]:
                held -= 1
            stop_at = members[held][2] - 512
            members = members[:held]
        if members:
            part = _indexed_samples(url, buf, members)
            last = part[-1]
            previous = {ext: b"" for ext, _, _ in last[RECORD_LAYOUT][1]} if type(last) is tuple else last
            yield part
        if stop == "end":
            return
        # No progress (a sample longer than what was gathered): gather twice as much next time.
        want = batch if members else max(batch, 2 * (len(buf) - stop_at))
        pos = stop_at
        if careful:
            break
    # The rest, member by member, from a header on: a clean end without end-of-archive blocks,
    # a cut or a loss, a header only tarfile may judge, a compressed tar.
    rest = _Replay(buf[pos:], None if ended else chunks, lost)
    for sample in _group_members(url, _stream_members(url, rest, first=first), previous):
        yield [sample]


class _Replay:
    """Chunks: ``head`` first, then those of ``chunks`` (None: none), then the loss, if any."""

    def __init__(self, head: bytes, chunks, lost: "remote.SourceLost | None"):
        self.head, self.chunks, self.lost = head, chunks, lost

    def next(self) -> bytes | None:
        if self.head:
            head, self.head = self.head, b""
            return head
        if self.chunks is not None:
            return self.chunks.next()
        if self.lost is not None:
            lost, self.lost = self.lost, None
            raise lost
        return None


def _indexed_samples(url: str, buf: bytes, members: list[tuple[str, str, int, int]]) -> list:
    """The samples of complete members of ``buf``: a table's records where they are uniform."""
    keys, exts, starts, ends = (list(column) for column in zip(*members))
    table = ShardTable.build(url, buf, keys, exts, starts, ends)
    if table is not None:
        return table.records(range(len(table)))
    return _span_samples(url, buf, members)


def _index_members(buf: bytes, pos: int) -> tuple[list[tuple[str, str, int, int]], int, str | None]:
    """([(key, ext, start, end)] of the complete sample members of ``buf`` from the header at
    ``pos`` on, where the indexing stopped, why): None (the bytes ran out: a member, or a header,
    is incomplete), "end" (an end-of-archive block there) or "other" (a header only tarfile may
    judge there)."""
    members: list = []
    fast = _ustar_chain(buf, pos)
    if fast is not None:
        found, pos, stop = fast
        members += found
        if stop != "walk":
            return members, pos, stop
    length = len(buf)
    while pos + 512 <= length:
        block = buf[pos : pos + 512]
        if block == _ZERO_BLOCK:
            return members, pos, "end"
        header = _plain_header(block)
        if header is None:
            return members, pos, "other"
        name, size = header
        if size < 0:  # a directory: no data
            pos += 512
            continue
        following = pos + 512 + size + (-size % 512)
        if following > length:
            break
        key, ext = _split_name(name)
        if key is not None:
            members.append((key, ext.lower(), pos + 512, pos + 512 + size))
        pos = following
    return members, pos, None


def _ustar_chain(buf: bytes, pos: int):
    """:func:`_ustar_columns` for the bytes from ``pos`` (a header) on, which need not end the
    archive: (members, where it stopped, why: None, "end", or "walk" where the next header is
    not one it vouches for), or None where it cannot vouch for the first member."""
    n_blocks = (len(buf) - pos) // 512
    if n_blocks < 2:
        return None
    blocks = np.frombuffer(buf, dtype=np.uint8, count=n_blocks * 512, offset=pos).reshape(n_blocks, 512)
    heads = np.flatnonzero(blocks[:, 257] == ord("u"))
    if not heads.size or heads[0] != 0:
        return None
    headers = blocks[heads]
    magic = (headers[:, 258:262] == _USTAR_TAIL).all(1)
    if not magic.all():
        heads, headers = heads[magic], headers[magic]
    kinds = headers[:, 156]
    sizes = _octal_fields(headers[:, 124:136])
    if sizes is None or not ((kinds == _REG) | (kinds == _AREG)).all() or headers[:, 345].any():
        return None
    following = heads + 1 + (sizes + 511) // 512
    chained = np.flatnonzero(following[:-1] != heads[1:])
    count = int(chained[0]) + 1 if chained.size else len(heads)  # heads[:count] chain from block 0
    complete = int(np.searchsorted(following[:count], n_blocks, side="right"))  # their data all here
    if not complete:
        return None
    heads, headers, sizes = heads[:complete], headers[:complete], sizes[:complete]
    checksum_fields = headers[:, 148:156]
    wanted = _octal_fields(checksum_fields)
    if wanted is None:
        return None
    if not _header_checksums_ok(headers, checksum_fields, wanted):
        return None
    names = np.ascontiguousarray(headers[:, :100]).view("S100").ravel().tolist()
    plain = _split_plain_names(names)
    if plain is None:
        return None
    starts = (heads * 512 + 512 + pos).tolist()
    ends = (heads * 512 + 512 + pos + sizes).tolist()
    end_block = int(following[complete - 1])
    stop_at = pos + 512 * end_block
    if complete < count or end_block >= n_blocks:
        stop = None  # the next member is incomplete, or nothing follows yet
    elif not blocks[end_block].any():
        stop = "end"
    else:
        stop = "walk"
    return list(zip(plain[0], plain[1], starts, ends)), stop_at, stop


def _plain_header(block: bytes) -> tuple[str, int] | None:
    """(name, data size) of a plain header as tarfile reads it, size -1 for a directory; None
    where tarfile must decide (see _stream_members)."""
    kind = block[156]
    if kind not in (_REG, _AREG, _DIR) or block[124] & 0x80 or block[148] & 0x80:
        return None
    try:
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    # The unsigned byte sum of the header less its checksum field, plus 256 for that field's
    # spaces: each half's sum (at most 256 x 255) is exactly adler32's low half less 1.
    view = memoryview(block)
    unsigned = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) + 254 - sum(block[148:156])
    if size < 0 or (checksum != unsigned and checksum != sum(_SIGNED_HEADER.unpack_from(block)) + 256):
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if kind == _DIR or (kind == _AREG and name.endswith("/")):  # tarfile: a (V7) directory
        return name, -1
    if block[345]:
        name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    return name, size


class _ChunkReader:
    """Exact-size reads over a stream of chunks: ``take(n)`` gives n bytes, fewer only at the end."""

    __slots__ = ("chunks", "buf", "pos", "ended")

    def __init__(self, chunks):
        self.chunks, self.buf, self.pos, self.ended = chunks, b"", 0, False

    def take(self, n: int) -> bytes:
        pos, buf = self.pos, self.buf
        end = pos + n
        if end <= len(buf):
            self.pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        have = len(buf) - pos
        self.buf, self.pos = b"", 0
        while have < n and not self.ended:
            chunk = self.chunks.next()
            if chunk is None:
                self.ended = True
                break
            need = n - have
            if len(chunk) > need:
                parts.append(chunk[:need])
                self.buf, self.pos = chunk, need
                break
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def take_some(self, n: int) -> bytes:
        """Up to n bytes, at least one unless at the end: the buffered ones, or the next chunk's."""
        if self.pos >= len(self.buf):
            chunk = None if self.ended else self.chunks.next()
            if chunk is None:
                self.ended = True
                return b""
            self.buf, self.pos = chunk, 0
        out = self.buf[self.pos : self.pos + n]
        self.pos += len(out)
        return out


class _ChunkFile:
    """The rest of a streamed tar, from a header already taken, as the file tarfile reads."""

    def __init__(self, head: bytes, reader: _ChunkReader):
        self.head, self.reader = head, reader

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (tarfile reads on until it has what it needs): bytes that
        arrived are handed over before a loss is raised, so tarfile finds the loss where a
        tar cut at the same byte would end (the same cut sample)."""
        if size is None or size < 0:
            size = 1 << 62
        if self.head:
            out, self.head = self.head[:size], self.head[size:]
            return out
        return self.reader.take_some(size)


# ---------------------------------------------------------------------------- the sample table


class Record(NamedTuple):
    """The fields of a :class:`ShardTable` record: one sample, as the stream reads it.

    Records themselves are plain tuples in this order (``Record(*record)`` names one's fields;
    the stream unpacks them, or reads ``record[RECORD_KEY]``): CPython unpacks an exact tuple
    on a specialised path and a NamedTuple on the generic one, which measured 2-3% fewer
    images/s through the whole stream on 8x8 JPEGs (10 interleaved processes each).
    """

    buf: bytes  # the shard's bytes (usually its read-only mapping)
    start: int  # the image member's span in buf; 0, 0 where the table has no image member
    end: int
    label: int | None  # the parsed .cls: -1 without one, None where it is not a valid label
    plain: bool  # the image member is a plain JPEG (decode.plain_jpegs); False without one
    key: str
    url: str
    index: int  # the sample's position in its shard
    layout: tuple  # ShardTable.layout: (image ext, ((ext, starts, ends), ...) of every member)


RECORD_KEY, RECORD_URL, RECORD_LAYOUT = (Record._fields.index(name) for name in ("key", "url", "layout"))


class ShardTable:
    """The samples of a plain local shard in which every sample has the same members in the
    same order, as columns: ``keys[i]``, the spans of each member in ``buf``, ``labels[i]``
    (the parsed ``.cls``: -1 without one, None where it is not a valid label) and, for the
    image member, whether it is a plain JPEG (``plain_jpeg[i]``, see decode.plain_jpegs).

    ``sample(i)`` is the dict :func:`read_shard` yields for sample i.
    """

    __slots__ = ("url", "buf", "keys", "spans", "kind", "image_ext", "image_starts", "image_ends", "labels",
                 "plain_jpeg", "layout", "_index")

    def __init__(self, url: str, buf: bytes, keys: list[str], spans: dict[str, tuple[list[int], list[int]]]):
        self.url, self.buf, self.keys, self.spans = url, buf, keys, spans
        exts = list(spans)
        # What stream's sample decoder finds in such a dict: the first image member in member
        # order, or .npy for points.
        self.image_ext = next((ext for ext in exts if ext in IMAGE_EXTENSIONS), None)
        self.kind = "image" if self.image_ext is not None else ("points" if "npy" in spans else None)
        self.labels = _parse_labels(buf, *spans["cls"]) if "cls" in spans else [-1] * len(keys)
        self.image_starts, self.image_ends = spans[self.image_ext] if self.image_ext else ([], [])
        self.plain_jpeg = plain_jpegs(buf, self.image_starts, self.image_ends) if self.image_ext else []
        # The members as nested tuples of str and int: a record holding it (see records) holds
        # no GC-tracked object.
        self.layout = (self.image_ext, tuple((ext, tuple(a), tuple(b)) for ext, (a, b) in spans.items()))
        self._index: list | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def with_buf(self, buf: bytes) -> "ShardTable":
        """This table over another read of the same file (the index is shared, not copied)."""
        other = object.__new__(ShardTable)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        other.buf = buf
        other._index = None
        return other

    def records(self, picked: range) -> list[tuple]:
        """The record (a tuple of :class:`Record`'s fields) of each sample in ``picked``: what
        the stream's per-sample loop unpacks in one step.

        Records hold only the shard's buffer, str, int, bool and tuples of them, not the
        table: they form no reference cycles. (The GC keeps tracking those of a mapped shard:
        CPython untracks a tuple only when none of its items is tracked, and a mapping is.)"""
        if self._index is None:
            n = len(self.keys)
            starts, ends, plain = ((self.image_starts, self.image_ends, self.plain_jpeg) if self.image_ext
                                   else (repeat(0, n), repeat(0, n), repeat(False, n)))
            self._index = list(zip(repeat(self.buf, n), starts, ends, self.labels, plain, self.keys,
                                   repeat(self.url, n), range(n), repeat(self.layout, n)))
        return self._index if len(picked) == len(self.keys) else [self._index[i] for i in picked]

    def sample(self, i: int) -> dict:
        """Sample i as read_shard's dict (members in member order)."""
        return record_sample(self.records(range(len(self)))[i])

    def members(self) -> list[tuple[str, str, int, int]]:
        """[(key, ext, start, end)] in tar order."""
        return [(key, ext, starts[i], ends[i]) for i, key in enumerate(self.keys)
                for ext, (starts, ends) in self.spans.items()]

    @classmethod
    def build(cls, url: str, buf: bytes, keys: list[str], exts: list[str], starts: list[int],
              ends: list[int]) -> "ShardTable | None":
        """The table of members (keys, exts, starts, ends) in tar order; None unless they fall
        into samples of the same distinct extensions in the same order, consecutive samples
        having different keys (anything else goes through read_shard's grouping loop)."""
        n_members = len(keys)
        width = 1
        while width < n_members and keys[width] == keys[0]:
            width += 1
        columns = exts[:width]
        if not n_members or n_members % width or len(set(columns)) != width:
            return None
        sample_keys = keys[::width]
        n = len(sample_keys)
        for t in range(width):
            if keys[t::width] != sample_keys or exts[t::width].count(columns[t]) != n:
                return None
        if any(map(operator.eq, sample_keys, islice(sample_keys, 1, None))):
            return None  # one sample's members in two runs: duplicates, for the grouping loop
        spans = {ext: (starts[t::width], ends[t::width]) for t, ext in enumerate(columns)}
        return cls(url, buf, sample_keys, spans)


def record_sample(record: tuple) -> dict:
    """The read_shard dict of a ShardTable record (members in member order)."""
    buf, _, _, _, _, key, url, i, (_, columns) = record
    out = {"__key__": key, "__url__": url}
    for ext, starts, ends in columns:
        out[ext] = buf[starts[i] : ends[i]]
    return out


def _parse_labels(buf: bytes, starts: list[int], ends: list[int]) -> list[int | None]:
    """decode_label of every span, None where it raises; all at once when they are all the
    usual 1-18 ASCII digits."""
    raw = [buf[a:b] for a, b in zip(starts, ends)]
    lengths = list(map(len, raw))
    if raw and min(lengths) >= 1 and max(lengths) <= 18 and b"".join(raw).isdigit():
        return list(map(int, raw))
    return [_label_or_none(data) for data in raw]


def _label_or_none(data: bytes) -> int | None:
    try:
        return decode_label(data)
    except BadSample:
        return None


# ---------------------------------------------------------------------------- the index


_FAST_TAR_MAX_BYTES = 1 << 30  # larger local shards are streamed through tarfile instead
_COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4")
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_REG, _AREG, _DIR = ord("0"), 0, ord("5")


class _TableCache:
    """Tables kept across passes, one per shard path, valid while the file's identity (device,
    inode, size, mtime, ctime) is unchanged: a rewritten file is indexed afresh. Least recently
    used first out.

    Every table keeps its index (keys, spans, labels: ~30 MB for the whole budget of
    ``max_samples``). The most recent tables, up to ``max_mapped_bytes`` in all, also keep
    their mapping and their records, so that a later pass neither maps the file again nor
    rebuilds the records: mapping a shard again costs the kernel a fault per 64 KiB of it,
    which measured 2-4 ms of system time per pass of 2048 64x64 JPEGs here (1-2 us per image,
    2-4% of a decode). Kept mappings are clean page-cache pages; they count in the process's
    RSS, hence the bound.
    """

    def __init__(self, max_samples: int, max_mapped_bytes: int):
        self.max_samples, self.max_mapped_bytes = max_samples, max_mapped_bytes
        self.tables: "OrderedDict[str, tuple[tuple, ShardTable]]" = OrderedDict()
        self.samples = 0
        self.mapped_bytes = 0

    def get(self, url: str, identity: tuple) -> "ShardTable | None":
        """The table kept for ``url`` if the file still has this identity; else None (and the
        stale table, if any, is dropped)."""
        entry = self.tables.get(url)
        if entry is None:
            return None
        if entry[0] != identity:
            self._drop(url)
            return None
        self.tables.move_to_end(url)
        return entry[1]

    def put(self, url: str, identity: tuple, table: "ShardTable") -> None:
        """Keep ``table`` (just indexed, or a kept index over a fresh mapping)."""
        self._drop(url)
        if len(table) > self.max_samples:
            return
        if not isinstance(table.buf, mmap.mmap) or len(table.buf) > self.max_mapped_bytes:
            table = table.with_buf(b"")  # the index only: a read copy is not kept
        self.tables[url] = (identity, table)
        self.samples += len(table)
        self.mapped_bytes += len(table.buf)
        while self.samples > self.max_samples:
            self._drop(next(iter(self.tables)))
        for key, (ident, old) in list(self.tables.items()):  # oldest first give up their mapping
            if self.mapped_bytes <= self.max_mapped_bytes:
                break
            if old.buf:
                self.mapped_bytes -= len(old.buf)
                self.tables[key] = (ident, old.with_buf(b""))

    def _drop(self, url: str) -> None:
        entry = self.tables.pop(url, None)
        if entry is not None:
            self.samples -= len(entry[1])
            self.mapped_bytes -= len(entry[1].buf)

    def clear(self) -> None:
        self.tables.clear()
        self.samples = self.mapped_bytes = 0


_TABLE_CACHE = _TableCache(max_samples=1 << 17, max_mapped_bytes=256 << 20)  # per process


def _map_file(f, size: int) -> "mmap.mmap | bytes":
    """The bytes of the open file ``f`` of ``size`` bytes, mapped read-only where the OS can.

    Mapped, a shard costs no copy: each sample's member is sliced straight out of the page
    cache. Read into fresh memory instead, a shard costs a copy of the whole file (tar headers
    and padding included) plus a page fault per 4 KiB; measured on 64x64 images, 2.7 us per
    JPEG and 6.6 us per PNG, 7% of a JPEG's decode. The mapping lives as long as the bytes
    object would (as long as a record or table refers to it). Caveat of any mapping: a shard
    truncated *in place* while mapped makes touching its lost pages fatal (SIGBUS), where a
    read would have kept the old bytes; shards replaced by rename (as build_shards writes
    them) are safe.
    """
    try:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a filesystem without mmap support
        return f.read()
    if os.fstat(f.fileno()).st_size != size:  # shrunk since its fstat: pages past the end would fault
        mapped.close()
        return f.read()
    return mapped


def _scan(url: str) -> ShardTable | tuple[bytes, list[tuple[str, str, int, int]]] | None:
    """A plain local tar as a ShardTable, or as (shard bytes, [(key, ext, start, end)] of its
    sample members); None where ``tarfile`` must read it.

    Accepts only what it can vouch for exactly as ``tarfile`` would read it: regular files and
    directories (ustar/v7/GNU headers with octal fields and valid checksums), each member
    complete, ending with an end-of-archive block. Member names go through the same rules as
    :func:`_sample_member`.
    """
    if REMOTE_RE.match(url) or url.endswith(_COMPRESSED_SUFFIXES):
        return None
    try:
        with open(url, "rb") as f:
            st = os.fstat(f.fileno())
            if not 0 < st.st_size <= _FAST_TAR_MAX_BYTES:
                return None
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = _TABLE_CACHE.get(url, identity)
            if cached is not None and cached.buf:
                return cached  # still mapped, records and all
            buf = _map_file(f, st.st_size)
    except OSError:
        return None  # let gopen report it
    if cached is not None and len(buf) == st.st_size:
        table = cached.with_buf(buf)
        _TABLE_CACHE.put(url, identity, table)
        return table
    columns = _ustar_columns(buf)
    if columns is not None:
        starts, ends, names = columns
        plain = _split_plain_names(names)
        if plain is not None:
            keys, exts = plain
            table = ShardTable.build(url, buf, keys, exts, starts, ends)
            if table is None:
                return buf, list(zip(keys, exts, starts, ends))
            if len(buf) == st.st_size:  # a complete mapping, not a short read
                _TABLE_CACHE.put(url, identity, table)
            return table
        members = _split_names(buf, names, starts, ends)
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


def _scan_local_tar(url: str) -> tuple[bytes, list[tuple[str, str, int, int]]] | None:
    """(shard bytes, [(key, ext, start, end)] of its sample members) for a plain local tar,
    or None where ``tarfile`` must read it (see :func:`_scan`)."""
    scanned = _scan(url)
    return (scanned.buf, scanned.members()) if isinstance(scanned, ShardTable) else scanned


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


def _ustar_columns(buf: bytes) -> tuple[list[int], list[int], list[bytes]] | None:
    """(starts, ends, raw names) of the members of a ustar/GNU tar of regular files only,
    found with numpy: the blocks carrying the "ustar" magic must chain exactly from the first
    block (each header's size pointing at the next) to an end-of-archive block, with valid
    checksums and plain octal fields. None where it cannot vouch for that (then
    :func:`_walk_tar` decides). Names are the 100-byte fields less their trailing NULs."""
    n_blocks = len(buf) // 512
    if n_blocks < 2:
        return None
    blocks = np.frombuffer(buf, dtype=np.uint8, count=n_blocks * 512).reshape(n_blocks, 512)
    heads = np.flatnonzero(blocks[:, 257] == ord("u"))
    if not heads.size:
        return None
    headers = blocks[heads]  # one gather; every check below reads this contiguous copy
    magic = (headers[:, 258:262] == _USTAR_TAIL).all(1)
    if not magic.all():
        heads, headers = heads[magic], headers[magic]
    if not heads.size or heads[0] != 0:
        return None
    kinds = headers[:, 156]
    if not ((kinds == _REG) | (kinds == _AREG)).all() or headers[:, 345].any():
        return None  # directories, links, extensions, prefixed long names: the walk's business
    sizes = _octal_fields(headers[:, 124:136])
    checksum_fields = headers[:, 148:156]
    wanted = _octal_fields(checksum_fields)
    if sizes is None or wanted is None:
        return None
    following = heads + 1 + (sizes + 511) // 512
    end = int(following[-1])
    if not (np.array_equal(following[:-1], heads[1:]) and end < n_blocks and not blocks[end].any()):
        return None
    if not _header_checksums_ok(headers, checksum_fields, wanted):
        return None
    starts = heads * 512 + 512
    names = np.ascontiguousarray(headers[:, :100]).view("S100").ravel().tolist()  # trailing NULs dropped
    return starts.tolist(), (starts + sizes).tolist(), names


_NOT_PLAIN_NAME = re.compile(rb"[^\x20-\x7e\n]")
# "dir/key.ext" as _split_name splits it: key up to the first dot after the last slash, a
# base name not starting with a dot, not a "__" name.
_PLAIN_NAME = re.compile(r"^(?!__)((?:[^\n]*/)?[^/.\n][^/.\n]*)\.([^/\n]*)$", re.MULTILINE)


def _split_plain_names(names: list[bytes]) -> tuple[list[str], list[str]] | None:
    """(keys, lower-cased extensions) of raw member names when every one is printable ASCII
    of the usual "dir/key.ext" form (split in one regex pass over all of them, as
    :func:`_split_name` splits each); None otherwise."""
    joined = b"\n".join(names)
    if joined.count(b"\n") != len(names) - 1 or _NOT_PLAIN_NAME.search(joined):
        return None  # newlines, NULs, control or non-ASCII characters in a name
    found = _PLAIN_NAME.findall(joined.decode("ascii"))
    if len(found) != len(names):  # at most one match per line: every name matched
        return None
    keys = [key for key, _ in found]
    exts = "\n".join([ext for _, ext in found]).lower().split("\n")
    return keys, exts


def _split_names(buf: bytes, names: list[bytes], starts: list[int], ends: list[int]):
    """[(key, ext, start, end)] of the sample members among arbitrary raw names, name by name;
    None where tarfile would read one as a directory."""
    members = []
    append = members.append
    for raw, start, end in zip(names, starts, ends):
        if b"\0" in raw:
            raw = raw.split(b"\0", 1)[0]
        name = raw.decode("utf-8", "surrogateescape")
        if name[-1:] == "/" and buf[start - 512 + 156] == _AREG:
            return None  # tarfile reads that as a directory (old V7 style)
        key, ext = _split_name(name)
        if key is not None:
            append((key, ext.lower(), start, end))
    return members


def _header_checksums_ok(headers: np.ndarray, checksum_fields: np.ndarray, wanted: np.ndarray) -> bool:
    """Every header's checksum: byte sums of whole headers, two bytes at a time in 16-bit lanes of
    uint64 words (the checksum field counted as spaces); the slow path only where that disagrees."""
    words = headers.view(np.uint64)
    lanes = ((words & _LOW_BYTES) + ((words >> np.uint64(8)) & _LOW_BYTES)).sum(1)
    total = sum((lanes >> np.uint64(s)) & np.uint64(0xFFFF) for s in (0, 16, 32, 48)).astype(np.int64)
    unsigned = total - checksum_fields.sum(1, dtype=np.int64) + 256
    return bool((unsigned == wanted).all()) or _checksums_match(headers, wanted)


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
    """(key, ext) of a member name as :func:`_sample_member` splits it; (None, None) to skip.

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


def _sample_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a regular member, or None for members that are not sample data."""
    if not info.isreg():
        return None
    if _META_RE.match(info.name):
        return None  # webdataset's metadata members (__index__ and the like) are not samples
    key, ext = base_plus_ext(info.name)
    if key is None:
        return None
    return key, ext.lower()

