"""Judge a trained run on held-out shards: likelihood bounds, anomaly scores, latents, coverage.

Used by `gentrain evaluate`, `gentrain anomaly` and `gentrain encode`; reads the run's fp32
weights (trainers.judge.inference), never a pickled file.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from data_shards.stream import ShardStream, find_manifest
from trainers.judge.inference import load_sampler, sample_to_npz
from trainers.vae.task import decoder_link, log_scale_of
from trainers.vae.objective import (LIKELIHOODS, active_units, decoder_mean, kl_per_dim, log_normal,
                                    log_normal_standard, mutual_information, reconstruction_nll)


def _one_pass(shards, cfg, batch_size: int = 256):
    """Every sample of the shards once, in order, with keys."""
    return ShardStream(shards, batch_size, channels=cfg.data.channels, image_size=cfg.data.image_size,
                       passes=1, shuffle_buffer=1, return_keys=True)


@torch.no_grad()
def vae_batch_scores(vae, cfg, x: torch.Tensor, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch of images in [0, 1]: the posterior (mean, logvar), the reconstruction NLL and KL of
    one posterior sample and their sum (the negative ELBO), an importance-weighted bound of -log p(x)
    with K samples (Burda et al.), and the decoder mean of the posterior mean (`recon`, unclamped)."""
    log_scale, link, likelihood = log_scale_of(vae, cfg), decoder_link(cfg), cfg.loss.likelihood
    mean, logvar = vae.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mean + torch.randn(mean.shape, generator=gen) * std
    nll = reconstruction_nll(vae.decode(z), x, likelihood, log_scale, link)
    kl = kl_per_dim(mean, logvar).sum(1)
    log_w = []
    for _ in range(k):
        z_k = mean + torch.randn(mean.shape, generator=gen) * std
        log_px_z = -reconstruction_nll(vae.decode(z_k), x, likelihood, log_scale, link)
        log_w.append(log_px_z + log_normal_standard(z_k) - log_normal(z_k, mean, logvar))
    iw = -(torch.logsumexp(torch.stack(log_w), 0) - math.log(k))
    return {"mean": mean, "logvar": logvar, "recon_nll": nll, "kl": kl, "neg_elbo": nll + kl, "iw_nll": iw,
            "recon": decoder_mean(vae.decode(mean), link)}


@torch.no_grad()
def vae_scores(run_dir, shards, k: int = 64, seed: int = 0):
    """Per-sample ELBO terms and an importance-weighted bound of log p(x) (Burda et al., K samples).

    Returns (cfg, dict of per-sample numpy arrays, posterior means (N, Z), log-variances (N, Z)).
    """
    vae, cfg = load_sampler(run_dir)
    if cfg.kind != "vae":
        raise ValueError(f"{run_dir} is a {cfg.kind} run; this needs a VAE")
    gen = torch.Generator().manual_seed(seed)
    rows = {"key": [], "label": [], "recon_nll": [], "kl": [], "neg_elbo": [], "iw_nll": [], "recon_mse": []}
    means, logvars = [], []
    for batch in _one_pass(shards, cfg):
        x = batch["image"].float() / 255.0
        scores = vae_batch_scores(vae, cfg, x, k, gen)
        scores["recon_mse"] = (scores["recon"] - x).square().flatten(1).mean(1)
        for name in ("recon_nll", "kl", "neg_elbo", "iw_nll", "recon_mse"):
            rows[name].append(scores[name].numpy())
        rows["key"] += list(batch["__key__"])
        rows["label"].append(batch["label"].numpy())
        means.append(scores["mean"])
        logvars.append(scores["logvar"])
    if not rows["key"]:
        raise ValueError(f"no samples in {shards}")
    out = {k_: (np.concatenate(v) if k_ != "key" else np.array(v)) for k_, v in rows.items()}
    return cfg, out, torch.cat(means), torch.cat(logvars)


