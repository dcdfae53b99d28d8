"""scikit-learn's shipped 8x8 digits (``digits``, ``stacked-digits``) and the 2-D mixtures
``ring8`` and ``grid25``: small data that needs no download."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_shards.sources.base import Images, Plan, npy_bytes, require

DIGITS_COUNT = 1797  # sklearn.datasets.load_digits
MODE_STD = {"ring8": 0.01, "grid25": 0.05}  # per-axis std of each Gaussian mode


def _upsampled_digits(image_size: int) -> tuple[list[Image.Image], np.ndarray]:
    """sklearn's digits (values 0..16) as uint8 "L" images of ``image_size`` pixels."""
    datasets = require("sklearn.datasets", "scikit-learn", "digits")  # heavy import, only needed here

    digits = datasets.load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    if image_size != pixels.shape[1]:
        # PIL's bicubic on "L" images clips to 0..255 itself (no overshoot wrap-around).
        images = [im.resize((image_size, image_size), Image.Resampling.BICUBIC) for im in images]
    return images, digits.target.astype(np.int64)


def digits_images(image_size: int, seed: int, num_samples: int | None) -> Images:
    if num_samples is not None and num_samples > DIGITS_COUNT:
        raise ValueError(f"digits has {DIGITS_COUNT} images; num_samples={num_samples} is too many")
    images, labels = _upsampled_digits(image_size)
    # Shuffle before sharding so that every shard holds every class.
    order = np.random.default_rng(seed).permutation(len(images))[: num_samples or len(images)]
    items = ((images[i], int(labels[i])) for i in order)
    return Images(1, image_size, 10, len(order), items)


def stacked_digits_images(image_size: int, seed: int, num_samples: int) -> Images:
    images, labels = _upsampled_digits(image_size)
    arrays = [np.asarray(im) for im in images]
    picks = np.random.default_rng(seed).integers(0, len(arrays), size=(num_samples, 3))

    def items():
        for a, b, c in picks:
            rgb = Image.fromarray(np.stack([arrays[a], arrays[b], arrays[c]], axis=-1))
            yield rgb, int(100 * labels[a] + 10 * labels[b] + labels[c])

    return Images(3, image_size, 1000, num_samples, items())


def mode_centers(source: str) -> np.ndarray:
    """The mixture means of ``ring8`` (8 on the unit circle) or ``grid25`` ({-4..4 step 2}^2)."""
    if source == "ring8":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if source == "grid25":
        axis = np.arange(-4.0, 5.0, 2.0)
        return np.array([(x, y) for x in axis for y in axis])
    raise ValueError(f"no mode centers for {source!r}")


def points_plan(source: str, seed: int, num_samples: int) -> Plan:
    centers = mode_centers(source)
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, len(centers), size=num_samples)
    points = (centers[modes] + MODE_STD[source] * rng.standard_normal((num_samples, 2))).astype(np.float32)
    samples = (({"npy": npy_bytes(p)}, int(m)) for p, m in zip(points, modes))
    return Plan("points", "npy", None, None, len(centers), num_samples, samples)
