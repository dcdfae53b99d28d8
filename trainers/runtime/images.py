"""Sample grids: tensors in [-1, 1] or [0, 1] to uint8 images and tiled PNGs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images_bchw: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Float images in value_range -> uint8 array (B, H, W, C)."""
    lo, hi = value_range
    x = (images_bchw.detach().float().cpu() - lo) / (hi - lo)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images_bhwc: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (B, H, W, C) into one (H', W', C) image with `pad` pixels of gap."""
    b, h, w, c = images_bhwc.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images_bhwc):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(image_hwc: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, C) image; grayscale is stored as a one-channel PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    Image.fromarray(arr).save(path)
    return path


def scatter_plot(points_n2: np.ndarray, size: int = 256, extent: float | None = None) -> np.ndarray:
    """Render 2-D points as a small uint8 image (no plotting library needed)."""
    extent = extent or float(np.abs(points_n2).max() * 1.1 + 1e-6)
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    ij = ((points_n2 / extent + 1) / 2 * (size - 1)).round().astype(int)
    keep = (ij >= 0).all(1) & (ij < size).all(1)
    img[size - 1 - ij[keep, 1], ij[keep, 0]] = (30, 60, 200)
    return img
