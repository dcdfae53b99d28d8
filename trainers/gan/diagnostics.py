"""Collapse diagnostics for GAN training: diversity, mode coverage, and the collapse alert.

Three families of numbers, as the mode-collapse literature measures them:

- Discriminator health (computed in trainers.gan.task every step, they are free): mean real and fake
  logits, r_t = E[sign(D(x_real))] (the StyleGAN2-ADA overfitting heuristic: near 1 means D
  separates every real sample), gradient norms of G and D.
- Diversity (:func:`diversity`): mean pairwise L2 distance within a generated batch over the
  same within the real batch, and the near-duplicate rate (pairs closer than a fraction of the
  real batch's mean pairwise distance), for generated and, as the reference, real data.
- Mode coverage (:func:`make_coverage_scorer`), chosen from the shards' manifest:
  2-D mixtures (ring8, grid25): modes captured and high-quality fraction (the VEEGAN/PacGAN
  protocol: a sample is high quality within 3 std of a mode; a mode is captured with >= 1
  such sample); stacked-digits: each channel classified by a digit probe, 1,000 modes, KL to
  uniform; other labelled images: trainers.judge.probe.ClassProbe, classes covered and KL to the
  real class frequencies.

:class:`CollapseMonitor` turns these into an alert: a line on stdout saying why (rank 0, once
per collapse episode) and the metric `alert/collapse` (1 while collapsed, 0 otherwise, at every
diagnostic); the training loop turns any `alert/*` > 0 into its own log line and `wandb.alert`
(trainers.loop.raise_alerts; W&B offline cannot alert, the line and the metric remain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

HQ_STDS = 3.0  # VEEGAN/PacGAN: high quality = within 3 standard deviations of a mode


# ---------------------------------------------------------------------------- diversity


def _mean_pairwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean off-diagonal pairwise L2 distance, the distances of the i<j pairs)."""
    x = x.detach().float().flatten(1)
    d = torch.cdist(x, x)
    iu = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    pairs = d[iu[0], iu[1]]
    return pairs.mean(), pairs


@torch.no_grad()
def diversity(fake: torch.Tensor, real: torch.Tensor, near_duplicate: float) -> dict[str, float]:
    """Diversity of a generated batch against a real batch (same preprocessing, any shape [B, ...])."""
    real_mean, real_pairs = _mean_pairwise(real)
    fake_mean, fake_pairs = _mean_pairwise(fake)
    threshold = near_duplicate * real_mean
    return {
        "diag/diversity": float(fake_mean / real_mean.clamp_min(1e-12)),
        "diag/near_duplicates": float((fake_pairs < threshold).float().mean()),
        "diag/near_duplicates_real": float((real_pairs < threshold).float().mean()),
    }


def expected_distinct(num_modes: int, n: int) -> float:
    """Modes that n samples drawn uniformly over num_modes modes hit on average."""
    return num_modes * (1.0 - (1.0 - 1.0 / num_modes) ** n)


# ---------------------------------------------------------------------------- coverage


class PointModes:
    """Mode coverage of 2-D samples from a known Gaussian mixture (ring8, grid25).

    Two radii: the protocol's "high quality" (3 std) for `modes` and `high_quality`, and a
    coarse one (a quarter of the distance between neighbouring modes) for `coverage`, the
    collapse signal: a young generator spreading over every mode is not collapsed even while
    its samples are not yet sharp, and a blob between modes covers none.
    """

    kind = "points"

    def __init__(self, source: str):
        from data_shards.build import MODE_STD, mode_centers

        self.source = source
        self.centers = mode_centers(source)
        self.std = MODE_STD[source]
        gaps = np.linalg.norm(self.centers[:, None] - self.centers[None], axis=2)
        self.coarse_radius = 0.25 * gaps[gaps > 0].min()

    def score(self, points_n2: np.ndarray) -> dict[str, float]:
        points = np.asarray(points_n2, dtype=np.float64)
        d = np.linalg.norm(points[:, None, :] - self.centers[None], axis=2)
        nearest, dist = d.argmin(1), d.min(1)
        k = len(self.centers)
        hq = dist <= HQ_STDS * self.std
        counts = np.bincount(nearest[hq], minlength=k)
        coarse = np.bincount(nearest[dist <= self.coarse_radius], minlength=k)
        freq = counts / max(counts.sum(), 1)
        kl = float(np.sum(freq * (np.log(freq + 1e-10) - np.log(1.0 / k)))) if counts.sum() else float("nan")
        return {"modes": float((counts > 0).sum()), "num_modes": float(k), "high_quality": float(hq.mean()),
                "kl_to_real": kl, "modes_coarse": float((coarse > 0).sum()),
                "coverage": float((coarse > 0).sum() / expected_distinct(k, len(points)))}


