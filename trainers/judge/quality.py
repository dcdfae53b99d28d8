"""Sample quality as the field reports it: Frechet distance, KID, precision/recall and
density/coverage of generated images against real ones, in the features of a named extractor.

Keys carry the extractor (`fd_random`, `kid_random`, `kid_random_std`, `precision_random`,
`recall_random`, `density_random`, `coverage_random`), because distances in different feature
spaces are not comparable: only `fd_inception` (the standard weights, sha256-checked) compares
with published FIDs. The real side's features are cached by the shards' manifest, the
extractor and the sample count (`reference_features`), so they are computed once per shard set.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from data_shards.stream import ShardStream, find_manifest
from trainers.judge.extractors import FeatureExtractor, compute_features, fit_domain_extractor, get_extractor
from trainers.judge.metrics import frechet_distance, kid, prdc

METRICS = ("fd", "kid", "pr", "dc")
DOMAIN_FILE = "judge/domain.safetensors"  # a run's own domain extractor, fitted on its training shards


def parse_metrics(text: str) -> tuple[str, ...]:
    """`fd,kid,pr,dc` (any subset, any order) -> a tuple; an unknown name is a one-line error."""
    names = tuple(m.strip().lower() for m in str(text).split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric {bad[0]!r}; choose from {','.join(METRICS)}" if bad
                         else f"no metrics named; choose from {','.join(METRICS)}")
    return names


def cache_dir() -> Path:
    return Path(os.environ.get("GENTRAIN_CACHE", Path.home() / ".cache" / "gentrain")) / "reference"


def read_images(shards, image_size: int, channels: int, n: int, with_labels: bool = False):
    """Up to n real images (uint8 NCHW, in shard order) and, if asked, their labels."""
    images, labels, count = [], [], 0
    stream = ShardStream(shards, 256, channels=channels, image_size=image_size, passes=1, shuffle_buffer=1)
    for batch in stream:
        x = batch["image"][: n - count]
        images.append(x.contiguous().numpy())
        labels.append(np.asarray(batch["label"])[: len(x)])
        count += len(x)
        if count >= n:
            break
    if not count:
        raise ValueError(f"no images in {shards}")
    out = np.concatenate(images)
    return (out, np.concatenate(labels)) if with_labels else out


def reference_key(shards, extractor: FeatureExtractor, n: int, image_size: int, channels: int) -> str | None:
    """Cache key of a shard set's features: its manifest's shard hashes, the extractor, n, the shape.
    None when the shards have no manifest (nothing stable to key on: no caching)."""
    try:
        manifest = find_manifest(shards)
    except Exception:  # noqa: BLE001 - remote or unreadable: compute without a cache
        manifest = None
    if not manifest or "shards" not in manifest:
        return None
    identity = {"shards": [s.get("sha256") for s in manifest["shards"]], "extractor": extractor.describe(),
                "n": n, "image_size": image_size, "channels": channels}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def reference_features(shards, extractor: FeatureExtractor, n: int, image_size: int, channels: int) -> np.ndarray:
    """Features of up to n real images of the shards, from the cache when the same set was seen."""
    key = reference_key(shards, extractor, n, image_size, channels)
    path = cache_dir() / f"{extractor.name}-{key}.npy" if key else None
    if path is not None and path.is_file():
        return np.load(path)
    feats = compute_features(extractor, read_images(shards, image_size, channels, n)).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, feats)
        os.replace(partial, path)
    return feats


def set_metrics(real: np.ndarray, fake: np.ndarray, metrics, name: str, seed: int = 0) -> dict[str, float]:
    """The asked-for metrics between real and generated features, under keys `<metric>_<name>`."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    out: dict[str, float] = {}
    if "fd" in metrics:
        out[f"fd_{name}"] = frechet_distance(real, fake)
    if "kid" in metrics:
        size = min(1000, len(real) // 2, len(fake) // 2)  # subsets smaller than the sets, so the std means something
        mean, std = kid(real, fake, subsets=100, subset_size=size, seed=seed)
        out[f"kid_{name}"], out[f"kid_{name}_std"] = mean, std
    if "pr" in metrics or "dc" in metrics:
        values = prdc(real, fake)
        if "pr" in metrics:
            out[f"precision_{name}"], out[f"recall_{name}"] = values["precision"], values["recall"]
        if "dc" in metrics:
            out[f"density_{name}"], out[f"coverage_{name}"] = values["density"], values["coverage"]
    return out


def run_extractor(spec: str, run_dir, cfg) -> FeatureExtractor:
    """The extractor a spec names; `domain` alone means the run's own, fitted on its training
    shards on first use and kept in the run directory."""
    if spec.strip().lower() != "domain":
        return get_extractor(spec)
    path = Path(run_dir) / DOMAIN_FILE
    if not path.is_file():
        images, labels = read_images(cfg.data.shards, cfg.data.image_size, cfg.data.channels, 3_000,
                                     with_labels=True)
        if (labels < 0).all():
            raise ValueError(f"--extractor domain needs labelled training shards ({cfg.data.shards} has no KEY.cls)")
        print(f"[gentrain] fitting the domain extractor on {len(images)} training images -> {path}", flush=True)
        fit_domain_extractor(images, labels, out=path)
    return get_extractor("domain", domain_path=path)


@torch.no_grad()
def vae_reconstruction_metrics(vae, cfg, real_u8: np.ndarray, extractor: FeatureExtractor,
                               real_feats: np.ndarray) -> dict[str, float]:
    """A VAE's held-out reconstructions (posterior means decoded): PSNR, SSIM and their Frechet
    distance to the originals."""
    from trainers.judge.metrics import psnr, ssim
    from trainers.vae.objective import to_pixels
    from trainers.vae.task import decoder_link

    recon = []
    for start in range(0, len(real_u8), 256):
        x = torch.from_numpy(real_u8[start:start + 256]).float() / 255.0
        y = to_pixels(vae.decode(vae.encode(x)[0]), decoder_link(cfg)).clamp(0, 1)
        recon.append((y * 255).round().to(torch.uint8).numpy())
    recon = np.concatenate(recon)
    fake = compute_features(extractor, recon)
    return {"psnr": float(psnr(real_u8, recon)), "ssim": float(ssim(real_u8, recon)),
            f"recon_fd_{extractor.name}": frechet_distance(np.asarray(real_feats, np.float64), fake)}


def evaluate_quality(run_dir, shards, metrics=METRICS, extractor_spec: str = "random", n: int = 5000,
                     seed: int = 0) -> dict:
    """FD/KID/PR/DC of a run's samples against the shards' images (n of each); for a VAE also
    PSNR, SSIM and the reconstruction Frechet distance on the same held-out images."""
    from trainers.judge.inference import generate, load_sampler

    net, cfg = load_sampler(run_dir)
    if cfg.kind == "gan" and cfg.model.arch == "mlp":
        raise ValueError("point-set GANs are judged by `python -m bench.gan_modes`, not image metrics")
    extractor = run_extractor(extractor_spec, run_dir, cfg)
    real = reference_features(shards, extractor, n, cfg.data.image_size, cfg.data.channels)
    samples, _ = generate(run_dir, len(real), seed=seed)
    fake = compute_features(extractor, samples.transpose(0, 3, 1, 2))
    out = {"n": int(len(real)), "extractor": extractor.describe(), **set_metrics(real, fake, metrics, extractor.name, seed)}
    if cfg.kind == "vae":
        real_u8 = read_images(shards, cfg.data.image_size, cfg.data.channels, len(real))
        out.update(vae_reconstruction_metrics(net, cfg, real_u8, extractor, real))
    return out
