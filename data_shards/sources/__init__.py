"""The shard builder's data sources; :func:`plan_source` turns a SOURCE string into a
:class:`~data_shards.sources.base.Plan` for ``data_shards.build``.

- ``toy``: ``digits``, ``stacked-digits`` (scikit-learn's 8x8 digits), ``ring8``, ``grid25``.
- ``photos``: labelled crops of the photographs shipped inside installed wheels, with a
  train/test split by region (see :mod:`data_shards.sources.photos`).
- ``folder``: ``folder:PATH``, any tree of images (sub-folders are classes).
- ``pairs``: ``pairs:sr4:SOURCE``, ``pairs:edges:SOURCE``, ``pairs:folder:PATH``: an input
  and a target image per sample (see :mod:`data_shards.sources.pairs`).
"""

from __future__ import annotations

from data_shards.sources.base import SPLITS, Images, MissingPackage, Plan, encode_images, restrict, select

__all__ = ["SOURCES", "SPLITS", "Images", "MissingPackage", "Plan", "plan_source", "default_image_size"]

SOURCES = ("digits", "stacked-digits", "ring8", "grid25", "photos", "folder:PATH",
           "pairs:sr4:SOURCE", "pairs:edges:SOURCE", "pairs:folder:PATH")
IMAGE_SOURCES = ("photos", "digits", "stacked-digits", "folder:PATH")
POINT_SOURCES = ("ring8", "grid25")
# stacked-digits: 16, twice the digits' native 8x8; 32 would carry no more and cost the GAN
# and the loader ~4x (see configs/gan_stacked_digits.yaml).
_DEFAULT_IMAGE_SIZE = {"digits": 32, "stacked-digits": 16, "folder": 64, "photos": 64}
_DEFAULT_NUM_SAMPLES = {"stacked-digits": 30_000, "ring8": 50_000, "grid25": 50_000}


def default_image_size(source: str) -> int | None:
    """The side an image source writes without ``--image-size`` (None for point sources)."""
    if source.startswith("pairs:"):
        kind, _, rest = source[len("pairs:"):].partition(":")
        return _DEFAULT_IMAGE_SIZE["folder"] if kind == "folder" else default_image_size(rest)
    return _DEFAULT_IMAGE_SIZE.get("folder" if source.startswith("folder:") else source)


def plan_source(source: str, image_size: int | None, seed: int, fmt: str, num_samples: int | None,
                split: str = "all", keep: set[int] | None = None) -> Plan:
    """Dispatch on the source name; ``split`` and the label filter ``keep`` are applied here."""
    if source.startswith("pairs:"):
        return _pairs_plan(source, image_size, seed, fmt, num_samples, split, keep)
    if source in POINT_SOURCES:
        from data_shards.sources.toy import points_plan

        plan = points_plan(source, seed, num_samples or _DEFAULT_NUM_SAMPLES[source])
        if split != "all" or keep is not None:
            plan.samples = select(plan.samples, split, keep)
        return plan
    images = _image_source(source, image_size, seed, num_samples, split, None)
    return encode_images(restrict(images, split, keep), fmt)


def _image_source(source: str, image_size, seed: int, num_samples, split: str, paired: str | None) -> Images:
    size = image_size or default_image_size(source)
    if source == "photos":
        from data_shards.sources.photos import photos_images

        return photos_images(size, seed, num_samples, split)
    if source == "digits":
        from data_shards.sources.toy import digits_images

        return digits_images(size, seed, num_samples)
    if source == "stacked-digits":
        from data_shards.sources.toy import stacked_digits_images

        return stacked_digits_images(size, seed, num_samples or _DEFAULT_NUM_SAMPLES["stacked-digits"])
    if source.startswith("folder:"):
        from data_shards.sources.folder import folder_images

        return folder_images(source[len("folder:"):], size, seed, num_samples)
    if paired is not None:
        valid = f"valid inner sources: {', '.join(IMAGE_SOURCES)}"
        if source in POINT_SOURCES:
            raise ValueError(f"{paired} needs an image source; {source!r} is a point source ({valid})")
        raise ValueError(f"unknown inner source {source!r} for {paired}; {valid}")
    raise ValueError(f"unknown shard source {source!r}; valid sources: {', '.join(SOURCES)}")


def _pairs_plan(source: str, image_size, seed: int, fmt: str, num_samples, split: str, keep) -> Plan:
    from data_shards.sources import pairs

    kind, _, rest = source[len("pairs:"):].partition(":")
    if kind == "folder":
        if not rest:
            raise ValueError("pairs:folder needs a path: pairs:folder:PATH")
        images = pairs.folder_pairs(rest, image_size or _DEFAULT_IMAGE_SIZE["folder"], seed, num_samples)
        return pairs.encode_pairs(restrict(images, split, keep), fmt, kind, None)
    if kind not in pairs.PAIR_KINDS:
        raise ValueError(f"unknown paired source {source!r}; valid: pairs:sr4:SOURCE, pairs:edges:SOURCE, "
                         "pairs:folder:PATH")
    paired = f"pairs:{kind}"
    if not (rest in ("photos", "digits", "stacked-digits") or rest.startswith("folder:")):
        _image_source(rest, image_size, seed, num_samples, split, paired)  # raises the clear error
    size = image_size or default_image_size(rest)
    if kind == "sr4" and size % pairs.SR_FACTOR:
        raise ValueError(f"pairs:sr4 needs an image size divisible by {pairs.SR_FACTOR} "
                         f"(the input is the target downscaled 4x), got {size}")
    images = restrict(_image_source(rest, size, seed, num_samples, split, paired), split, keep)
    return pairs.encode_pairs(pairs.derived_pairs(kind, images), fmt, kind, rest)
