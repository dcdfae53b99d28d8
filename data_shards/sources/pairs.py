"""Paired sources: an input (``src``) and a target (``tgt``) image per sample.

Sample layout (standard WebDataset members, so any tar reader sees them)::

    KEY.src.png   the input   (``.jpg`` for both members with ``--format jpg``)
    KEY.tgt.png   the target
    KEY.cls       the inner source's label, where it has one (ASCII integer)

The manifest of a paired build says ``"kind": "pairs"``, ``"paired": true``, ``"pair_kind"``
(``sr4``, ``edges`` or ``folder``), ``"src_size"`` and ``"tgt_size"`` (square sides in
pixels; ``image_size`` is the target's), ``"channels"`` (of both images) and
``"members"`` (the two extensions).

- ``pairs:sr4:SOURCE``: the target is SOURCE's image at ``--image-size`` S (divisible by 4);
  the input is that target downscaled to S/4 by ``Image.resize((S//4, S//4),
  Image.BICUBIC)`` (PIL's antialiased bicubic). With ``--format jpg`` both are downscaled
  from the same clean target before each is JPEG-encoded.
- ``pairs:edges:SOURCE``: the input is :func:`edge_map` of the target (Sobel gradient
  magnitude drawn as dark lines on white, the target's size and channels).
- ``pairs:folder:PATH``: a user's own aligned pairs, either ``PATH/src/NAME.*`` with
  ``PATH/tgt/NAME.*`` (used when both sub-folders exist; NAME may contain sub-folders) or
  ``PATH/NAME_src.*`` with ``PATH/NAME_tgt.*``. Targets are scaled to cover S and
  centre-cropped; inputs keep their size ratio to the target (``src_size = round(S *
  src_short_side / tgt_short_side)``, the most common value over all pairs; ties go to the
  first NAME in sorted order). Skipped, listed (``skipped_files``) and counted by reason
  (``skipped_reasons``) in the manifest: files without a partner (``unmatched``), every file
  of a NAME that has two files on one side, e.g. ``src/a.png`` and ``src/a.jpg``
  (``duplicate``), pairs whose aspect ratios differ by more than a pixel
  (``aspect_mismatch``) or whose size ratio differs from the common one
  (``size_ratio_mismatch``), and unreadable files (``unreadable``). Unlabelled.

SOURCE for sr4 and edges is any image source: ``photos``, ``digits``, ``stacked-digits`` or
``folder:PATH``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data_shards.decode import DEFAULT_MAX_PIXELS, BadSample, decode_image
from data_shards.sources.base import Images, Plan, encode
from data_shards.sources.folder import image_files

PAIR_KINDS = ("sr4", "edges", "folder")
SR_FACTOR = 4


def sr4_input(target: Image.Image) -> Image.Image:
    """The target downscaled 4x with PIL's antialiased bicubic filter."""
    return target.resize((target.width // SR_FACTOR, target.height // SR_FACTOR), Image.Resampling.BICUBIC)


def _smooth(a: np.ndarray, axis: int) -> np.ndarray:
    """[1, 2, 1] / 4 along ``axis``, borders replicated."""
    p = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in range(2)], mode="edge")
    p = np.moveaxis(p, axis, 0)
    return np.moveaxis((p[:-2] + 2 * p[1:-1] + p[2:]) * np.float32(0.25), 0, axis)


def _derivative(a: np.ndarray, axis: int) -> np.ndarray:
    """Central difference [-1, 0, 1] / 2 along ``axis``, borders replicated."""
    p = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in range(2)], mode="edge")
    p = np.moveaxis(p, axis, 0)
    return np.moveaxis((p[2:] - p[:-2]) * np.float32(0.5), 0, axis)


def edge_map(image: Image.Image) -> Image.Image:
    """A sketch of ``image``: Sobel edges as dark lines on white, same size and mode.

    The grey image is smoothed ([1, 2, 1] both ways), the Sobel gradient magnitude taken,
    and scaled by ``s = max(95th percentile, 20)``: magnitudes below ``0.2 s`` stay white,
    from there the line darkens linearly to black at ``s``.
    """
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    blurred = _smooth(_smooth(grey, 0), 1)
    gx = _smooth(_derivative(blurred, 1), 0)
    gy = _smooth(_derivative(blurred, 0), 1)
    magnitude = np.hypot(gx, gy)
    scale = max(float(np.percentile(magnitude, 95)), 20.0)
    darkness = np.clip((magnitude - 0.2 * scale) / (0.8 * scale), 0.0, 1.0)
    lines = Image.fromarray(np.round(255.0 * (1.0 - darkness)).astype(np.uint8))
    return lines if image.mode == "L" else lines.convert(image.mode)


def derived_pairs(kind: str, inner: Images) -> Images:
    """``(src, tgt)`` items made from an image source's images (``sr4`` or ``edges``)."""
    make_input = sr4_input if kind == "sr4" else edge_map
    items = inner.items

    def paired():
        for image, label in items:
            yield (make_input(image), image), label

    src_size = inner.image_size // SR_FACTOR if kind == "sr4" else inner.image_size
    inner.items = paired()
    inner.extra = {**inner.extra, "src_size": src_size}
    return inner


