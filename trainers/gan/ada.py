"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data").

Every image shown to the discriminator, real or generated, in the D and the G phase, goes through
the same pipeline; each op is applied to each sample independently with probability p:

    xflip        mirror left-right
    translate    integer shift of up to max_translate (1/8) of the side in x and y,
                 reflection ('reflect') or zero ('zeros') padding
    rotate90     rotation by a random multiple of 90 degrees
    brightness   add N(0, brightness_std^2) (0.2)
    contrast     scale by 2^N(0, contrast_std^2) (0.5) around 0, mid-grey in [-1, 1]
    saturation   scale the chroma (the part orthogonal to the luma axis) by 2^N(0, saturation_std^2) (1), RGB only
    hue          rotate the chroma around the luma axis by U(-hue_max, hue_max) x pi, RGB only
    cutout       zero (mid-grey) a square of cutout_size (1/2) of the side, centre uniform

Colour ops compose one 3x4 affine colour matrix per sample, as in the reference; every op is a
differentiable function of the images (gathers, where, matmul), so D's gradient reaches G
through it. Samples an op does not select keep their values bit for bit, and p = 0 returns the
input itself. Random draws come only from the caller's torch.Generator: the same generator
state gives the same output, so a resumed run augments exactly as the uninterrupted one.

p starts at 0 and is tuned from the overfitting heuristic r_t = E[sign(D(real))]: every
`interval` steps, p += sign(r_t - target) x (images seen over the interval) / (ada_kimg x 1000),
clamped to [0, max_p] (so p can go from 0 to 1 in ada_kimg thousand images; max_p, 1 by default,
caps it). The caller feeds each step's sum of sign(D(real)) and its sample count, already
all-reduced over ranks (use `sign_stats` to make the tensor to all-reduce), so every rank holds
the same p.

The heuristic reads sign(D(real)) as "D calls this real right", which holds where the loss pins
D's decision at 0 (nonsaturating, hinge). The relativistic pairing loss sees only D(real) -
D(fake): its D may shift every logit by a constant at no cost, and R3GAN's did (both means drifted
up, the fake one past 0, so r_t read 0.7 and p climbed to 0.2-0.37 while the real-fake gap
shrank). There the statistic is that pair margin, the loss's own "right" (`ada_margins`).
"""
from __future__ import annotations

import math

import torch

from configs.checks import ADA_OPS as OPS
from configs.checks import parse_ops

COLOR_OPS = ("brightness", "contrast", "saturation", "hue")
PAD_MODES = ("reflect", "zeros")


def ada_margins(real_logits: torch.Tensor, fake_logits: torch.Tensor, relativistic: bool) -> torch.Tensor:
    """What ADA's r_t takes the sign of: D(real), or for a relativistic loss D(real) - D(fake) of
    each pair the loss scores (invariant to a constant shift of D's output, as that loss is)."""
    return real_logits - fake_logits if relativistic else real_logits


def sign_stats(margins: torch.Tensor) -> torch.Tensor:
    """[sum of sign(margins), number of samples] as one float64 tensor, ready to all-reduce (sum);
    the margins are D(real) or the relativistic pair margins, as `ada_margins` gives them."""
    values = margins.detach().flatten()
    return torch.stack([torch.sign(values.double()).sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                        device=values.device)])


