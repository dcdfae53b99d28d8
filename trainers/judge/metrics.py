"""Distances between two sets of images, or between their feature vectors.

Pure functions: numpy (float64) or torch arrays in, Python floats out. Features come from
`trainers.judge.extractors` (random, domain or Inception); this module does not know which.

- Frechet distance (Heusel et al. 2017): `feature_stats`, `frechet_distance`,
  `frechet_distance_from_stats`.
- KID (Binkowski et al. 2018): `kid`, unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3 over random subsets, mean and std over subsets.
- Improved precision and recall (Kynkaanniemi et al. 2019): `precision_recall`.
- Density and coverage (Naeem et al. 2020): `density_coverage`; `prdc` gives all four from one
  pass over the distances.
- Per-image fidelity for paired outputs: `psnr`, `ssim` (Gaussian window, Wang et al. 2004).
- Class balance of generated samples under a domain classifier: `class_coverage`.

Which libraries, and why our own code for the rest:
- scipy (already a dependency through scikit-learn) for the matrix square root in the
  pytorch-fid compatible path (`method="sqrtm"`); numpy's `eigh` for the default path.
- torchmetrics, torch-fidelity and prdc compute the same quantities, but not as plain functions on
  two feature arrays with our subset control: torchmetrics' FID/KID are stateful modules that
  accumulate images through a feature network, and its KID draws subsets from torch's global RNG;
  torch-fidelity installs torchvision and is built around its own (downloaded) extractors; prdc
  holds the full N x N distance matrices in memory (10k x 10k x 3 in float64 is 2.4 GB). Each of
  these formulas is a few lines, so the library depends on none of them and downloads nothing.
  The tests check our numbers against torchmetrics and prdc where they are installed, and against
  plain brute-force references always.
- KID draws its subsets exactly as torch-fidelity does (`np.random.RandomState(seed)`, `choice`
  without replacement, features A then B, per subset) and reports the population std over subsets,
  so the same features and seed (torch-fidelity's default is 2020) give its
  `kernel_inception_distance_mean/std` (it computes in float32, we in float64). Unlike it, a
  subset_size above the sample counts is clipped to them instead of refused.

Frechet distance: ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The default
`method="eigh"` computes tr((S_a S_b)^(1/2)) as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (same spectrum as S_a S_b): no complex parts arise,
and rank-deficient covariances (fewer samples than dimensions) are handled. `method="sqrtm"` is
pytorch-fid's recipe (scipy.linalg.sqrtm, an eps offset if the result is not finite, tiny
imaginary parts dropped, large ones refused). From features with fewer samples than dimensions,
`frechet_distance` takes the same trace as the nuclear norm of the cross-Gram matrix of the
centred features ("gram"), which needs no D x D matrix at all.

Nearest-neighbour metrics compare squared Euclidean distances computed chunk by chunk
(`max_chunk_bytes`, 64 MiB by default), so 10k x 10k sets need tens of MB, not gigabytes. A point
on a ball's boundary counts as inside (<=, as in Kynkaanniemi et al.'s code; prdc uses <, which
differs only on exact ties).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

__all__ = [
    "feature_stats", "frechet_distance", "frechet_distance_from_stats", "kid", "kid_subsets",
    "precision_recall", "density_coverage", "prdc", "psnr", "ssim", "class_coverage",
]

DEFAULT_CHUNK_BYTES = 64 * 2**20


def _as_features(x, name: str = "features") -> np.ndarray:
    """(N, D) float64 numpy array from numpy or torch input."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