class StackedDigitsProbe:
    """Stacked-MNIST modes: a 10-class digit probe classifies each of the 3 channels.

    The probe is fitted on single channels of the stacked shards themselves (channel c of a
    sample with label 100a + 10b + c' carries digit a, b or c'), so no other data is needed.
    """

    kind = "stacked"
    num_modes = 1000

    def __init__(self, shards, image_size: int, max_images: int = 4000, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        from trainers.judge.probe import _features, read_labelled_images

        images, labels = read_labelled_images(shards, image_size, 3)
        images, labels = images[:max_images], labels[:max_images]
        digits = np.stack([labels // 100, labels // 10 % 10, labels % 10], 1)  # [N, 3]
        x = images.reshape(-1, 1, image_size, image_size)  # channel-major per sample
        y = digits.reshape(-1)
        order = np.random.default_rng(seed).permutation(len(x))
        split = int(0.8 * len(order))
        self._features = _features
        self.model = LogisticRegression(max_iter=1000, C=0.5)
        self.model.fit(_features(x[order[:split]]), y[order[:split]])
        self.held_out_accuracy = float(self.model.score(_features(x[order[split:]]), y[order[split:]]))

    def modes_of(self, images_nchw: np.ndarray) -> np.ndarray:
        n, c, h, w = images_nchw.shape
        digits = self.model.predict(self._features(images_nchw.reshape(n * c, 1, h, w))).reshape(n, c)
        return digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]

    def score(self, images_nchw: np.ndarray) -> dict[str, float]:
        counts = np.bincount(self.modes_of(images_nchw), minlength=self.num_modes)
        freq = counts / counts.sum()
        kl = float(np.sum(freq * (np.log(freq + 1e-12) - np.log(1.0 / self.num_modes))))
        covered = int((counts > 0).sum())
        return {"modes": float(covered), "num_modes": float(self.num_modes), "kl_to_real": kl,
                "coverage": covered / expected_distinct(self.num_modes, len(images_nchw))}


class LabelledImages:
    """Classes of generated images by trainers.judge.probe.ClassProbe, fitted on the real shards."""

    kind = "classes"

    def __init__(self, shards, image_size: int, channels: int):
        from trainers.judge.probe import ClassProbe

        self.probe = ClassProbe(shards, image_size, channels)

    def score(self, images_nchw: np.ndarray) -> dict[str, float]:
        cov = self.probe.coverage(images_nchw)
        return {"modes": float(cov.covered), "num_modes": float(cov.num_classes), "kl_to_real": cov.kl_to_real,
                "confident": cov.confident_fraction,
                "coverage": cov.covered / expected_distinct(cov.num_classes, len(images_nchw))}


COVERAGE_KEYS = {"points": ("modes", "num_modes", "high_quality", "kl_to_real", "modes_coarse", "coverage"),
                 "stacked": ("modes", "num_modes", "kl_to_real", "coverage"),
                 "classes": ("modes", "num_modes", "kl_to_real", "confident", "coverage")}


def coverage_kind(cfg) -> str | None:
    """Which coverage scorer the run's shards allow (cheap: reads manifest.json only)."""
    from data_shards.stream import find_manifest

    try:
        manifest = find_manifest(cfg.data.shards) or {}
    except (OSError, ValueError):
        return None
    source = manifest.get("source")
    if source in ("ring8", "grid25"):
        return "points"
    if source == "stacked-digits":
        return "stacked"
    if manifest.get("kind") == "image" and manifest.get("num_classes"):
        return "classes"
    return None


def make_coverage_scorer(cfg, kind: str):
    """Build (fit) the scorer for `kind`; call on rank 0 only, it reads the shards."""
    if kind == "points":
        from data_shards.stream import find_manifest

        return PointModes(find_manifest(cfg.data.shards)["source"])
    if kind == "stacked":
        return StackedDigitsProbe(cfg.data.shards, cfg.data.image_size)
    return LabelledImages(cfg.data.shards, cfg.data.image_size, cfg.data.channels)


def images_to_uint8_nchw(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------- alert


@dataclass
class CollapseMonitor:
    """Decides, from the diagnostics, whether the run has collapsed; prints why once per episode."""

    min_coverage: float
    min_diversity: float
    after_steps: int
    patience: int
    is_main: bool
    bad_in_row: int = 0
    firing: bool = False

    def reasons(self, values: dict[str, float]) -> list[str]:
        out = []
        cov = values.get("diag/coverage")
        if cov is not None and math.isfinite(cov) and cov < self.min_coverage:
            covered = values.get("diag/modes_coarse", values["diag/modes"])
            out.append(f"modes covered {covered:.0f}/{values['diag/num_modes']:.0f} "
                       f"(coverage {cov:.2f} < {self.min_coverage})")
        div = values.get("diag/diversity")
        if div is not None and math.isfinite(div) and div < self.min_diversity:
            out.append(f"diversity {div:.3f} < {self.min_diversity} (generated/real mean pairwise distance)")
        return out

    def update(self, step: int, values: dict[str, float], run_name: str = "") -> float:
        """Feed one diagnostic (identical on every rank); returns the `alert/collapse` value."""
        reasons = self.reasons(values)
        self.bad_in_row = self.bad_in_row + 1 if reasons else 0
        collapsed = step >= self.after_steps and self.bad_in_row >= self.patience
        if collapsed and not self.firing and self.is_main:
            text = f"step {step}: " + "; ".join(reasons)
            print(f"[gentrain] ALERT: mode collapse in run '{run_name}' at {text}", flush=True)
        if not collapsed and self.firing and self.is_main:
            print(f"[gentrain] collapse alert cleared at step {step}", flush=True)
        self.firing = collapsed
        return 1.0 if collapsed else 0.0