class AdaptiveAugment:
    """The ADA pipeline and its probability controller. `aug(x, generator)` augments a batch."""

    def __init__(self, target: float = 0.6, ada_kimg: float = 500.0, interval: int = 4, p: float = 0.0,
                 ops: tuple[str, ...] = OPS, pad_mode: str = "reflect", max_translate: float = 0.125,
                 brightness_std: float = 0.2, contrast_std: float = 0.5, saturation_std: float = 1.0,
                 hue_max: float = 1.0, cutout_size: float = 0.5, max_p: float = 1.0):
        bad = [op for op in ops if op not in OPS]
        if bad:
            raise ValueError(f"unknown ADA op {bad[0]!r}; choose from {', '.join(OPS)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, not {pad_mode!r}")
        if interval < 1 or ada_kimg <= 0 or not 0 < max_p <= 1:
            raise ValueError("ADA needs interval >= 1, ada_kimg > 0 and 0 < max_p <= 1")
        self.target, self.ada_kimg, self.interval = float(target), float(ada_kimg), int(interval)
        self.ops, self.pad_mode, self.max_translate = tuple(op for op in OPS if op in ops), pad_mode, max_translate
        self.brightness_std, self.contrast_std = brightness_std, contrast_std
        self.saturation_std, self.hue_max, self.cutout_size = saturation_std, hue_max, cutout_size
        self.max_p = float(max_p)
        self.p = float(min(max(p, 0.0), self.max_p))
        self.rt: float | None = None  # r_t of the last completed interval (for logging)
        self._reset_accumulator()

    @classmethod
    def from_config(cls, loss) -> AdaptiveAugment | None:
        """The controller a config's `loss` section asks for, or None where ADA is off (ada_target 0)."""
        if loss.ada_target <= 0:
            return None
        return cls(loss.ada_target, loss.ada_kimg, loss.ada_interval, ops=parse_ops(loss.ada_ops, "loss.ada_ops", OPS),
                   max_p=loss.ada_max_p)

    # ----------------------------------------------------------------------------- controller

    def _reset_accumulator(self) -> None:
        self._sign_sum, self._count, self._images, self._steps = 0.0, 0.0, 0, 0

    def accumulate(self, sign_sum: float, count: float, images: int | None = None) -> float | None:
        """Add one step's (all-reduced) sum of sign(D(real)) over `count` real samples; `images`
        real images seen this step by all ranks (defaults to count). Every `interval` calls, p is
        adjusted and that interval's r_t returned; otherwise None."""
        self._sign_sum += float(sign_sum)
        self._count += float(count)
        self._images += int(count if images is None else images)
        self._steps += 1
        if self._steps < self.interval:
            return None
        rt = self._sign_sum / max(self._count, 1.0)
        self.update(rt, self._images)
        self._reset_accumulator()
        return rt

    def update(self, rt: float, images: int) -> float:
        """Adjust p from an (all-reduced) r_t measured over `images` images; returns the new p."""
        self.rt = float(rt)
        step = math.copysign(1.0, self.rt - self.target) if self.rt != self.target else 0.0
        self.p = float(min(max(self.p + step * images / (self.ada_kimg * 1000.0), 0.0), self.max_p))
        return self.p

    def state(self) -> dict:
        return {"p": self.p, "rt": self.rt, "sign_sum": self._sign_sum, "count": self._count,
                "images": self._images, "steps": self._steps}

    def load_state(self, state: dict) -> None:
        # Clamped: a run resumed with a lower max_p than it trained with starts at the cap, not above it.
        self.p, self.rt = min(float(state["p"]), self.max_p), state.get("rt")
        self._sign_sum, self._count = float(state["sign_sum"]), float(state["count"])
        self._images, self._steps = int(state["images"]), int(state["steps"])

    # ----------------------------------------------------------------------------- pipeline

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment(x, self.p, generator, self)


def _draw(gen, b, device, kind="rand"):
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(b, generator=gen, device=device)


