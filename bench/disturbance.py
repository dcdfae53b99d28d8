"""Do the set metrics rise as real images are disturbed more? (Heusel et al. 2017, section 4)

Real images built at run time from data shipped inside installed wheels: scikit-learn's
`load_digits` upsampled to 32x32 (grey) and 32x32 crops of `load_sample_images` (RGB). One half
of the real set is the reference; the other half is disturbed at rising strength (Gaussian noise,
Gaussian blur, salt and pepper, dropped patches), and FD and KID are measured against the
reference with each extractor (random; domain, fitted on the digits left out of both halves).

    python -m bench.disturbance [--n 600] [--extractors random,domain] [--inception PATH]

prints a markdown table. The same builders and disturbances are used by tests/test_metrics.py.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

# Strength levels per disturbance; level 0 (undisturbed) is added in front.
LEVELS = {
    "noise": (0.05, 0.1, 0.2, 0.4),        # std of additive Gaussian noise, fraction of 255
    "blur": (0.5, 1.0, 2.0, 3.0),          # Gaussian blur sigma, pixels at 32x32
    "salt_pepper": (0.02, 0.05, 0.1, 0.2),  # fraction of pixels set to black or white
    "patches": (0.15, 0.25, 0.35, 0.5),    # side of one black square, fraction of the image side
}


def digits32() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 1, 32, 32) (bilinear upsampling) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy(), d.target.astype(np.int64)


def photo_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random size x size RGB crops (uint8 NCHW) of scikit-learn's two sample photographs,
    each first halved in resolution so a crop holds a recognisable piece of the scene."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = []
    for img in load_sample_images().images:
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        photos.append(t[0].round().clamp(0, 255).to(torch.uint8).numpy())
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[1] - size + 1), rng.integers(0, p.shape[2] - size + 1)
        out[i] = p[:, y:y + size, x:x + size]
    return out


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, (std * 255)^2) to every pixel, clip to 0..255."""
    noisy = x.astype(np.float32) + rng.normal(0.0, std * 255.0, size=x.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of every channel."""
    if sigma <= 0:
        return x.copy()
    r = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32).square() / (2 * sigma * sigma))
    k = k / k.sum()
    t = torch.from_numpy(x).float()
    c = t.shape[1]
    t = F.pad(t, (r, r, r, r), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    t = F.conv2d(t, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def salt_pepper(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Set a fraction p of the pixels (all channels of a pixel together) to black or white."""
    out = x.copy()
    n, _, h, w = x.shape
    hit = rng.random((n, 1, h, w)) < p
    white = rng.random((n, 1, h, w)) < 0.5
    out = np.where(hit & white, np.uint8(255), out)
    out = np.where(hit & ~white, np.uint8(0), out)
    return out.astype(np.uint8)


def dropped_patch(x: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """Black out one square of side `side` x the image side at a random place in each image."""
    out = x.copy()
    n, _, h, w = x.shape
    s = max(1, int(round(side * min(h, w))))
    ys, xs = rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n)
    for i in range(n):
        out[i, :, ys[i]:ys[i] + s, xs[i]:xs[i] + s] = 0
    return out


DISTURBANCES = {"noise": gaussian_noise, "blur": gaussian_blur, "salt_pepper": salt_pepper,
                "patches": dropped_patch}


def disturb(x: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """`x` disturbed by `kind` at `strength` (0: unchanged), reproducibly for a seed."""
    if strength == 0:
        return x.copy()
    return DISTURBANCES[kind](x, strength, np.random.default_rng(seed))


def split_halves(x: np.ndarray, labels: np.ndarray | None = None, n: int | None = None, seed: int = 0):
    """Two disjoint random halves (reference, other) of at most n images each (+ their labels)."""
    perm = np.random.default_rng(seed).permutation(len(x))
    half = len(x) // 2 if n is None else min(n, len(x) // 2)
    a, b = perm[:half], perm[half:2 * half]
    if labels is None:
        return x[a], x[b]
    return x[a], x[b], labels[a], labels[b]


def disturbance_rows(reference_feats: np.ndarray, other: np.ndarray, extract, kid_subsets: int = 20,
                     kid_subset_size: int = 500, levels: dict | None = None) -> list[dict]:
    """One row per (disturbance, strength): FD and KID of extract(disturbed other) against the
    reference features. `extract` maps uint8 NCHW to features."""
    from trainers.judge.metrics import feature_stats, frechet_distance_from_stats, kid

    ref_stats = feature_stats(reference_feats)
    rows = []
    for kind, strengths in (levels or LEVELS).items():
        for strength in (0.0, *strengths):
            feats = extract(disturb(other, kind, strength, seed=1))
            fd = frechet_distance_from_stats(*ref_stats, *feature_stats(feats))
            k_mean, k_std = kid(reference_feats, feats, subsets=kid_subsets, subset_size=kid_subset_size)
            rows.append({"disturbance": kind, "strength": strength, "fd": fd, "kid": k_mean, "kid_std": k_std})
    return rows


def disturbance_table(n: int = 600, extractors=("random", "domain"), inception: str | None = None,
                      datasets=("digits", "photos"), log=print) -> str:
    """The markdown table: one line per data set, extractor, disturbance and strength. Digits: a
    reference half and a disturbed half of n images each; the domain extractor is fitted on the
    remaining digits (on the reference half if fewer than 200 remain)."""
    from trainers.judge.extractors import RandomConvExtractor, compute_features, fit_domain_extractor, get_extractor

    lines = ["| data | extractor | disturbance | strength | FD | KID (x1e3, mean ± std) |",
             "|---|---|---|---|---:|---:|"]
    for data in datasets:
        if data == "digits":
            x, y = digits32()
            perm = np.random.default_rng(0).permutation(len(x))
            n_data = min(n, len(x) // 2)
            ref, other, rest = x[perm[:n_data]], x[perm[n_data:2 * n_data]], perm[2 * n_data:]
            fit_idx = rest if len(rest) >= 200 else perm[:n_data]
            fit_set = (x[fit_idx], y[fit_idx])
        else:
            ref, other = split_halves(photo_crops(2 * n), n=n)
            fit_set = None
        for name in extractors:
            t0 = time.time()
            if name == "random":
                ext = RandomConvExtractor()
            elif name == "domain":
                if fit_set is None:
                    continue  # the photo crops carry no labels
                ext = fit_domain_extractor(*fit_set)
                log(f"domain extractor: {ext.info}")
            elif name == "inception":
                if inception is None:
                    continue
                ext = get_extractor(f"inception:{inception}")
            else:
                raise ValueError(name)
            rows = disturbance_rows(compute_features(ext, ref), other, lambda im: compute_features(ext, im),
                                    kid_subset_size=min(500, len(ref)))
            log(f"{data}/{name}: {time.time() - t0:.1f} s")
            for r in rows:
                lines.append(f"| {data} | {name} | {r['disturbance']} | {r['strength']:g} | {r['fd']:.4g} | "
                             f"{1e3 * r['kid']:.3g} ± {1e3 * r['kid_std']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=600, help="images per half (reference, disturbed)")
    p.add_argument("--extractors", default="random,domain")
    p.add_argument("--inception", default=None, help="path to pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--datasets", default="digits,photos")
    args = p.parse_args(argv)
    names = tuple(args.extractors.split(",")) + (("inception",) if args.inception else ())
    print(disturbance_table(args.n, names, args.inception, tuple(args.datasets.split(",")),
                            log=lambda s: print(s, flush=True)))


if __name__ == "__main__":
    main()
