"""What `gentrain report` measures, one run at a time, on one shared set of reference images.

Every number here comes from the run's own files (config.yaml, the fp32 weights of its latest
checkpoint, metrics.jsonl) and the reference shards; nothing is re-trained. The page, the plots
and the claims are built from these results by trainers.judge.report and report_figures.

- quality: FD, KID, precision/recall, density/coverage of `n` samples against `n` reference
  images in one extractor's features (trainers.judge.quality), and per-class shares of the
  samples under the project's digit/photo probe (trainers.judge.probe.ClassProbe);
- sharpness: the variance of the Laplacian of each image (grey, [0, 1]), samples vs references;
- latent structure: decoded paths between pairs of latents (spherical and linear, from the prior
  for both families; for the VAE also between the posterior means of pairs of reference images),
  scored by trainers.vae.task.interpolation_smoothness (coefficient of variation of the step
  sizes, 0 = even steps);
- VAE only: negative ELBO and an importance-weighted bound of -log p(x) on the reference images,
  reconstructions (PSNR, SSIM) and the AUROC of each score at telling anomalous labels apart;
- stability and cost from metrics.jsonl: loss curves, gradient norms, skipped steps, alerts,
  loss jitter, wall time, samples/s, images seen, peak memory where a key records it.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainers.runtime.images import make_grid

PATH_PAIRS, PATH_STEPS = 8, 10  # latent paths: 8 pairs of endpoints, 10 frames each (the VAE logs the same)
GRID_SAMPLES = 64
KID_SUBSETS = 50
RECON_SHOWN = 16
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------- pieces


def laplacian_variance(images_nchw: np.ndarray) -> np.ndarray:
    """Per-image variance of the 3x3 Laplacian of uint8 NCHW images (grey = channel mean, [0, 1],
    valid positions only): the usual focus/blur measure; higher is sharper."""
    x = torch.from_numpy(np.ascontiguousarray(images_nchw)).float().div_(255.0).mean(1, keepdim=True)
    out = []
    for start in range(0, len(x), 512):
        lap = F.conv2d(x[start:start + 512], LAPLACIAN.view(1, 1, 3, 3))
        out.append(lap.flatten(1).var(1, unbiased=False))
    return torch.cat(out).numpy().astype(np.float64)


def kid_half(real: np.ndarray, fake: np.ndarray, name: str, seed: int = 0, subsets: int = KID_SUBSETS) -> dict:
    """KID over `subsets` random halves of the sets (quality.set_metrics draws subsets of up to
    1,000, which at the report's few hundred images are the whole set every time: no spread)."""
    from trainers.judge.metrics import kid

    size = max(2, min(1000, len(real) // 2, len(fake) // 2))
    mean, std = kid(np.asarray(real, np.float64), np.asarray(fake, np.float64), subsets=subsets, subset_size=size,
                    seed=seed)
    return {f"kid_{name}": mean, f"kid_{name}_std": std, "kid_subset_size": size}


def nhwc_grid(images_nchw_or_nhwc: np.ndarray, nrow: int = 8, channels_first: bool = True) -> np.ndarray:
    """uint8 images as one tiled (H, W, C) grid."""
    x = images_nchw_or_nhwc.transpose(0, 2, 3, 1) if channels_first else images_nchw_or_nhwc
    return make_grid(np.ascontiguousarray(x), nrow=nrow)


def read_metrics_log(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of records (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def loss_keys(records: list[dict]) -> list[str]:
    """Top-level loss scalars in the order first seen: `loss`, `*_loss` (no `/` groups)."""
    keys: list[str] = []
    for record in records:
        for key in record:
            if "/" not in key and (key == "loss" or key.endswith("_loss")) and key not in keys:
                keys.append(key)
    return keys


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar over the records that carry a finite value of it."""
    pts = [(r["step"], float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    if not pts:
        return np.zeros(0, int), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values)


def jitter(values: np.ndarray) -> float | None:
    """Median |change| between consecutive logged values over the second half of the run, over
    the median |value| there: how much a loss moves from one log to the next, scale-free."""
    tail = np.asarray(values, float)[len(values) // 2:]
    if len(tail) < 3:
        return None
    scale = float(np.median(np.abs(tail)))
    return float(np.median(np.abs(np.diff(tail))) / max(scale, 1e-12))


@dataclass
class Stability:
    """What metrics.jsonl says about how a run trained."""

    losses: dict[str, tuple[np.ndarray, np.ndarray]]
    grad_norms: dict[str, tuple[np.ndarray, np.ndarray]]
    main_loss: str | None
    jitter: float | None
    skipped_steps: int
    alerts: dict[str, dict]  # name -> {"logs": count of logs with it raised, "first_step": step}
    last_step: int

    def as_dict(self) -> dict:
        return {"main_loss": self.main_loss, "loss_jitter": self.jitter, "skipped_steps": self.skipped_steps,
                "alerts": self.alerts, "last_step": self.last_step,
                "final_losses": {k: float(v[1][-1]) for k, v in self.losses.items() if len(v[1])}}


def stability(records: list[dict], kind: str) -> Stability:
    keys = loss_keys(records)
    main = "g_loss" if kind == "gan" and "g_loss" in keys else (keys[0] if keys else None)
    grads = sorted({k for r in records for k in r if k.startswith("grad_norm")})
    alerts: dict[str, dict] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("alert/") and isinstance(value, (int, float)) and value > 0:
                entry = alerts.setdefault(key[len("alert/"):], {"logs": 0, "first_step": r["step"]})
                entry["logs"] += 1
    skipped = int(round(sum(float(r.get("nonfinite_skipped", 0) or 0) for r in records)))
    return Stability(losses={k: series(records, k) for k in keys}, grad_norms={k: series(records, k) for k in grads},
                     main_loss=main, jitter=jitter(series(records, main)[1]) if main else None,
                     skipped_steps=skipped, alerts=alerts, last_step=records[-1]["step"] if records else 0)


def cost(records: list[dict], run_dir: Path) -> dict:
    """Wall time, samples/s (median over log intervals after the first, which holds warm-up),
    images seen, world size and peak memory where a metrics key records one."""
    out: dict = {"wall_seconds": None, "samples_per_sec": None, "images_seen": None, "peak_memory_mb": None,
                 "world_size": None, "steps": records[-1]["step"] if records else None}
    rates = [float(r["samples_per_sec"]) for r in records if isinstance(r.get("samples_per_sec"), (int, float))]
    if rates:
        out["samples_per_sec"] = statistics.median(rates[1:] or rates)
    seen = [r["images_seen"] for r in records if isinstance(r.get("images_seen"), (int, float))]
    if seen:
        out["images_seen"] = int(seen[-1])
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))]
    if times:
        first = records[0]
        warm = (first.get("images_seen") or 0) / first["samples_per_sec"] if first.get("samples_per_sec") else 0.0
        out["wall_seconds"] = times[-1] - times[0] + warm
    memory = [float(v) for r in records for k, v in r.items()
              if isinstance(v, (int, float)) and ("peak" in k.lower() or "memory" in k.lower() or "rss" in k.lower())]
    if memory:
        out["peak_memory_mb"] = max(memory)
    try:
        from trainers.judge.inference import latest_checkpoint

        complete = json.loads((latest_checkpoint(run_dir) / "COMPLETE").read_text())
        out["world_size"] = complete.get("world_size")
        out["precision"] = complete.get("precision")
    except (FileNotFoundError, ValueError, OSError):
        pass
    return out


# --------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """The images every run is compared against, read once."""

    shards: str
    images: np.ndarray  # uint8 NCHW
    labels: np.ndarray  # int, -1 where unlabelled
    manifest: dict
    image_size: int
    channels: int
    sharpness: np.ndarray
    extractor: object = None
    features: np.ndarray | None = None
    probe: object = None
    seconds: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())

    @property
    def classes(self) -> list[int]:
        return sorted(int(c) for c in np.unique(self.labels[self.labels >= 0]))


def read_reference(shards, image_size: int, channels: int, n: int, extractor_spec: str, run_dir, cfg,
                   classes: bool = True) -> Reference:
    from data_shards.stream import find_manifest
    from trainers.judge.extractors import compute_features
    from trainers.judge.quality import read_images, reference_features, run_extractor

    t0 = time.perf_counter()
    images, labels = read_images(shards, image_size, channels, n, with_labels=True)
    try:
        manifest = find_manifest(shards) or {}
    except Exception:  # noqa: BLE001 - remote or unreadable manifest: the page says less about the data
        manifest = {}
    ref = Reference(shards=str(shards), images=images, labels=np.asarray(labels, np.int64), manifest=manifest,
                    image_size=image_size, channels=channels, sharpness=laplacian_variance(images))
    t1 = time.perf_counter()
    ref.extractor = run_extractor(extractor_spec, run_dir, cfg)
    feats = reference_features(shards, ref.extractor, n, image_size, channels)
    ref.features = feats if len(feats) == len(images) else compute_features(ref.extractor, images)
    t2 = time.perf_counter()
    if classes and ref.labelled:
        from trainers.judge.probe import ClassProbe

        ref.probe = ClassProbe(shards, image_size, channels)
    ref.seconds = {"read": t1 - t0, "features": t2 - t1, "probe": time.perf_counter() - t2}
    return ref


# ------------------------------------------------------------------------------ one run


@dataclass
class RunMeasure:
    run_dir: Path
    name: str
    kind: str
    arch: str
    seed: int
    cfg: object
    quality: dict = field(default_factory=dict)
    classes: dict | None = None
    sharpness: np.ndarray | None = None
    samples_grid: np.ndarray | None = None
    paths: dict = field(default_factory=dict)  # name -> {"grid", "cv", "steps" (T-1, P) normalised}
    vae: dict | None = None
    recon_grid: np.ndarray | None = None
    roc: dict | None = None  # score name -> (fpr, tpr) for the anomaly plot
    stability: Stability | None = None
    cost: dict = field(default_factory=dict)
    parameters: int = 0
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kind.upper()})"

    def summary(self) -> dict:
        """Plain numbers, for JSON and W&B."""
        out = {"run": self.name, "run_dir": str(self.run_dir), "kind": self.kind, "arch": self.arch, "seed": self.seed,
               "parameters": self.parameters, **{k: v for k, v in self.quality.items() if k != "extractor"},
               "sharpness": float(np.mean(self.sharpness)) if self.sharpness is not None else None,
               **{f"smoothness_cv_{k}": v["cv"] for k, v in self.paths.items()}}
        if self.classes:
            out.update({k: v for k, v in self.classes.items() if k != "class_frequencies"})
        if self.vae:
            out.update({k: v for k, v in self.vae.items() if not isinstance(v, (list, dict))})
        if self.stability:
            out.update({k: v for k, v in self.stability.as_dict().items() if k in ("loss_jitter", "skipped_steps")})
            out["alerts"] = sum(a["logs"] for a in self.stability.alerts.values())
        out.update({f"cost_{k}": v for k, v in self.cost.items()})
        return out


def _decode(net, cfg, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Latents -> images in [0, 1] (float NCHW)."""
    if cfg.kind == "vae":
        from trainers.vae.objective import to_pixels
        from trainers.vae.task import decoder_link

        return to_pixels(net.decode(z), decoder_link(cfg)).float()
    from trainers.gan.sampling import generator_args

    return ((net(*generator_args(net, z, labels)).float().clamp(-1, 1) + 1) / 2)


@torch.no_grad()
def latent_paths(net, cfg, seed: int, ref: Reference | None = None) -> dict:
    """Decoded spherical and linear paths between pairs of prior latents (and, for the VAE,
    between the posterior means of pairs of reference images): grid, smoothness CV and the step
    sizes along each path over their mean."""
    from trainers.gan.sampling import balanced_labels
    from trainers.vae.task import interpolation_smoothness, slerp

    gen = torch.Generator().manual_seed(seed + 101)
    dim = net.latent_dim if cfg.kind == "vae" else int(cfg.model.z_dim)
    a, b = torch.randn(PATH_PAIRS, dim, generator=gen), torch.randn(PATH_PAIRS, dim, generator=gen)
    classes = int(cfg.model.get("num_classes", 0) or 0) if cfg.kind == "gan" else 0
    labels = balanced_labels(PATH_PAIRS, classes)  # one class along each path
    t = torch.linspace(0, 1, PATH_STEPS)
    endpoints = {"prior_slerp": ("slerp", a, b), "prior_linear": ("linear", a, b)}
    if cfg.kind == "vae" and ref is not None and len(ref.images) >= 2 * PATH_PAIRS:
        x = torch.from_numpy(ref.images[:2 * PATH_PAIRS]).float() / 255.0
        mean, _ = net.encode(x)
        endpoints["data_slerp"] = ("slerp", mean[0::2].float(), mean[1::2].float())
    out = {}
    for name, (how, za, zb) in endpoints.items():
        z_tpz = slerp(za, zb, t) if how == "slerp" else torch.lerp(za.unsqueeze(0), zb.unsqueeze(0), t.view(-1, 1, 1))
        flat = z_tpz.reshape(PATH_STEPS * PATH_PAIRS, -1)
        lab = None if labels is None else labels.repeat(PATH_STEPS)
        frames = _decode(net, cfg, flat, lab).view(PATH_STEPS, PATH_PAIRS, *_decode_shape(cfg))
        steps = (frames[1:] - frames[:-1]).flatten(2).norm(dim=-1)  # (T-1, P)
        rows = (frames.transpose(0, 1).flatten(0, 1) * 255).round().to(torch.uint8).numpy()  # one path per row
        out[name] = {"cv": interpolation_smoothness(frames), "grid": nhwc_grid(rows, nrow=PATH_STEPS),
                     "steps": (steps / steps.mean(0).clamp(min=1e-8)).numpy()}
    return out


def _decode_shape(cfg) -> tuple[int, int, int]:
    return int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size)


@torch.no_grad()
def vae_bounds(vae, cfg, ref: Reference, k: int, seed: int, anomalous: list[int] | None) -> tuple[dict, np.ndarray, dict]:
    """Negative ELBO and the IW bound (K samples) per reference image (as trainers.judge.evaluation
    computes them, on the report's images only), reconstructions, and the anomaly AUROC of each
    score when `anomalous` labels are given and both groups are present.
    Returns (numbers, reconstruction grid (input | output), ROC curves)."""
    from trainers.judge.evaluation import vae_batch_scores
    from trainers.judge.metrics import psnr, ssim
    from trainers.vae.objective import LIKELIHOODS

    gen = torch.Generator().manual_seed(seed)
    likelihood = cfg.loss.likelihood
    scores: dict[str, list] = {"neg_elbo": [], "iw_nll": [], "recon_mse": []}
    recon_u8 = []
    for start in range(0, len(ref.images), 250):
        x = torch.from_numpy(ref.images[start:start + 250]).float() / 255.0
        batch = vae_batch_scores(vae, cfg, x, k, gen)
        y = batch["recon"].clamp(0, 1)
        scores["neg_elbo"].append(batch["neg_elbo"].numpy())
        scores["iw_nll"].append(batch["iw_nll"].numpy())
        scores["recon_mse"].append((y - x).square().flatten(1).mean(1).numpy())
        recon_u8.append((y * 255).round().to(torch.uint8).numpy())
    per = {key: np.concatenate(v).astype(np.float64) for key, v in scores.items()}
    recon = np.concatenate(recon_u8)
    dims = cfg.data.channels * cfg.data.image_size ** 2
    out = {"likelihood": likelihood, "is_likelihood": likelihood in LIKELIHOODS, "k": k,
           "neg_elbo": float(per["neg_elbo"].mean()), "iw_nll": float(per["iw_nll"].mean()),
           "neg_elbo_nats_per_dim": float(per["neg_elbo"].mean() / dims), "iw_nll_nats_per_dim": float(per["iw_nll"].mean() / dims),
           "psnr": float(psnr(ref.images, recon)), "ssim": float(ssim(ref.images, recon)),
           "recon_mse": float(per["recon_mse"].mean()), "latent_dim": int(vae.latent_dim)}
    shown = np.stack([ref.images[:RECON_SHOWN], recon[:RECON_SHOWN]], 1).reshape(-1, *ref.images.shape[1:])
    roc: dict = {}
    if anomalous:
        is_anomaly = np.isin(ref.labels, anomalous)
        known = ref.labels >= 0
        out["anomaly_labels"] = list(anomalous)
        out["anomalies"] = int(is_anomaly[known].sum())
        out["normals"] = int((~is_anomaly & known).sum())
        if out["anomalies"] and out["normals"]:
            from sklearn.metrics import roc_auc_score, roc_curve

            for key, values in per.items():
                out[f"auroc_{key}"] = float(roc_auc_score(is_anomaly[known], values[known]))
                fpr, tpr, _ = roc_curve(is_anomaly[known], values[known])
                roc[key] = (fpr, tpr)
    return out, nhwc_grid(shown, nrow=8), roc


def class_shares(ref: Reference, samples_nchw: np.ndarray) -> dict | None:
    """Per-class shares of the samples under the reference's probe (ClassProbe), the classes
    covered (>= a quarter of a uniform share of confident predictions), KL to the real shares."""
    if ref.probe is None:
        return None
    coverage = ref.probe.coverage(samples_nchw).as_dict()
    confident = coverage["confident_fraction"] > 0  # no confident prediction at all: no shares, no KL
    return {"classes_covered": coverage["classes_covered"], "num_classes": coverage["num_classes"],
            "class_kl_to_real": coverage["kl_to_real"] if confident else None, "confident_fraction": coverage["confident_fraction"],
            "class_frequencies": {int(c): float(f) for c, f in coverage["class_frequencies"].items()},
            "probe_accuracy": float(ref.probe.held_out_accuracy)}


def measure_run(run_dir: Path, ref: Reference, n: int, seed: int = 0, k: int = 8,
                anomalous: list[int] | None = None) -> RunMeasure:
    """Everything the report shows about one run."""
    from trainers.judge.extractors import compute_features
    from trainers.judge.inference import generate, load_sampler
    from trainers.judge.quality import set_metrics

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    net, cfg = load_sampler(run_dir)
    m = RunMeasure(run_dir=run_dir, name=str(cfg.run.name), kind=str(cfg.kind), arch=str(cfg.model.arch),
                   seed=int(cfg.run.seed), cfg=cfg, parameters=int(sum(p.numel() for p in net.parameters())))
    samples, _ = generate(run_dir, len(ref.images), seed=seed)
    samples = samples.transpose(0, 3, 1, 2)  # NCHW uint8
    fake = compute_features(ref.extractor, samples)
    m.quality = set_metrics(ref.features, fake, ("fd", "pr", "dc"), ref.extractor.name, seed)
    m.quality.update(kid_half(ref.features, fake, ref.extractor.name, seed))
    m.quality["n"] = int(len(samples))
    m.classes = class_shares(ref, samples)
    m.sharpness = laplacian_variance(samples)
    m.samples_grid = nhwc_grid(samples[:GRID_SAMPLES])
    m.paths = latent_paths(net, cfg, seed, ref)
    if cfg.kind == "vae":
        m.vae, m.recon_grid, m.roc = vae_bounds(net, cfg, ref, k, seed, anomalous)
    records = read_metrics_log(run_dir)
    m.stability = stability(records, m.kind)
    m.cost = cost(records, run_dir)
    m.seconds = time.perf_counter() - t0
    return m
