"""``folder:PATH``: any tree of images; first-level sub-folders are the classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_shards.decode import DEFAULT_MAX_PIXELS, BadSample, decode_image
from data_shards.sources.base import Images

FOLDER_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})


def image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), relative to it, in sorted order."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())


def folder_images(path: str, image_size: int, seed: int, num_samples: int | None) -> Images:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder:{path}: not a directory")
    files = image_files(root)
    if not files:
        raise ValueError(f"folder:{path}: no images found (looked for {', '.join(sorted(FOLDER_EXTENSIONS))})")
    # Labelled only when every image sits in a first-level subfolder (ImageFolder layout);
    # a mix of loose and foldered images is treated as unlabelled rather than guessed at.
    labelled = all(len(f.parts) >= 2 for f in files)
    classes = sorted({f.parts[0] for f in files}) if labelled else None
    class_index = {name: i for i, name in enumerate(classes or [])}
    order = np.random.default_rng(seed).permutation(len(files))
    limit = num_samples or len(files)
    images = Images(3, image_size, len(classes) if classes else None, min(limit, len(files)), [], classes)

    def items():
        written = 0
        for i in order:
            if written >= limit:
                return
            rel = files[i]
            image = load_image(root / rel, image_size)
            if image is None:
                images.skipped_files.append(rel.as_posix())
                images.skip_reasons["unreadable"] += 1
                continue
            written += 1
            yield image, class_index[rel.parts[0]] if labelled else None

    images.items = items()
    return images


def load_image(path: Path, image_size: int) -> Image.Image | None:
    """RGB, EXIF-upright, shorter side scaled to ``image_size``, centre-cropped; None if unreadable."""
    try:
        data = path.read_bytes()
        array = decode_image(data, path.suffix[1:], 3, image_size, DEFAULT_MAX_PIXELS, exif_transpose=True)
    except (BadSample, OSError):
        return None
    return Image.fromarray(array)
