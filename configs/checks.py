"""Per-kind checks that span several fields (the schema's types and choices cannot express them).

They run in ``configs.load.validate``, so a bad combination stops ``gentrain train``, ``launch``
(before any process starts or any job is submitted), ``sample`` and ``export`` with one line.
"""
from __future__ import annotations

from omegaconf import DictConfig

from configs.errors import ConfigError


def check_vae(cfg: DictConfig) -> None:
    """The VAE's cross-field rules: the autoencoder_kl architecture and the adversarial term."""
    m, adv = cfg.model, cfg.loss.adversarial
    if m.arch == "autoencoder_kl":
        if cfg.loss.likelihood == "bernoulli":
            raise ConfigError("model.arch=autoencoder_kl decodes an image in [-1, 1], not logits: use "
                              "loss.likelihood=gaussian, l1 or l2")
        if cfg.loss.learn_scale:
            raise ConfigError("loss.learn_scale is not supported with model.arch=autoencoder_kl (its weights "
                              "must load into diffusers' AutoencoderKL as they are)")
        if not m.block_out_channels or m.latent_channels < 1 or m.layers_per_block < 1:
            raise ConfigError("model.block_out_channels must be non-empty and model.latent_channels, "
                              "model.layers_per_block >= 1")
        if any(c % m.norm_num_groups for c in m.block_out_channels):
            raise ConfigError(f"model.norm_num_groups={m.norm_num_groups} must divide every entry of "
                              f"model.block_out_channels={list(m.block_out_channels)}")
        factor = 2 ** (len(m.block_out_channels) - 1)
        if cfg.data.image_size % factor:
            raise ConfigError(f"data.image_size={cfg.data.image_size} must be divisible by {factor} "
                              f"({len(m.block_out_channels)} levels in model.block_out_channels)")
    if adv.enabled:
        if adv.start_step < 0 or adv.weight < 0 or adv.r1_gamma < 0 or adv.max_weight <= 0 or adv.d_channels < 1:
            raise ConfigError("loss.adversarial: start_step, weight and r1_gamma must be >= 0, max_weight and "
                              "d_channels > 0")


KIND_CHECKS = {"vae": check_vae}
