"""Valid samples -> batches: one slot's arrays, filled sample by sample, and the dicts yielded.

A full batch goes out only once the next valid sample is in (decoded into the next batch's
array, allocated as soon as this one is full): samples skipped in between are then counted in
this batch, and resuming at that sample's position neither repeats nor recounts anything.

In a DataLoader worker the batch arrays are reused shared-memory slabs (data_shards.slabs);
a batch dict then carries ``__slab__`` entries that the main process resolves.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from data_shards.samples import SampleDecoder, decode_direct
from data_shards.slabs import _WorkerSlabs


def position(pass_index: int, window: int, offset: int, share_all: bool) -> dict:
    """Where a resumed stream starts: the first sample not yet in a batch (see ShardStream)."""
    return {"pass": pass_index, "window": window, "offset": offset, "share_all": share_all}


class Batcher:
    """Fills one slot's batches of images (or points): each valid sample lands in its batch's
    array as it comes.

    Images are kept as HWC slots of a [B,H,W,C] array (channels_last: the batch is a
    [B,C,H,W] view of it, and the fast JPEG path decodes straight into the slot, see
    ``decoder.buffer``) or copied HWC -> CHW into a [B,C,H,W] array (contiguous) from a
    reused decode buffer.
    """

    __slots__ = ("size", "channels_last", "return_keys", "decoder", "skipped", "slot", "logical", "count",
                 "array", "labels", "keys", "urls", "transpose", "scratch", "spare", "slabs", "new_array")

    def __init__(self, size: int, channels_last: bool, return_keys: bool, decoder: SampleDecoder,
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
        into this batch while they take the decoder's direct path (``SampleDecoder.row``:
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
            if type(raw) is not tuple:  # a read_shard dict
                break
            buf, start, end, label, plain, key, url, _, (image_ext, _) = raw
            if label is None or image_ext is None:
                break
            value = decode_direct(buf[start:end], plain, scratch if transpose else array[i])
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

    def emit(self, batch: tuple, where: tuple | dict) -> dict:
        """The dict yielded for ``batch`` (from add or flush): it reports the samples skipped
        since the previous one, and ``where`` (pass, window, offset, share_all), where a
        resumed stream starts."""
        array, labels, keys, urls = batch
        out: dict[str, Any] = {}
        key = "image" if array.dtype == np.uint8 else "points"
        slab = None
        if self.slabs is not None:
            slab = self.slabs.reference(array, key, len(array), key == "image" and self.channels_last)
        if slab is not None:
            out["__slab__"] = (slab,)  # the main process's loader puts out[key] back (SlabTransport.resolve)
        else:
            array = torch.from_numpy(array)
            out[key] = array.permute(0, 3, 1, 2) if key == "image" and self.channels_last else array
        return _finish(self, out, labels, slab is not None, keys, urls, where)


class PairBatcher:
    """Fills one slot's batches of pairs: targets in one array (yielded as ``image``), inputs
    in another (``source``), each [B,C,H,W] contiguous or, with channels_last, a [B,C,H,W]
    view of [B,H,W,C] memory. Same release rule and positions as :class:`Batcher`; every
    sample is copied in from the decoder's fresh arrays (no decode into the batch)."""

    __slots__ = ("size", "channels_last", "return_keys", "skipped", "slot", "logical", "count", "arrays",
                 "spares", "labels", "keys", "urls", "slabs", "new_array")

    def __init__(self, size: int, channels_last: bool, return_keys: bool, skipped: Counter, slot: int,
                 logical: int, slabs: "_WorkerSlabs | None" = None):
        self.size, self.channels_last, self.return_keys = size, channels_last, return_keys
        self.skipped, self.slot, self.logical = skipped, slot, logical
        self.count = 0
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None  # (targets, sources), from the first pair
        self.spares: tuple[np.ndarray, np.ndarray] | None = None
        self.labels = np.empty(size, dtype=np.int64)
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.slabs = slabs
        self.new_array = slabs.allocate if slabs is not None else np.empty

    def add(self, value: tuple[np.ndarray, np.ndarray], label: int, key: str, url: str) -> tuple | None:
        """As Batcher.add, for ``value`` = (target HWC, source HWC)."""
        i = self.count
        full = None
        if i == self.size:
            full = (self.arrays, self.labels, self.keys, self.urls)
            self.arrays, self.spares = self.spares, None
            self.labels = np.empty(self.size, dtype=np.int64)
            if self.return_keys:
                self.keys, self.urls = [], []
            i = 0
        if self.arrays is None:
            self.arrays = tuple(self._new_array(image.shape) for image in value)
        for array, image in zip(self.arrays, value):
            array[i] = image if self.channels_last else image.transpose(2, 0, 1)
        self.labels[i] = label
        if self.return_keys:
            self.keys.append(key)
            self.urls.append(url)
        self.count = i + 1
        if self.count == self.size:
            self.spares = tuple(self.new_array(array.shape, array.dtype) for array in self.arrays)
        return full

    def _new_array(self, hwc: tuple[int, int, int]) -> np.ndarray:
        height, width, channels = hwc
        shape = (height, width, channels) if self.channels_last else (channels, height, width)
        return self.new_array((self.size, *shape), np.uint8)

    def put_rows(self, window: list, order, j: int, n: int) -> int:
        return j  # no bulk path: every pair goes through PairDecoder and add

    def flush(self) -> tuple:
        """As Batcher.flush."""
        n = self.count
        arrays = tuple(array[:n] for array in self.arrays)
        if self.slabs is not None:
            arrays = tuple(array.copy() for array in arrays)
            for array in self.arrays:
                self.slabs.give_back(array)
        out = (arrays, self.labels[:n], self.keys, self.urls)
        self.count, self.keys, self.urls = 0, [], []
        return out

    def emit(self, batch: tuple, where: tuple | dict) -> dict:
        """As Batcher.emit: ``image`` (targets) and ``source`` (inputs), uint8 [B,C,H,W] each."""
        arrays, labels, keys, urls = batch
        out: dict[str, Any] = {}
        slabs = []
        for name, array in zip(("image", "source"), arrays):
            slab = self.slabs.reference(array, name, len(array), self.channels_last) if self.slabs is not None else None
            if slab is not None:
                slabs.append(slab)
            else:
                tensor = torch.from_numpy(array)
                out[name] = tensor.permute(0, 3, 1, 2) if self.channels_last else tensor
        if slabs:
            out["__slab__"] = tuple(slabs)
        return _finish(self, out, labels, bool(slabs), keys, urls, where)


def _finish(batcher: "Batcher | PairBatcher", out: dict, labels: np.ndarray, via_slab: bool, keys: list,
            urls: list, where: tuple | dict) -> dict:
    """The entries every batch dict has beside its arrays (see Batcher.emit)."""
    # With a slab, labels go as a list (a few hundred bytes pickled; DataLoader would turn a
    # numpy array into a second shared-memory tensor); SlabTransport.resolve makes the tensor.
    out["label"] = labels.tolist() if via_slab else torch.from_numpy(labels)
    skipped = batcher.skipped
    out["skipped"] = {reason: k for reason, k in skipped.items() if k}
    skipped.clear()
    if batcher.return_keys:
        out["__key__"] = keys
        out["__url__"] = urls
        out["__slot__"] = batcher.slot
    out["__worker__"] = batcher.logical
    out["__position__"] = position(*where) if type(where) is tuple else where
    return out
