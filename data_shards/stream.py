"""Stream batches from WebDataset shards: split across ranks and workers, shuffle, decode, batch.

Design points (see ``ShardStream`` for the details):

* Work is split over *slots*: one slot per (rank, DataLoader worker) pair. With at least as
  many shards as slots each slot reads its own shards; with fewer, every slot reads all
  shards and keeps a disjoint, interleaved subset of the samples. Every slot therefore always
  has data, so no rank waits forever on a peer whose worker got no shard.
* The stream is infinite (unless ``passes`` is given): ranks never disagree about an epoch end.
* Bad data never raises and is never dropped silently: each skipped sample is counted under a
  reason (data_shards.errors) and reported in the ``skipped`` dict of the next batch.

The reader, by concern:

* data_shards.specs: shard specs -> shard URLs (``resolve_shards``, ``find_manifest``).
* data_shards.tars: a shard -> raw samples (dicts, or the records of a ShardTable).
* data_shards.samples: a raw sample -> (value, label) (``SampleDecoder``, ``PairDecoder``).
* data_shards.batcher: values -> batch dicts (``Batcher``, ``PairBatcher``).
* this module: the slots, passes, shuffle windows and resume positions (``ShardStream``).
* data_shards.loader: the DataLoader around it, its workers and their exit (``make_loader``).
* data_shards.options: ``StreamOptions``, what all of them are configured with.

The names callers used from this module before it was split (``make_loader``,
``batch_to_float``, ``resolve_shards``, ``read_shard``, ``NoValidSamples``, ...) still import from here.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from data_shards.batcher import Batcher, PairBatcher
from data_shards.decode import DEFAULT_MAX_PIXELS  # noqa: F401 - public names of this module, as before
from data_shards.errors import (  # noqa: F401
    BAD_LABEL,
    DECODE_ERROR,
    DUPLICATE_MEMBER,
    MISSING_IMAGE,
    SKIP_REASONS,
    TOO_LARGE,
    TRUNCATED_TAR,
    UNREADABLE_SHARD,
    BadSample,
    NoValidSamples,
    ShardError,
)
from data_shards.options import StreamOptions
from data_shards.samples import PairDecoder, SampleDecoder, sample_kind
from data_shards.slabs import SlabTransport
from data_shards.specs import find_manifest, resolve_shards  # noqa: F401
from data_shards.tars import (  # noqa: F401
    RECORD_KEY,
    RECORD_URL,
    ShardTable,
    drop_prefetched,
    prefetch,
    read_shard,
    shard_samples,
)

_FROM_LOADER = ("make_loader", "batch_to_float")


def __getattr__(name: str) -> Any:
    """``make_loader`` and ``batch_to_float``, which live in data_shards.loader (it imports
    this module, so they are looked up on first use instead of imported here)."""
    if name in _FROM_LOADER:
        from data_shards import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _PassStats:
    valid: int = 0
    foreign: int = 0  # samples present but belonging to another slot
    skipped: Counter = field(default_factory=Counter)  # this pass only, for the error message
    last_error: str = ""  # the last shard damage this slot counted, for the error message


class _Slot:
    """What one slot's iteration works with: its decoder and batcher, which change once if a
    stream of undeclared kind turns out to hold pairs (see ShardStream._one_pass)."""

    __slots__ = ("index", "count", "logical", "skipped", "slabs", "decoder", "batcher")

    def __init__(self, index: int, count: int, logical: int, slabs, decoder, batcher):
        self.index, self.count, self.logical = index, count, logical
        self.skipped: Counter = batcher.skipped
        self.slabs, self.decoder, self.batcher = slabs, decoder, batcher


class ShardStream(IterableDataset):
    """Infinite stream of batches from WebDataset shards, split over ranks and workers.

    Yields dicts ``{"image": uint8 [B,C,H,W], "label": int64 [B], "skipped": {reason: n}}``
    for image shards, ``{"points": float32 [B,D], "label": ..., "skipped": ...}`` for
    ``.npy`` shards, or for paired shards (``KEY.src.*`` + ``KEY.tgt.*``) ``{"image": the
    targets, uint8 [B,C,H,W], "source": the inputs, uint8 [B,C',h,w], "label": ...,
    "skipped": ...}``. ``label`` is -1 where a sample has no ``.cls``; ``skipped`` counts the
    samples skipped since the previous batch of this slot (only non-zero reasons appear).
    Every batch also carries ``__worker__`` and ``__position__`` (see ``start_positions``).

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
        options: a :class:`StreamOptions`, or the batch size (samples per batch, per rank), or
            None with the batch size among ``fields``.
        **fields: StreamOptions fields (``seed=1``, ``channels_last=True``, ...) replacing
            those of ``options``.

    Raises (while iterating):
        NoValidSamples: a whole pass over this slot's shards produced no valid sample.
    """

    def __init__(self, urls: Any, options: StreamOptions | int | None = None, **fields: Any):
        super().__init__()
        self.options = StreamOptions.of(options, **fields)
        self.urls = resolve_shards(urls)
        self.transport: SlabTransport | None = None  # make_loader's, with DataLoader workers

    def slot(self) -> tuple[int, int, int]:
        """(slot, num_slots, logical worker) of the calling process/worker."""
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker_id + self.options.worker_offset) % num_workers
        return self.options.rank * num_workers + logical, self.options.world_size * num_workers, logical

    def __iter__(self) -> Iterator[dict]:
        o = self.options
        index, count, logical = self.slot()
        slabs = self.transport.worker_slabs() if self.transport is not None else None
        skipped: Counter = Counter()
        if o.kind == "pairs":
            decoder, batcher = self._pair_reader(skipped, index, logical, slabs)
        else:
            decoder = SampleDecoder(o.kind, o.channels, o.image_size, o.max_pixels)
            batcher = Batcher(o.batch_size, o.channels_last, o.return_keys, decoder, skipped, index, logical, slabs)
        slot = _Slot(index, count, logical, slabs, decoder, batcher)
        yield from self._batches(slot, (o.start_positions or {}).get(logical))
        if slot.batcher.count:  # only reached when `passes` is finite
            end = {"pass": o.passes, "window": 0, "offset": 0, "share_all": False}
            yield slot.batcher.emit(slot.batcher.flush(), end)

    def _pair_reader(self, skipped: Counter, index: int, logical: int, slabs) -> tuple[PairDecoder, PairBatcher]:
        o = self.options
        decoder = PairDecoder(o.channels, o.image_size, o.source_channels, o.source_size, o.max_pixels)
        return decoder, PairBatcher(o.batch_size, o.channels_last, o.return_keys, skipped, index, logical, slabs)

    def _batches(self, slot: _Slot, start: dict | None):
        """The batches of this slot, pass after pass, from `start` (a final partial one aside)."""
        share_all = bool(start and start.get("share_all"))
        pass_index = int(start["pass"]) if start else 0
        passes = self.options.passes
        while passes is None or pass_index < passes:
            stats = _PassStats()
            resume = start if start and int(start["pass"]) == pass_index else None
            yield from self._one_pass(pass_index, slot, share_all, stats, resume)
            if stats.valid == 0 and resume is None:
                if stats.foreign and not share_all:
                    # Fewer samples than slots: better to repeat data on this slot than to
                    # leave its rank without batches (which would hang the whole job).
                    warnings.warn(
                        f"slot {slot.index} of {slot.count}: no valid sample among this slot's share of "
                        f"{len(self.urls)} shard(s); it now reads all of them (samples may repeat across slots)"
                    )
                    share_all = True
                    continue
                last = f"; last error: {stats.last_error}" if stats.last_error else ""
                raise NoValidSamples(
                    f"no valid samples in shards: {_describe(self._slot_urls(slot, share_all))} "
                    f"(slot {slot.index} of {slot.count}; skipped {dict(stats.skipped)}){last}"
                )
            pass_index += 1

    def _slot_urls(self, slot: _Slot, share_all: bool) -> list[tuple[int, str]]:
        indexed = list(enumerate(self.urls))
        return indexed if share_all or len(indexed) < slot.count else indexed[slot.index :: slot.count]

    def _one_pass(self, pass_index: int, slot: _Slot, share_all: bool, stats: _PassStats, resume: dict | None):
        """One pass over this slot's shards: windows of raw samples, each visited in a seeded
        permutation, decoded lazily into the slot's batcher. `resume` skips the windows and
        offsets already consumed (read, not decoded, and not counted again). Yields the batches
        that fill up, each once the next valid sample is in (see Batcher.add), with that
        sample's position (pass, window, offset, share_all)."""
        seed, window_size = self.options.seed, max(1, self.options.shuffle_buffer)
        first_window = int(resume["window"]) if resume else 0
        first_offset = int(resume["offset"]) if resume else 0
        counting = {"on": first_window == 0}
        skipped = slot.skipped

        def count(reason: str) -> None:
            if counting["on"]:
                skipped[reason] += 1
                stats.skipped[reason] += 1

        raw_samples = self._raw_samples(pass_index, slot, share_all, stats, count)
        # Bound once: this loop runs once per sample, and its own work is most of what the
        # stream adds to the decode (64x64 images decode in tens of microseconds).
        decode, batcher = slot.decoder, slot.batcher
        row, add, emit, put_rows = decode.row, batcher.add, batcher.emit, batcher.put_rows
        w = 0
        while True:
            # Shard damage found while filling window w is counted iff window w - 1 was.
            window = list(islice(raw_samples, window_size))
            if not window:
                return
            if decode.kind is None and next(filter(None, map(sample_kind, window)), None) == "pairs":
                # A stream of undeclared kind whose first telling sample is a pair: a stream of
                # pairs (no sample has been decoded yet, so nothing is lost by switching).
                slot.decoder, slot.batcher = self._pair_reader(skipped, slot.index, slot.logical, slot.slabs)
                decode, batcher = slot.decoder, slot.batcher
                row, add, emit, put_rows = decode.row, batcher.add, batcher.emit, batcher.put_rows
            counting["on"] = w >= first_window
            if w >= first_window:
                order = range(len(window))
                if window_size > 1:
                    order = random.Random(f"{seed}:{slot.index}:{pass_index}:{w}").sample(order, len(window))
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
                            key, url = raw[RECORD_KEY], raw[RECORD_URL]
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

    def _raw_samples(self, pass_index: int, slot: _Slot, share_all: bool, stats: _PassStats,
                     count) -> Iterator[dict | tuple]:
        """This slot's undecoded samples of one pass, its shards in a seeded order: read_shard's
        dicts, or ShardTable records for shards indexed as tables. A table's records come as
        one list, chained in C: no Python frame resumed per sample."""
        shards = self._slot_urls(slot, share_all)
        random.Random(f"{self.options.seed}:{pass_index}:{slot.index}").shuffle(shards)
        interleave = len(self.urls) < slot.count and not share_all
        return chain.from_iterable(self._shard_parts(shards, slot.index, slot.count, interleave, stats, count))

    def _shard_parts(self, shards, slot, num_slots, interleave, stats, count) -> Iterator[Iterable]:
        """Per shard, the iterable of this slot's samples in it (see _raw_samples). A remote
        shard's next one starts arriving while it is read (data_shards.tars.prefetch)."""
        try:
            yield from self._shard_sources(shards, slot, num_slots, interleave, stats, count)
        finally:  # the pass stopped early (its end, a resume's skip, a closed loader): no reader left behind
            for _, url in shards:
                drop_prefetched(url)

    def _shard_sources(self, shards, slot, num_slots, interleave, stats, count) -> Iterator[Iterable]:
        for i, (k, url) in enumerate(shards):
            if i + 1 < len(shards):
                prefetch(shards[i + 1][1])
            try:
                source = shard_samples(url)
            except ShardError as exn:
                self._shard_damage(k, slot, num_slots, exn, count, stats)
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
            self._shard_damage(k, slot, num_slots, exn, count, stats)

    @staticmethod
    def _shard_damage(k: int, slot: int, num_slots: int, exn: ShardError, count, stats: _PassStats) -> None:
        # Every slot may read this shard; only its owner reports the damage so that the
        # counts summed over slots match what is in the data.
        if k % num_slots == slot:
            count(exn.reason)
        stats.last_error = " ".join(str(exn).split())[:300]  # one line, for NoValidSamples' message


def _describe(shards: list[tuple[int, str]], limit: int = 3) -> str:
    names = [url for _, url in sorted(shards)]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
