"""Apply a paired run's generator to any images: `gentrain translate RUN_DIR --in DIR_OR_FILE --out DIR`.

The EMA generator (the plain one if the run has no EMA) is built from the run's config.yaml and
the fp32 `weights.safetensors` of its latest complete checkpoint: no DeepSpeed, nothing pickled.

Any size: an image whose sides both fit in `tile` input pixels runs whole (padded to the
network's size multiple and cropped back); a larger one runs in overlapping tiles of
`tile` x `tile` input pixels, `overlap` apart, blended: each tile's weight is 0 within
overlap/4 of an inner edge (where it lacks context), rises linearly across the next overlap/2
and is 1 beyond. Tiles touching the image's border are not padded there. A network whose receptive
field is smaller than overlap/4 (such as a small RRDB net) therefore gives the untiled result;
a U-Net (global context, per-tile normalisation) gives seam-free but not identical outputs.

Output files keep the input's name (and format: PNG in, PNG out; JPEG in, JPEG out), `scale`
times larger on each side.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from configs import ConfigError
from trainers.judge.inference import latest_checkpoint, load_run_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_TILE = 256


def load_translator(run_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """(the EMA generator in eval mode, the run's config) of a paired run's latest checkpoint."""
    cfg = load_run_config(run_dir)
    if cfg.kind != "paired":
        raise ConfigError(f"{run_dir} is not a paired run (kind: {cfg.kind}): translate needs a run trained with "
                          f"kind: paired (e.g. configs/sr4_photos.yaml, configs/edges2photo.yaml)")
    import models

    weights = load_file(str(latest_checkpoint(run_dir) / "weights.safetensors"))
    generator, _ = models.build("paired", cfg.model, cfg.data)
    state = {k[len("g_ema."):]: v for k, v in weights.items() if k.startswith("g_ema.")} or \
        {k[len("g."):]: v for k, v in weights.items() if k.startswith("g.")}
    generator.load_state_dict(state)
    return generator.float().eval().requires_grad_(False), cfg


def find_images(path: str | Path) -> list[Path]:
    """A PNG/JPEG file, or every PNG/JPEG under a directory (recursively, sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--in {path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"--in {path}: not a PNG or JPEG file")
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ConfigError(f"--in {path}: no PNG or JPEG images found")
    return found


def read_image(path: Path, channels: int) -> torch.Tensor:
    """(1, C, H, W) float in [-1, 1], converted to the model's channels (alpha dropped)."""
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def write_image(image_1chw: torch.Tensor, path: Path) -> Path:
    array = ((image_1chw[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)
    return path


def _run_whole(net: torch.nn.Module, x: torch.Tensor, scale: int) -> torch.Tensor:
    """net(x) for any size: padded (reflect, else replicate) to the network's size multiple, cropped back."""
    need = max(int(getattr(net, "size_multiple", 1)), 1)
    h, w = x.shape[-2:]
    ph, pw = (-h) % need, (-w) % need
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    out = net(x)
    return out[..., : h * scale, : w * scale]


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: every `stride`, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D weights of one tile side: 0 for overlap/4 from an inner edge, linear up over overlap/2, then 1."""
    weight = torch.ones(length, dtype=torch.float64)
    dead, rise = overlap / 4.0, max(overlap / 2.0, 1e-9)
    d = torch.arange(length, dtype=torch.float64) + 0.5
    if lead:
        weight = torch.minimum(weight, ((d - dead) / rise).clamp(0, 1))
    if trail:
        weight = torch.minimum(weight, ((length - d - dead) / rise).clamp(0, 1))
    return weight.clamp_min(1e-6)  # every output pixel keeps some weight, even in a 1-tile-wide strip


@torch.no_grad()
def translate_tensor(net: torch.nn.Module, x: torch.Tensor, scale: int, tile: int = DEFAULT_TILE,
                     overlap: int | None = None) -> torch.Tensor:
    """The generator applied to one (1, C, H, W) image in [-1, 1], tiled when a side exceeds `tile`."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return _run_whole(net, x, scale)
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ConfigError(f"--overlap {overlap} must be >= 0 and smaller than --tile {tile}")
    stride = tile - overlap
    out = None
    weight_sum = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float64)
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    for y in ys:
        th = min(tile, h)
        wy = _ramp(th * scale, overlap * scale, lead=y > 0, trail=y + th < h)
        for x0 in xs:
            tw = min(tile, w)
            wx = _ramp(tw * scale, overlap * scale, lead=x0 > 0, trail=x0 + tw < w)
            piece = _run_whole(net, x[..., y:y + th, x0:x0 + tw], scale).double()
            if out is None:
                out = torch.zeros(1, piece.shape[1], h * scale, w * scale, dtype=torch.float64)
            weight = wy[:, None] * wx[None, :]
            out[..., y * scale:(y + th) * scale, x0 * scale:(x0 + tw) * scale] += piece * weight
            weight_sum[..., y * scale:(y + th) * scale, x0 * scale:(x0 + tw) * scale] += weight
    return (out / weight_sum).float()


def translate_path(run_dir: str | Path, inp: str | Path, out_dir: str | Path, tile: int = DEFAULT_TILE,
                   overlap: int | None = None, progress: bool = True) -> tuple[list[Path], int]:
    """Translate every image of `inp` into `out_dir` (same names, relative paths kept for a
    directory); returns (the files written, the model's scale)."""
    if tile < 8:
        raise ConfigError(f"--tile {tile} is too small; use 8 or more input pixels (default {DEFAULT_TILE})")
    images = find_images(inp)
    net, cfg = load_translator(run_dir)
    scale, channels = int(cfg.model.scale), int(cfg.data.channels)
    root = Path(inp) if Path(inp).is_dir() else Path(inp).parent
    out_dir = Path(out_dir)
    written = []
    from tqdm import tqdm

    unreadable = []
    for path in tqdm(images, unit="img", disable=not progress, desc="translate"):
        try:
            x = read_image(path, channels)
        except (OSError, ValueError) as err:  # not an image after all, truncated, ...: say so, go on
            unreadable.append(path)
            print(f"gentrain: warning: skipped {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                  file=sys.stderr, flush=True)
            continue
        result = translate_tensor(net, x, scale, tile, overlap)
        written.append(write_image(result, out_dir / path.relative_to(root)))
    if not written:
        raise ConfigError(f"--in {inp}: none of the {len(images)} image file(s) could be read")
    return written, scale
