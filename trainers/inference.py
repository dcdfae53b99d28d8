"""Use a finished (or running) run without DeepSpeed: sample from it, export its weights.

Everything here reads the run's config.yaml and the fp32 `weights.safetensors` of its latest
complete checkpoint, so no pickled file is ever loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from configs import ConfigError, load_config
from trainers.checkpoint import latest_complete


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run directory, or a clear error."""
    root = Path(run_dir) / "checkpoints"
    found = latest_complete(root)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    return found


def load_run(run_dir: str | Path):
    """(config, fp32 weights) of a run's latest checkpoint."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(cfg_file)
    return cfg, load_file(str(latest_checkpoint(run_dir) / "weights.safetensors"))


def _submodule(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_sampler(run_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """The network that generates samples: the EMA generator, the generator, or the VAE."""
    cfg, weights = load_run(run_dir)
    if cfg.kind == "vae":
        from trainers.vae import build_vae

        net = build_vae(cfg)
        net.load_state_dict(_submodule(weights, "vae."))
    else:
        from trainers.gan import build_networks

        net, _ = build_networks(cfg)
        ema = _submodule(weights, "g_ema.")
        net.load_state_dict(ema or _submodule(weights, "g."))
    return net.eval(), cfg


@torch.no_grad()
def sample_to_npz(run_dir: str | Path, n: int, out: str | Path, seed: int = 0, batch: int = 500) -> Path:
    """Write `images` (uint8, N,H,W,C) or `points` (float32, N,2) to an .npz file."""
    if n <= 0:
        raise ConfigError(f"--n must be > 0, got {n}")
    net, cfg = load_sampler(run_dir)
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        if cfg.kind == "vae":
            z = torch.randn(m, cfg.model.latent_dim, generator=gen)
            chunks.append(torch.sigmoid(net.decode(z)) * 2 - 1)
        else:
            chunks.append(net(torch.randn(m, cfg.model.z_dim, generator=gen)))
    x = torch.cat(chunks)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if x.dim() == 2:
        np.savez_compressed(out, points=x.numpy().astype(np.float32))
    else:
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez_compressed(out, images=images)
    return out


def export_weights(run_dir: str | Path, out: str | Path, fmt: str = "safetensors") -> Path:
    """Copy the latest checkpoint's fp32 weights to one safetensors file, with the config as metadata."""
    if fmt != "safetensors":
        raise ConfigError(f"export format '{fmt}' is not supported; use safetensors")
    cfg, weights = load_run(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"config": OmegaConf.to_yaml(cfg), "format": "gentrain"})
    return out
