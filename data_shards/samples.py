"""Raw samples -> (value, label): the stream's per-sample decoders.

A raw sample is a :func:`data_shards.tars.read_shard` dict (``{"__key__", "__url__", ext:
bytes, ...}``) or, for a shard read as a table, its record (a tuple of the fields of
:class:`data_shards.tars.Record`). Each decoder raises :class:`data_shards.errors.BadSample`
for a sample to skip.

* :class:`SampleDecoder`: images (``KEY.png``/``KEY.jpg``/...) or points (``KEY.npy``), plus
  the optional ``KEY.cls`` label.
* :class:`PairDecoder`: paired images, ``KEY.src.*`` (the input) + ``KEY.tgt.*`` (the target),
  plus the optional ``KEY.cls``.
"""

from __future__ import annotations

import numpy as np

from data_shards.decode import (
    IMAGE_EXTENSIONS,
    _target_hw,
    decode_image,
    decode_image_fast,
    decode_jpeg_into,
    decode_label,
    decode_png_rgb,
    decode_points,
)
from data_shards.errors import MISSING_IMAGE, MISSING_SOURCE, MISSING_TARGET, BadSample
from data_shards.tars import RECORD_LAYOUT, record_sample

SOURCE_EXTENSIONS = frozenset(f"src.{ext}" for ext in IMAGE_EXTENSIONS)  # a pair's input: KEY.src.png, ...
TARGET_EXTENSIONS = frozenset(f"tgt.{ext}" for ext in IMAGE_EXTENSIONS)  # a pair's target: KEY.tgt.png, ...


class SampleDecoder:
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
        """What ``self(record_sample(record))`` returns for a ShardTable record, without
        building the sample's dict once the stream's image target is known: from then on
        ``self.kind`` is "image", the payload is the table's image member and the label its
        parsed .cls."""
        buf, start, end, label, plain, _, _, _, (image_ext, _) = record
        if self.target is None or image_ext is None:
            return self(record_sample(record))
        if label is None:
            decode_label(record_sample(record)["cls"])  # raises BadSample, with the label in its message
        data = buf[start:end]
        buffer = self.buffer
        if self.direct and buffer is not None:  # the usual images, each with a single decoder call
            value = decode_direct(data, plain, buffer)
            if value is not None:
                return value, label
        value = decode_image_fast(data, self.channels, self.target, self.max_pixels, buffer)
        if value is None:
            value = decode_image(data, image_ext, self.channels, self.size, self.max_pixels)
        return value, label


def decode_direct(data, plain: bool, slot: np.ndarray) -> np.ndarray | None:
    """The direct path's one decoder call for an image whose HWC ``slot`` is its target: a plain
    JPEG is decoded into ``slot``, an 8-bit PNG of ``slot``'s shape into a new array (libspng
    takes no output buffer); None where the general path must decide."""
    return decode_jpeg_into(data, slot) if plain else decode_png_rgb(data, slot.shape)


class PairDecoder:
    """Decodes paired samples, ``KEY.src.*`` (input) + ``KEY.tgt.*`` (target) + optional
    ``KEY.cls``, into ``((target HWC, source HWC), label)``: fresh arrays, each side converted
    like :class:`SampleDecoder`'s images (channels and size fixed by its first decoded image).

    Skips: ``missing_source`` / ``missing_target`` for a sample with one side only,
    ``missing_image`` with neither; then ``bad_label``, and the target's, then the source's,
    ``decode_error`` or ``too_large``.
    """

    kind = "pairs"
    direct = False  # no decode into the batch: the pair batcher copies both sides

    def __init__(self, channels: int | None, image_size: int | None, source_channels: int | None,
                 source_size: int | None, max_pixels: int):
        self.target_side = SampleDecoder("image", channels, image_size, max_pixels)
        self.source_side = SampleDecoder("image", channels if source_channels is None else source_channels,
                                         source_size, max_pixels)

    def __call__(self, raw: dict) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        source_ext = target_ext = None
        for ext in raw:  # the first of each side, in member order
            if ext in TARGET_EXTENSIONS:
                target_ext = target_ext or ext
            elif ext in SOURCE_EXTENSIONS:
                source_ext = source_ext or ext
        if source_ext is None or target_ext is None:
            if source_ext is target_ext:
                raise BadSample(MISSING_IMAGE, "no KEY.src.* or KEY.tgt.* image member")
            missing = MISSING_SOURCE if source_ext is None else MISSING_TARGET
            raise BadSample(missing, f"a pair needs KEY.src.* and KEY.tgt.*; {raw.get('__key__')} has only "
                                     f"{target_ext or source_ext}")
        label = decode_label(raw["cls"]) if "cls" in raw else -1
        target, _ = self.target_side({target_ext[4:]: raw[target_ext]})
        source, _ = self.source_side({source_ext[4:]: raw[source_ext]})
        return (target, source), label

    def row(self, record: tuple) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        return self(record_sample(record))


def sample_kind(raw: dict | tuple) -> str | None:
    """"image", "pairs", "points" or None: what kind of stream a raw sample belongs to, by its
    members (an image member first, as SampleDecoder detects it)."""
    exts = [column[0] for column in raw[RECORD_LAYOUT][1]] if type(raw) is tuple else raw
    if any(ext in IMAGE_EXTENSIONS for ext in exts):
        return "image"
    if any(ext in SOURCE_EXTENSIONS or ext in TARGET_EXTENSIONS for ext in exts):
        return "pairs"
    return "points" if "npy" in exts else None


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
