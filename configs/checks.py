"""Per-kind checks that span several fields (the schema's types and choices cannot express them).

They run in ``configs.load.validate``, so a bad combination stops ``gentrain train``, ``launch``
(before any process starts or any job is submitted), ``sample`` and ``export`` with one line.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from configs.errors import ConfigError

# DiffAugment's ops (trainers.gan.augment implements them under these names).
AUGMENT_OPS = ("color", "translation", "cutout")


def parse_augment_ops(value) -> tuple[str, ...]:
    """loss.augment as a tuple of op names: a list, or a comma-separated string ("" / none: no ops)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    ops = tuple(str(v).strip() for v in items if str(v).strip() and str(v).strip() != "none")
    bad = [op for op in ops if op not in AUGMENT_OPS]
    if bad:
        raise ConfigError(f"bad value for 'loss.augment': unknown augmentation {bad[0]!r}; "
                          f"choose from {', '.join(AUGMENT_OPS)}")
    return ops


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


def check_gan(cfg: DictConfig) -> None:
    """The GAN's cross-field rules: penalty intervals, D steps per batch, the lr schedule, augmentation."""
    loss = cfg.loss
    if cfg.model.num_classes < 0:
        raise ConfigError(f"bad value for 'model.num_classes': {cfg.model.num_classes}; it must be >= 0")
    if cfg.model.num_classes > 0 and cfg.model.arch == "mlp":
        raise ConfigError("model.arch=mlp is unconditional (2-D points): set model.num_classes=0 and "
                          "model.conditional=false")
    if loss.r1_every < 1 or loss.d_steps < 1:
        raise ConfigError(f"loss.r1_every and loss.d_steps must be >= 1, got {loss.r1_every} and {loss.d_steps}")
    if cfg.data.batch_size % loss.d_steps:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by loss.d_steps={loss.d_steps}")
    if min(loss.r1_gamma, loss.r2_gamma, loss.gp_gamma) < 0:
        raise ConfigError("loss.r1_gamma, loss.r2_gamma and loss.gp_gamma must be >= 0")
    ops = parse_augment_ops(loss.augment)
    if not 0.0 <= cfg.optim.lr_decay_start <= 1.0 or cfg.optim.lr_decay_final < 0:
        raise ConfigError("optim.lr_decay_start must be in [0, 1] and optim.lr_decay_final >= 0")
    if ops and cfg.model.arch == "mlp":
        raise ConfigError("loss.augment works on images; the mlp (2-D points) model takes no augmentation")


KIND_CHECKS = {"vae": check_vae, "gan": check_gan}
