"""Use a finished (or running) run without DeepSpeed: sample from it, export its weights.

Everything here reads the run's config.yaml and the fp32 `weights.safetensors` of its latest
complete checkpoint, so no pickled file is ever loaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from configs import ConfigError, load_config
from trainers.gan.sampling import balanced_labels, draw_samples
from trainers.runtime.checkpoint import latest_complete
from trainers.vae.task import build_vae, decoder_link
from trainers.vae.objective import to_pixels


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run directory, or a clear error."""
    root = Path(run_dir) / "checkpoints"
    found = latest_complete(root)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    return found


def load_run_config(run_dir: str | Path):
    """The resolved config a run was trained with."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(cfg_file)


def load_run(run_dir: str | Path):
    """(config, fp32 weights) of a run's latest checkpoint."""
    cfg = load_run_config(run_dir)
    return cfg, load_file(str(latest_checkpoint(run_dir) / "weights.safetensors"))


def _submodule(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_sampler(run_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """The network that generates samples: the EMA generator, the generator, or the VAE."""
    cfg, weights = load_run(run_dir)
    if cfg.kind == "vae":
        net = build_vae(cfg)
        net.load_state_dict(_submodule(weights, "vae."))
    else:
        from trainers.gan.task import build_networks

        net, _ = build_networks(cfg)
        ema = _submodule(weights, "g_ema.")
        net.load_state_dict(ema or _submodule(weights, "g."))
    return net.eval(), cfg


@torch.no_grad()
def generate(run_dir: str | Path, n: int, seed: int = 0, batch: int = 500, class_index: int | None = None):
    """(samples, labels) from a run's sampler: images uint8 (N,H,W,C) or points float32 (N,2).

    A class-conditional GAN samples `class_index` only, or every class equally often (then
    `labels` holds each sample's class; None for unconditional runs)."""
    if n <= 0:
        raise ConfigError(f"--n must be > 0, got {n}")
    net, cfg = load_sampler(run_dir)
    classes = int(cfg.model.get("num_classes", 0)) if cfg.kind == "gan" else 0
    if class_index is not None and not 0 <= class_index < max(classes, 1):
        raise ConfigError(f"--class {class_index}: this run is not class-conditional" if not classes
                          else f"--class {class_index}: the run has classes 0..{classes - 1}")
    labels = torch.full((n,), class_index) if classes and class_index is not None else balanced_labels(n, classes)
    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "vae":
        chunks, link = [], decoder_link(cfg)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), net.latent_dim, generator=gen)
            chunks.append(to_pixels(net.decode(z), link) * 2 - 1)
        x = torch.cat(chunks)
    else:  # StyleGAN2's noise inputs too: the same seed, the same samples
        x = draw_samples(net, n, cfg.model.z_dim, gen, labels, batch)
    if x.dim() == 2:
        return x.numpy().astype(np.float32), labels
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, None if labels is None else labels.numpy()


def sample_to_npz(run_dir: str | Path, n: int, out: str | Path, seed: int = 0, batch: int = 500,
                  class_index: int | None = None) -> Path:
    """Write `images` (uint8, N,H,W,C) or `points` (float32, N,2) to an .npz file (and `labels`
    for a class-conditional GAN); see `generate`."""
    samples, labels = generate(run_dir, n, seed, batch, class_index)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"labels": labels} if labels is not None else {}
    np.savez_compressed(out, **{"points" if samples.ndim == 2 else "images": samples}, **extra)
    return out


@torch.no_grad()
def latent_scaling_factor(vae: torch.nn.Module, cfg, shards, max_samples: int | None = None, seed: int = 0,
                          batch: int = 256) -> tuple[float, int]:
    """(1 / std of the latents, samples used): latents drawn from the posterior of each image of
    the shards (one pass, in order), one std over every element, as the latent-diffusion
    autoencoder's `scale_by_std` and diffusers' `scaling_factor` do. A diffusion model trained
    on latents * scaling_factor then sees unit variance."""
    from data_shards.stream import ShardStream

    gen = torch.Generator().manual_seed(seed)
    total, total_sq, count, samples = 0.0, 0.0, 0, 0
    stream = ShardStream(shards, batch, channels=cfg.data.channels, image_size=cfg.data.image_size, passes=1,
                         shuffle_buffer=1)
    for chunk in stream:
        x = chunk["image"].float() / 255.0
        if max_samples is not None:
            x = x[:max_samples - samples]
        mean, logvar = vae.encode(x)
        z = (mean + torch.randn(mean.shape, generator=gen) * torch.exp(0.5 * logvar)).double()
        total, total_sq, count = total + float(z.sum()), total_sq + float(z.square().sum()), count + z.numel()
        samples += x.shape[0]
        if max_samples is not None and samples >= max_samples:
            break
    if count < 2:
        raise ValueError(f"no samples in {shards} to measure the latents' scale")
    var = (total_sq - total * total / count) / (count - 1)
    return 1.0 / math.sqrt(var), samples


EXPORT_FORMATS = ("safetensors", "diffusers")


def export_weights(run_dir: str | Path, out: str | Path, fmt: str = "safetensors", shards=None,
                   max_samples: int | None = None) -> tuple[Path, dict]:
    """Export the latest checkpoint's fp32 weights; returns (path, facts recorded).

    safetensors: one file with every weight, the config and (for a VAE) `scaling_factor` as metadata.
    diffusers:   a folder that `diffusers.AutoencoderKL.from_pretrained` loads (config.json +
                 diffusion_pytorch_model.safetensors), for model.arch=autoencoder_kl runs.
    A VAE's scaling factor is measured on `shards` (default: the run's training shards).
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format '{fmt}' is not supported; use {' or '.join(EXPORT_FORMATS)}")
    cfg = load_run_config(run_dir)
    if fmt == "diffusers" and (cfg.kind != "vae" or cfg.model.arch != "autoencoder_kl"):
        raise ConfigError("--format diffusers needs a VAE trained with model.arch=autoencoder_kl; "
                          "use --format safetensors")
    _, weights = load_run(run_dir)
    step = json.loads((latest_checkpoint(run_dir) / "COMPLETE").read_text()).get("step")
    facts: dict = {"format": "gentrain", "step": str(step)}
    if cfg.kind == "vae":
        vae, _ = load_sampler(run_dir)
        factor, used = latent_scaling_factor(vae, cfg, shards if shards is not None else cfg.data.shards, max_samples)
        facts.update({"scaling_factor": repr(factor), "scaling_factor_samples": str(used)})
    out = Path(out)
    if fmt == "diffusers":
        return _export_diffusers(vae.ae, out, float(facts["scaling_factor"]), cfg, facts), facts
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"config": OmegaConf.to_yaml(cfg), **facts})
    return out, facts


def _export_diffusers(ae: torch.nn.Module, out: Path, scaling_factor: float, cfg, facts: dict) -> Path:
    """save_pretrained with the measured scaling factor in config.json; gentrain.json says where it came from."""
    ae.register_to_config(scaling_factor=scaling_factor)
    ae.save_pretrained(str(out), safe_serialization=True)
    (out / "gentrain.json").write_text(json.dumps({**facts, "run_name": cfg.run.name, "link": "pm1",
                                                   "note": "encoder input and decoder output are images in [-1, 1]"},
                                                  indent=1))
    return out
