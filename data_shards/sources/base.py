"""What every source hands the shard writer, and the helpers they share.

An *image source* (digits, stacked-digits, photos, folder:PATH) yields PIL images with
labels (:class:`Images`); the builder encodes them one per sample, or a paired source turns
each into an input/target pair. A point source and the encoders produce a :class:`Plan`:
ready-to-write tar members per sample plus the manifest's metadata.
"""

from __future__ import annotations

import importlib
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

JPEG_QUALITY = 90
SPLITS = ("all", "train", "test")
HELD_OUT_EVERY = 5  # every 5th sample of the seeded order is held out: a 20% test split


class MissingPackage(ValueError):
    """A source needs a Python package that is not installed (one line, names the package)."""


@dataclass
class Images:
    """An image source before encoding.

    ``items`` yields ``(PIL image, label)``; every image is ``image_size`` square, in mode
    "L" (``channels`` 1) or "RGB" (3); ``label`` is ``None`` for unlabelled sources.
    ``splits_itself`` marks a source whose ``train``/``test`` split is already applied (photos:
    by region); for the others the builder holds out every 5th sample of the seeded order.
    ``skipped_files`` and ``skip_reasons`` may still grow while ``items`` is consumed.
    """

    channels: int
    image_size: int
    num_classes: int | None
    total: int  # upper bound on the number of items, for the progress bar
    items: Iterable[tuple[Image.Image, int | None]]
    classes: list[str] | None = None
    skipped_files: list[str] = field(default_factory=list)
    skip_reasons: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest keys
    splits_itself: bool = False


@dataclass
class Plan:
    """What the writer consumes: metadata for the manifest plus a lazy sample iterator.

    ``samples`` yields ``(members, label)`` where members maps extension -> bytes (without
    ``cls``; the writer adds it from ``label``, which is ``None`` for unlabelled samples).
    """

    kind: str  # "image" | "points" | "pairs"
    fmt: str  # "png" | "jpg" | "npy"
    channels: int | None
    image_size: int | None
    num_classes: int | None
    total: int  # upper bound on the number of samples, for the progress bar
    samples: Iterable[tuple[dict[str, bytes], int | None]]
    classes: list[str] | None = None
    skipped_files: list[str] = field(default_factory=list)
    skip_reasons: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)


def select(items: Iterable[tuple[Any, int | None]], split: str, keep: set[int] | None) -> Iterator:
    """The items of one split (by position in the seeded order) with a kept label."""
    for i, (item, label) in enumerate(items):
        held_out = i % HELD_OUT_EVERY == 0
        if (split == "train" and held_out) or (split == "test" and not held_out):
            continue
        if keep is not None and label not in keep:
            continue
        yield item, label


def restrict(images: Images, split: str, keep: set[int] | None) -> Images:
    """Apply the split (unless the source did) and the label filter to an image source."""
    if images.splits_itself:
        split = "all"
    if split != "all" or keep is not None:
        images.items = select(images.items, split, keep)
        if split != "all":
            images.total = _split_count(images.total, split)
    return images


def _split_count(total: int, split: str) -> int:
    held_out = (total + HELD_OUT_EVERY - 1) // HELD_OUT_EVERY
    return held_out if split == "test" else total - held_out


def encode_images(images: Images, fmt: str) -> Plan:
    """One encoded image per sample: ``KEY.png`` / ``KEY.jpg``."""
    samples = (({fmt: encode(image, fmt)}, label) for image, label in images.items)
    return Plan("image", fmt, images.channels, images.image_size, images.num_classes, images.total, samples,
                images.classes, images.skipped_files, images.skip_reasons, dict(images.extra))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def npy_bytes(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def require(module: str, package: str, needed_by: str):
    """Import ``module`` or raise :class:`MissingPackage` naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{needed_by} needs the Python package {package}, which is not installed "
                             f"(pip install {package})") from None