def evaluate(run_dir, shards, out, k: int = 64, num_samples: int = 5000, seed: int = 0,
             metrics=("fd", "kid", "pr", "dc"), extractor: str = "random", coverage: bool = True) -> dict:
    """Write metrics.json: sample quality against the shards (FD, KID, precision/recall,
    density/coverage in the named extractor's features, `num_samples` images a side:
    trainers.judge.quality); for a VAE also its ELBO, IW bound, reconstruction PSNR/SSIM/FD,
    active units and MI; for a GAN on labelled shards the class coverage of its samples."""
    from trainers.judge.quality import evaluate_quality

    _, cfg = load_sampler(run_dir)
    result = evaluate_quality(run_dir, shards, metrics, extractor, num_samples, seed) \
        if metrics and not (cfg.kind == "gan" and cfg.model.arch == "mlp") else {}
    if cfg.kind == "vae":
        cfg, scores, means, logvars = vae_scores(run_dir, shards, k=k, seed=seed)
        dims = cfg.data.channels * cfg.data.image_size**2
        result.update({"num_samples": int(len(scores["key"])), "likelihood": cfg.loss.likelihood,
                       "neg_elbo": float(scores["neg_elbo"].mean()), f"iw_nll_k{k}": float(scores["iw_nll"].mean()),
                       "recon_nll": float(scores["recon_nll"].mean()), "kl": float(scores["kl"].mean()),
                       "recon_mse": float(scores["recon_mse"].mean()), "active_units": active_units(means),
                       "latent_dim": int(means.shape[1]),
                       "mutual_info": mutual_information(means[:1000], logvars[:1000], torch.Generator().manual_seed(seed))})
        if cfg.loss.likelihood in LIKELIHOODS:
            result["neg_elbo_nats_per_dim"] = result["neg_elbo"] / dims
            result[f"iw_nll_k{k}_nats_per_dim"] = result[f"iw_nll_k{k}"] / dims
    elif coverage and cfg.model.arch != "mlp" and (find_manifest(shards) or {}).get("num_classes"):
        result.update(gan_coverage(run_dir, shards, cfg, num_samples, seed))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run_dir": str(run_dir), "shards": str(shards), **result}, indent=2))
    return result


def gan_coverage(run_dir, shards, cfg, num_samples: int, seed: int) -> dict:
    """Class coverage of a GAN's samples, judged by a probe trained on the labelled shards."""
    import tempfile

    from trainers.judge.probe import ClassProbe

    if cfg.model.arch == "mlp":
        raise ValueError("point-set GANs are evaluated by `python -m bench.gan_modes`")
    probe = ClassProbe(shards, cfg.data.image_size, cfg.data.channels, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        images = np.load(sample_to_npz(run_dir, num_samples, Path(tmp) / "s.npz", seed=seed))["images"]
    coverage = probe.coverage(images.transpose(0, 3, 1, 2)).as_dict()
    return {"num_samples": num_samples, "probe_held_out_accuracy": probe.held_out_accuracy, **coverage}


def anomaly_scores(run_dir, shards, out, normal_labels: set[int] | None = None, k: int = 16) -> dict:
    """scores.csv with one row per sample (negative ELBO, IW NLL, reconstruction error) and, given
    which labels are normal, the AUROC of each score at telling the others apart."""
    from sklearn.metrics import roc_auc_score

    _, scores, _, _ = vae_scores(run_dir, shards, k=k)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    score_names = ("neg_elbo", "iw_nll", "recon_mse")
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", *score_names])
        for i, key in enumerate(scores["key"]):
            writer.writerow([key, int(scores["label"][i]), *(f"{scores[n][i]:.6f}" for n in score_names)])
    summary = {"num_samples": int(len(scores["key"])), "scores": str(out)}
    if normal_labels is not None:
        is_anomaly = ~np.isin(scores["label"], sorted(normal_labels))
        summary["num_anomalies"] = int(is_anomaly.sum())
        if 0 < is_anomaly.sum() < len(is_anomaly):
            summary.update({f"auroc_{n}": float(roc_auc_score(is_anomaly, scores[n])) for n in score_names})
    return summary


@torch.no_grad()
def encode(run_dir, shards, out) -> int:
    """latents.npz: keys, labels, posterior mean and standard deviation per sample."""
    vae, cfg = load_sampler(run_dir)
    if cfg.kind != "vae":
        raise ValueError(f"{run_dir} is a {cfg.kind} run; encode needs a VAE")
    keys, labels, means, stds = [], [], [], []
    for batch in _one_pass(shards, cfg):
        mean, logvar = vae.encode(batch["image"].float() / 255.0)
        keys += list(batch["__key__"])
        labels.append(batch["label"].numpy())
        means.append(mean.numpy())
        stds.append(torch.exp(0.5 * logvar).numpy())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, keys=np.array(keys), labels=np.concatenate(labels), mean=np.concatenate(means),
                        std=np.concatenate(stds))
    return len(keys)
