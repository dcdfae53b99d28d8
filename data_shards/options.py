"""StreamOptions: everything that shapes a stream of batches, in one value passed through.

``ShardStream(urls, options)`` and ``make_loader(urls, options)`` take it; both also accept a
batch size and keyword fields (``ShardStream(urls, 64, seed=1)``), which build one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from data_shards.decode import DEFAULT_MAX_PIXELS

KINDS = (None, "image", "points", "pairs")


@dataclass(frozen=True)
class StreamOptions:
    """How a stream reads, splits, shuffles, decodes and batches its shards.

    A resumed stream yields exactly the batches of the uninterrupted one only with the same
    shards, ``seed``, ``shuffle_buffer``, ``batch_size``, ``world_size`` and ``num_workers``.
    """

    batch_size: int
    """Samples per batch (per rank)."""
    rank: int = 0
    """This process's rank; torch.distributed is not consulted."""
    world_size: int = 1
    """Processes in the job, each reading its own share of the samples."""
    seed: int = 0
    """Base seed of the shard order and of the shuffle windows."""
    shuffle_buffer: int = 512
    """Samples per shuffle window (<= 1 disables shuffling)."""
    channels: int | None = None
    """1 or 3 to convert every image; None keeps the first image's channel count."""
    image_size: int | None = None
    """Resize/centre-crop every image to this side; None keeps the first image's size (later
    images are fitted to it). For pairs: the target's side."""
    kind: str | None = None
    """"image", "points" or "pairs"; None detects it from the first sample's members."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images whose header announces more pixels are skipped as ``too_large``."""
    passes: int | None = None
    """Stop after this many passes (flushing a final partial batch); None = forever."""
    return_keys: bool = False
    """Also yield ``__key__``/``__url__`` lists and the ``__slot__`` index."""
    channels_last: bool = False
    """Yield images as a [B,C,H,W] view of [B,H,W,C] memory (``torch.channels_last``) instead
    of a contiguous tensor: same values, no HWC->CHW copy on the loader's core."""
    start_positions: dict | None = None
    """``{logical_worker: position}`` from the ``__worker__`` and ``__position__`` entries of
    earlier batches: each worker continues right after the last batch it produced."""
    worker_offset: int = 0
    """DataLoader worker i plays logical worker (i + offset) % num_workers: after N batches
    the next one is due from logical worker N % num_workers."""
    num_workers: int = 0
    """DataLoader worker processes (``make_loader``; a ShardStream learns its worker from torch)."""
    source_channels: int | None = None
    """Pairs: channels of the input images; None = ``channels`` (or, if that is None too, the
    first input's own)."""
    source_size: int | None = None
    """Pairs: side of the input images; None keeps the first input's size (e.g. a quarter of
    the target's for 4x super-resolution shards)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        for name in ("channels", "source_channels"):
            if getattr(self, name) not in (None, 1, 3):
                raise ValueError(f"{name} must be 1, 3 or None, got {getattr(self, name)!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be 'image', 'points', 'pairs' or None, got {self.kind!r}")
        if self.passes is not None and self.passes < 1:
            raise ValueError(f"passes must be >= 1 or None, got {self.passes}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @classmethod
    def of(cls, options: "StreamOptions | int | None" = None, **fields: Any) -> "StreamOptions":
        """``options`` with ``fields`` replaced; an int is a batch size, None takes the batch
        size from ``fields`` (the other fields from ``fields`` and the defaults)."""
        if isinstance(options, StreamOptions):
            return dataclasses.replace(options, **fields) if fields else options
        return cls(**fields) if options is None else cls(batch_size=options, **fields)