# ------------------------------------------------------------------------------------ Frechet


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64, covariance with ddof=1
    (as pytorch-fid's `np.cov(rowvar=False)`). Save these to compare against a reference set
    later without keeping its features."""
    x = _as_features(feats)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str, eps: float) -> float:
    """tr((sigma1 sigma2)^(1/2))."""
    if method == "eigh":
        s1h = _sqrt_psd(sigma1)
        m = s1h @ sigma2 @ s1h
        m = 0.5 * (m + m.T)
        ev = np.linalg.eigvalsh(m)
        return float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                worst = float(np.max(np.abs(covmean.imag)))
                raise ValueError(f"matrix square root has an imaginary component of {worst:.3g}; "
                                 "use method='eigh'")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise ValueError(f"unknown method {method!r}: 'auto', 'eigh', 'sqrtm' or 'gram'")


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
    `method="eigh"` (default) or `"sqrtm"` (pytorch-fid's; `eps` is its fallback offset). The
    result is clipped at 0 (a set against itself gives about -1e-12 by rounding)."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics shapes do not match: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2, method, eps)
    return max(float(value), 0.0)


def frechet_distance(feats_a, feats_b, method: str = "auto") -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D):
    FID when the features are the FID Inception's pool features.

    method "eigh" / "sqrtm": through `feature_stats` and `frechet_distance_from_stats`.
    method "gram": without D x D matrices, from the centred features A_a, A_b:
    tr((S_a S_b)^(1/2)) = ||A_a A_b^T||_* / sqrt((N_a - 1)(N_b - 1)) (nuclear norm: the singular
    values of the N_a x N_b cross-Gram matrix), exact and much cheaper when N < D.
    "auto" (default): "gram" when min(N_a, N_b) < D, else "eigh"."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _same_dim(a, b)
    if method == "auto":
        method = "gram" if min(len(a), len(b)) < a.shape[1] else "eigh"
    if method != "gram":
        return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b), method=method)
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 feature vectors per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    scale_a, scale_b = len(a) - 1, len(b) - 1
    diff = mu_a - mu_b
    tr_a, tr_b = np.einsum("ij,ij->", ac, ac) / scale_a, np.einsum("ij,ij->", bc, bc) / scale_b
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum()
    value = diff @ diff + tr_a + tr_b - 2.0 * nuclear / math.sqrt(scale_a * scale_b)
    return max(float(value), 0.0)


# ------------------------------------------------------------------------------------ KID


def kid_subsets(n_a: int, n_b: int, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """The (indices into A, indices into B) pairs `kid` uses: `subsets` pairs, each of
    min(subset_size, n_a, n_b) distinct indices, drawn as torch-fidelity draws them."""
    m = min(subset_size, n_a, n_b)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {n_a} and {n_b}")
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(subsets):
        ia = rng.choice(n_a, m, replace=False)
        ib = rng.choice(n_b, m, replace=False)
        out.append((ia, ib))
    return out


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) over `subsets` random subsets of the unbiased
    MMD^2 estimate with the polynomial kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D
    by default (Binkowski et al. 2018; torch-fidelity's defaults). Subsets hold
    min(subset_size, N_a, N_b) samples of each set (`kid_subsets`). The std is the population std
    over subsets (spread of the subset estimates, not a standard error). The mean can be slightly
    negative for sets from one distribution: it is unbiased, not clipped."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _same_dim(a, b)
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    values = np.array([_poly_mmd2_unbiased(a[ia], b[ib], degree, g, coef0)
                       for ia, ib in kid_subsets(len(a), len(b), subsets, subset_size, seed)])
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------- k-NN manifolds


def _row_chunk(n_cols: int, max_chunk_bytes: int) -> int:
    return max(1, int(max_chunk_bytes // (8 * max(n_cols, 1) * 3)))


def _sq_dists(a: np.ndarray, b: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    # A fresh copy of the chunk: numpy takes a different BLAS routine (syrk) for x @ x.T on one
    # buffer, whose rounding would differ from the real-vs-fake distances of the same points.
    d = np.array(a, copy=True) @ b.T
    d *= -2.0
    d += a2[:, None]
    d += b2[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _knn_sq_radii(x: np.ndarray, ks, max_chunk_bytes: int) -> list[np.ndarray]:
    """Squared distance from each point to its k-th nearest other point, for each k in ks."""
    n = x.shape[0]
    kmax = max(ks)
    if n <= kmax:
        raise ValueError(f"k={kmax} nearest neighbours need more than {kmax} samples, got {n}")
    x2 = np.einsum("ij,ij->i", x, x)
    out = [np.empty(n) for _ in ks]
    step = _row_chunk(n, max_chunk_bytes)
    for s in range(0, n, step):
        e = min(s + step, n)
        d = _sq_dists(x[s:e], x, x2[s:e], x2)
        d[np.arange(e - s), np.arange(s, e)] = np.inf
        part = np.partition(d, [k - 1 for k in sorted(set(ks))], axis=1)
        for i, k in enumerate(ks):
            out[i][s:e] = part[:, k - 1]
    return out


def prdc(real, fake, k_pr: int = 3, k_dc: int = 5, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Precision, recall (k=k_pr) and density, coverage (k=k_dc) in one pass.

    Manifolds are unions of balls around each sample, radius = distance to its k-th nearest
    neighbour in its own set (itself excluded).
    precision: fraction of fake samples inside the real manifold;
    recall: fraction of real samples inside the fake manifold (Kynkaanniemi et al. 2019);
    density: (1 / (k M)) * sum over fake samples of the number of real balls that hold it
    (can exceed 1); coverage: fraction of real samples whose ball holds at least one fake sample
    (Naeem et al. 2020)."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    _same_dim(r, f)
    r_pr, r_dc = _knn_sq_radii(r, [k_pr, k_dc], max_chunk_bytes)
    (f_pr,) = _knn_sq_radii(f, [k_pr], max_chunk_bytes)
    r2, f2 = np.einsum("ij,ij->i", r, r), np.einsum("ij,ij->i", f, f)
    n, m = len(r), len(f)
    in_real = np.zeros(m, dtype=bool)
    density_count = np.zeros(m)
    recall_hit = np.empty(n, dtype=bool)
    covered = np.empty(n, dtype=bool)
    step = _row_chunk(m, max_chunk_bytes)
    for s in range(0, n, step):
        e = min(s + step, n)
        d = _sq_dists(r[s:e], f, r2[s:e], f2)
        recall_hit[s:e] = (d <= f_pr[None, :]).any(axis=1)
        in_real |= (d <= r_pr[s:e, None]).any(axis=0)
        inside_dc = d <= r_dc[s:e, None]
        density_count += inside_dc.sum(axis=0)
        covered[s:e] = inside_dc.any(axis=1)
    return {"precision": float(in_real.mean()), "recall": float(recall_hit.mean()),
            "density": float(density_count.sum() / (k_dc * m)), "coverage": float(covered.mean())}


def precision_recall(real, fake, k: int = 3, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds: (precision,
    recall). Precision is the share of fake samples that look real (fidelity); recall the share of
    real samples the generator can reach (diversity). See `prdc`."""
    out = prdc(real, fake, k_pr=k, k_dc=k, max_chunk_bytes=max_chunk_bytes)
    return out["precision"], out["recall"]


def density_coverage(real, fake, k: int = 5, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020): (density, coverage). Both use only the real
    manifold, so they are robust to outliers among the fake samples. See `prdc`."""
    out = prdc(real, fake, k_pr=k, k_dc=k, max_chunk_bytes=max_chunk_bytes)
    return out["density"], out["coverage"]


# ------------------------------------------------------------------------ image fidelity


def _as_unit_images(x, name: str) -> torch.Tensor:
    """NCHW float64 tensor in [0, 1] from uint8 (0..255) or float ([0, 1]) numpy/torch input."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach().cpu()
    if t.ndim != 4:
        raise ValueError(f"{name} must be NCHW, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.to(torch.float64) / 255.0
    if not t.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got {t.dtype}")
    return t.to(torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_unit_images(a, "a"), _as_unit_images(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def _reduce(values: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(values.mean())
    if reduction == "none":
        return values.numpy()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(a, b, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE) with intensities in [0, 1], computed per
    image (over C, H, W) and averaged over the batch (`reduction="none"`: the per-image array).
    Identical images give inf. Inputs: NCHW, uint8 or float in [0, 1], same shape."""
    x, y = _pair(a, b)
    mse = (x - y).square().flatten(1).mean(1)
    values = 10.0 * torch.log10(1.0 / mse)
    return _reduce(values, reduction)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-coords.square() / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a, b, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, dynamic range 1, 'valid' filtering (no padding), as in the reference
    MATLAB code and scikit-image's `gaussian_weights=True, use_sample_covariance=False`.
    Colour images: the SSIM map of each channel, averaged with the others. Per image, averaged
    over the batch (`reduction="none"`: the per-image array). Images smaller than the window use
    the largest odd window that fits. Inputs: NCHW, uint8 or float in [0, 1], same shape."""
    x, y = _pair(a, b)
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2
    if size < 1:
        raise ValueError(f"images of {h}x{w} are too small for SSIM")
    g = _gaussian_window(size, sigma)
    kh = g.view(1, 1, size, 1).expand(c, 1, size, 1)
    kw = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return _reduce(smap.flatten(1).mean(1), reduction)


# ------------------------------------------------------------------------- class balance


def class_coverage(fake_pred, real_labels, num_classes: int | None = None, min_share: float = 0.5) -> dict:
    """Class balance of generated samples, from a domain classifier's predictions on them.

    class_coverage: fraction of the classes present among the real labels whose share of the fake
    predictions is at least `min_share` times their share of the real labels (so a classifier's
    scattered mistakes do not count as covering a class the generator dropped);
    classes_seen: fraction of those classes predicted for at least one fake sample (the "modes
    covered" count of stacked-MNIST studies, which such mistakes inflate);
    class_tv: total variation distance between the real label frequencies and the fake predicted
    frequencies (0 = same balance, 1 = disjoint); fake_class_counts: predicted counts per class."""
    pred = np.asarray(fake_pred, dtype=np.int64).reshape(-1)
    labels = np.asarray(real_labels, dtype=np.int64).reshape(-1)
    if pred.size == 0 or labels.size == 0:
        raise ValueError("class_coverage needs predictions and labels")
    k = int(num_classes if num_classes is not None else max(pred.max(), labels.max()) + 1)
    fake_counts = np.bincount(pred, minlength=k)[:k]
    real_counts = np.bincount(labels, minlength=k)[:k]
    fake_share, real_share = fake_counts / fake_counts.sum(), real_counts / real_counts.sum()
    present = real_counts > 0
    tv = 0.5 * np.abs(fake_share - real_share).sum()
    return {"class_coverage": float((fake_share[present] >= min_share * real_share[present]).mean()),
            "classes_seen": float((fake_counts[present] > 0).mean()), "class_tv": float(tv),
            "fake_class_counts": [int(v) for v in fake_counts]}