def encode_pairs(pairs: Images, fmt: str, kind: str, inner_source: str | None) -> Plan:
    """Encode ``((src, tgt), label)`` items as ``KEY.src.FMT`` + ``KEY.tgt.FMT`` samples."""
    src_key, tgt_key = f"src.{fmt}", f"tgt.{fmt}"
    samples = (({src_key: encode(src, fmt), tgt_key: encode(tgt, fmt)}, label) for (src, tgt), label in pairs.items)
    extra = {**pairs.extra, "paired": True, "pair_kind": kind, "tgt_size": pairs.image_size,
             "members": [src_key, tgt_key]}
    if inner_source is not None:
        extra["inner_source"] = inner_source
    return Plan("pairs", fmt, pairs.channels, pairs.image_size, pairs.num_classes, pairs.total, samples,
                pairs.classes, pairs.skipped_files, pairs.skip_reasons, extra)


# ---------------------------------------------------------------------------- pairs:folder


def folder_pairs(path: str, image_size: int, seed: int, num_samples: int | None) -> Images:
    """A folder of aligned pairs as unlabelled ``((src, tgt), None)`` items (see the module doc)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"pairs:folder:{path}: not a directory")
    skipped: list[str] = []
    reasons: Counter = Counter()

    def skip(reason: str, *rels: str) -> None:
        skipped.extend(rels)
        reasons[reason] += 1

    sides: dict[str, dict[str, str]] = {"src": {}, "tgt": {}}
    if (root / "src").is_dir() and (root / "tgt").is_dir():
        layout = "src/NAME + tgt/NAME"
        found = [(side, rel.with_suffix("").as_posix(), f"{side}/{rel.as_posix()}")
                 for side in ("src", "tgt") for rel in image_files(root / side)]
    else:
        layout = "NAME_src + NAME_tgt"
        found = []
        for rel in image_files(root):
            stem = rel.stem
            side = stem[-3:] if stem.endswith(("_src", "_tgt")) else None
            if side is None:
                skip("unmatched", rel.as_posix())
                continue
            found.append((side, (rel.parent / stem[:-4]).as_posix(), rel.as_posix()))
    files_of: dict[tuple[str, str], list[str]] = {}
    for side, key, rel in found:
        files_of.setdefault((side, key), []).append(rel)
    ambiguous = sorted({key for (_side, key), rels in files_of.items() if len(rels) > 1})
    for key in ambiguous:  # e.g. src/a.png and src/a.jpg: which one is meant is a guess, so neither
        skip("duplicate", *(rel for side in ("src", "tgt") for rel in files_of.get((side, key), [])))
    for (side, key), rels in files_of.items():
        if key not in ambiguous:
            sides[side][key] = rels[0]
    for side, other in (("src", "tgt"), ("tgt", "src")):
        for key in sorted(set(sides[side]) - set(sides[other])):
            skip("unmatched", sides[side][key])
    keys = sorted(set(sides["src"]) & set(sides["tgt"]))
    if not keys:
        raise ValueError(f"pairs:folder:{path}: no matching pairs (expected src/NAME.* with tgt/NAME.*, "
                         f"or NAME_src.* with NAME_tgt.*; {len(skipped)} unmatched image files)")

    # Header pass: the input's size follows its ratio to the target; pairs must agree on it.
    src_sizes: dict[str, int] = {}
    for key in keys:
        src_rel, tgt_rel = sides["src"][key], sides["tgt"][key]
        try:
            src_dims, tgt_dims = _header_size(root / src_rel), _header_size(root / tgt_rel)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            skip("unreadable", src_rel, tgt_rel)
            continue
        (s_short, s_long), (t_short, t_long) = sorted(src_dims), sorted(tgt_dims)
        if abs(s_long / s_short - t_long / t_short) > 1.0 / min(s_short, t_short) + 1e-9:
            skip("aspect_mismatch", src_rel, tgt_rel)
            continue
        src_sizes[key] = max(1, round(image_size * s_short / t_short))
    if not src_sizes:
        raise ValueError(f"pairs:folder:{path}: no readable pairs ({len(skipped)} files skipped)")
    src_size = Counter(src_sizes.values()).most_common(1)[0][0]  # ties: the first in name order
    good = []
    for key, size in src_sizes.items():
        if size == src_size:
            good.append(key)
        else:
            skip("size_ratio_mismatch", sides["src"][key], sides["tgt"][key])

    order = np.random.default_rng(seed).permutation(len(good))
    limit = num_samples or len(good)
    pairs = Images(3, image_size, None, min(limit, len(good)), [], None, skipped, reasons,
                   extra={"src_size": src_size, "layout": layout})

    def items():
        written = 0
        for i in order:
            if written >= limit:
                return
            src_rel, tgt_rel = sides["src"][good[i]], sides["tgt"][good[i]]
            try:
                src = _load(root / src_rel, src_size)
                tgt = _load(root / tgt_rel, image_size)
            except (BadSample, OSError):
                skip("unreadable", src_rel, tgt_rel)
                continue
            written += 1
            yield (src, tgt), None

    pairs.items = items()
    return pairs


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        width, height = image.size
    if width < 1 or height < 1 or width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"bad size {width}x{height}")
    return width, height


def _load(path: Path, size: int) -> Image.Image:
    """RGB, EXIF-upright, scaled to cover ``size`` and centre-cropped (raises BadSample / OSError)."""
    array = decode_image(path.read_bytes(), path.suffix[1:], 3, size, DEFAULT_MAX_PIXELS, exif_transpose=True)
    return Image.fromarray(array)
