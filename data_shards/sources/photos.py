"""``photos``: labelled random crops of the photographs shipped inside installed wheels.

The photographs (no download, ever): scikit-image's ``skimage.data`` (astronaut, chelsea,
coffee, rocket, hubble_deep_field, immunohistochemistry, retina, camera, coins, moon,
brick, grass, gravel; the grey ones are converted to RGB), scikit-learn's
``load_sample_images`` (china, flower) and matplotlib's sample data (grace_hopper): 16
photos, 16 classes. ``KEY.cls`` is the photo's index in :data:`PHOTOS`; the manifest lists
the names under ``classes`` and each photo's package and size under ``photos``. All three
packages are required, so the class list is the same on every machine; a missing one is a
one-line error naming it.

Crops. Each sample picks a photo (classes are balanced: every photo gets ``n // 16`` or one
more crops, in a seeded order), a square side drawn log-uniformly from
``[max(short / 8, S), 0.4 * short]`` (``short``: the photo's shorter side, ``S``: the image
size; a crop is never upscaled unless the photo is too small for that, where the range
collapses to ``0.4 * short``) and a position, and resizes the crop to ``S`` x ``S`` with
PIL's antialiased bicubic filter.

Splits. The *test block* of each photo is its bottom-right corner, 45% of its width by 45%
of its height (about 20% of its area). ``test`` crops lie entirely inside the block;
``train`` crops never overlap it (positions are drawn uniformly among those that do not),
so no test pixel is ever seen in training; both splits draw crop sides from the same range.
``all`` crops anywhere. :func:`crop_boxes` returns the boxes the builder uses.

Defaults: S = 64; 6,000 crops for ``train`` and ``all``, 1,200 for ``test``.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
from PIL import Image

from data_shards.sources.base import Images, require

DEFAULT_IMAGE_SIZE = 64
DEFAULT_NUM_SAMPLES = {"all": 6000, "train": 6000, "test": 1200}
CROP_MIN_FRACTION = 1 / 8  # of the photo's shorter side
CROP_MAX_FRACTION = 0.4  # < TEST_BLOCK_FRACTION, so every crop size fits in the test block
TEST_BLOCK_FRACTION = 0.45  # the test block's width / height as a fraction of the photo's

# (class name, pip package, importable module): the order fixes the class indices.
PACKAGES = {"scikit-image": "skimage.data", "scikit-learn": "sklearn.datasets", "matplotlib": "matplotlib.cbook"}
PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "scikit-image"),
    ("chelsea", "scikit-image"),
    ("coffee", "scikit-image"),
    ("rocket", "scikit-image"),
    ("hubble_deep_field", "scikit-image"),
    ("immunohistochemistry", "scikit-image"),
    ("retina", "scikit-image"),
    ("camera", "scikit-image"),
    ("coins", "scikit-image"),
    ("moon", "scikit-image"),
    ("brick", "scikit-image"),
    ("grass", "scikit-image"),
    ("gravel", "scikit-image"),
    ("china", "scikit-learn"),
    ("flower", "scikit-learn"),
    ("grace_hopper", "matplotlib"),
)
CLASSES = [name for name, _ in PHOTOS]
_SPLIT_STREAM = {"all": 0, "train": 1, "test": 2}  # independent random streams per split


def check_packages() -> None:
    """Raise :class:`~data_shards.sources.base.MissingPackage` naming the first absent package."""
    for package, module in PACKAGES.items():
        require(module, package, "the photos source")


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Image.Image, ...]:
    """The photographs of :data:`PHOTOS` as RGB PIL images (loaded once per process)."""
    check_packages()
    return tuple(_load(name, package) for name, package in PHOTOS)


def _load(name: str, package: str) -> Image.Image:
    module = require(PACKAGES[package], package, "the photos source")
    try:
        if package == "scikit-image":
            image = Image.fromarray(np.asarray(getattr(module, name)()))
        elif package == "scikit-learn":
            image = Image.fromarray(module.load_sample_image(f"{name}.jpg"))
        else:
            with Image.open(module.get_sample_data(f"{name}.jpg", asfileobj=False)) as opened:
                image = opened.copy()
    except Exception as err:  # e.g. a newer release that downloads this photo on demand
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"photos: cannot load {name} from {package} without a download: {first}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def held_out_block(width: int, height: int) -> tuple[int, int, int, int]:
    """The test-only region ``(left, top, right, bottom)`` of a ``width`` x ``height`` photo."""
    return (width - round(width * TEST_BLOCK_FRACTION), height - round(height * TEST_BLOCK_FRACTION), width, height)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def crop_boxes(sizes: list[tuple[int, int]], num_samples: int, seed: int, split: str,
               image_size: int) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
    """``(photo index, (left, top, right, bottom))`` of every crop, in sample order.

    ``sizes`` are the photos' ``(width, height)``. Deterministic in all arguments.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_STREAM)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    labels = rng.permutation(np.resize(np.arange(len(sizes)), num_samples))
    for label in labels:
        width, height = sizes[label]
        short = min(width, height)
        high = CROP_MAX_FRACTION * short
        low = min(max(CROP_MIN_FRACTION * short, image_size), high)
        side = max(1, int(round(math.exp(rng.uniform(math.log(low), math.log(high))))))
        block = held_out_block(width, height)
        left, top, right, bottom = block if split == "test" else (0, 0, width, height)
        while True:  # uniform over the allowed positions (train: rejects those touching the block)
            x = int(rng.integers(left, right - side + 1))
            y = int(rng.integers(top, bottom - side + 1))
            box = (x, y, x + side, y + side)
            if split != "train" or not _overlaps(box, block):
                break
        yield int(label), box


def photos_images(image_size: int, seed: int, num_samples: int | None, split: str) -> Images:
    photos = load_photos()
    n = num_samples or DEFAULT_NUM_SAMPLES[split]
    sizes = [photo.size for photo in photos]

    def items():
        for label, box in crop_boxes(sizes, n, seed, split, image_size):
            yield photos[label].resize((image_size, image_size), Image.Resampling.BICUBIC, box=box), label

    extra = {
        "photos": [{"name": name, "package": package, "width": w, "height": h}
                   for (name, package), (w, h) in zip(PHOTOS, sizes)],
        "crops": {"side_min_fraction": CROP_MIN_FRACTION, "side_max_fraction": CROP_MAX_FRACTION,
                  "test_block_fraction": TEST_BLOCK_FRACTION, "resample": "bicubic",
                  "split_rule": "test crops lie inside each photo's bottom-right test block; "
                                "train crops never touch it"},
    }
    return Images(3, image_size, len(PHOTOS), n, items(), list(CLASSES), extra=extra, splits_itself=True)