def _gather_hw(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] (differentiable in x)."""
    b, c, h, w = x.shape
    x = torch.gather(x, 2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return torch.gather(x, 3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) without repeating the edge (numpy/torch 'reflect')."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def _luma_axis(device, dtype) -> torch.Tensor:
    return torch.full((3,), 1.0 / math.sqrt(3.0), device=device, dtype=dtype)


def augment(x: torch.Tensor, p: float, gen: torch.Generator | None, cfg: AdaptiveAugment) -> torch.Tensor:
    """The ADA pipeline on a batch (B, C, H, W) in [-1, 1] with per-op probability p."""
    if p <= 0 or not cfg.ops:
        return x
    b, ch, h, w = x.shape
    dev = x.device

    def chosen() -> torch.Tensor:
        return _draw(gen, b, dev) < p

    ops = cfg.ops
    if "xflip" in ops:
        x = _select(chosen(), x.flip(3), x)
    if "translate" in ops:
        m = chosen()
        tx = torch.round((_draw(gen, b, dev) * 2 - 1) * cfg.max_translate * w).long() * m
        ty = torch.round((_draw(gen, b, dev) * 2 - 1) * cfg.max_translate * h).long() * m
        rows = torch.arange(h, device=dev).view(1, h) - ty.view(b, 1)
        cols = torch.arange(w, device=dev).view(1, w) - tx.view(b, 1)
        if cfg.pad_mode == "reflect":
            moved = _gather_hw(x, _reflect(rows, h), _reflect(cols, w))
        else:
            inside = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
            moved = _gather_hw(x, rows.clamp(0, h - 1), cols.clamp(0, w - 1)) * inside.to(x.dtype)
        x = _select(m, moved, x)
    if "rotate90" in ops:
        m = chosen()
        k = torch.floor(_draw(gen, b, dev) * 4).clamp(max=3).long()
        if h == w:
            out = x
            for turns in (1, 2, 3):
                out = _select(m & (k == turns), torch.rot90(x, turns, dims=(2, 3)), out)
            x = out
    color = [op for op in ops if op in COLOR_OPS and (ch == 3 or op in ("brightness", "contrast"))]
    if color:
        mat = torch.eye(4, device=dev).repeat(b, 1, 1)  # per-sample homogeneous colour transform
        any_color = torch.zeros(b, dtype=torch.bool, device=dev)
        for op in color:
            m = chosen()
            any_color |= m
            t = torch.eye(4, device=dev).repeat(b, 1, 1)
            if op == "brightness":
                t[:, :3, 3] = (_draw(gen, b, dev, "randn") * cfg.brightness_std * m).unsqueeze(1)
            elif op == "contrast":
                s = torch.where(m, torch.exp2(_draw(gen, b, dev, "randn") * cfg.contrast_std),
                                torch.ones(b, device=dev))
                t[:, :3, :3] *= s.view(b, 1, 1)
            else:
                v = _luma_axis(dev, torch.float32)
                vv = torch.outer(v, v)
                if op == "saturation":
                    s = torch.where(m, torch.exp2(_draw(gen, b, dev, "randn") * cfg.saturation_std),
                                    torch.ones(b, device=dev))
                    t[:, :3, :3] = vv + (torch.eye(3, device=dev) - vv) * s.view(b, 1, 1)
                else:  # hue: rotation around the luma axis (Rodrigues)
                    theta = (_draw(gen, b, dev) * 2 - 1) * math.pi * cfg.hue_max * m
                    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=dev)
                    cross = cross / math.sqrt(3.0)  # [v]_x, the cross-product matrix of the luma axis
                    cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
                    t[:, :3, :3] = cos * torch.eye(3, device=dev) + sin * cross + (1 - cos) * vv
            mat = t @ mat
        if ch == 3:
            y = torch.einsum("bij,bjhw->bihw", mat[:, :3, :3].to(x.dtype), x)
            y = y + mat[:, :3, 3].to(x.dtype).view(b, 3, 1, 1)
        else:  # grey: brightness and contrast only (the matrix is then s * I + t)
            y = x * mat[:, 0, 0].to(x.dtype).view(b, 1, 1, 1) + mat[:, 0, 3].to(x.dtype).view(b, 1, 1, 1)
        x = _select(any_color, y, x)
    if "cutout" in ops:
        m = chosen()
        cx, cy = _draw(gen, b, dev), _draw(gen, b, dev)
        gx = (torch.arange(w, device=dev) + 0.5) / w
        gy = (torch.arange(h, device=dev) + 0.5) / h
        outside_x = (gx.view(1, w) - cx.view(b, 1)).abs() >= cfg.cutout_size / 2
        outside_y = (gy.view(1, h) - cy.view(b, 1)).abs() >= cfg.cutout_size / 2
        keep = outside_y.view(b, 1, h, 1) | outside_x.view(b, 1, 1, w)
        x = _select(m, x * keep.to(x.dtype), x)
    return x
