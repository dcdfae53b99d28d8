"""Per-kind checks that span several fields (the schema's types and choices cannot express them).

They run in ``configs.load.validate``, so a bad combination stops ``gentrain train``, ``launch``
(before any process starts or any job is submitted), ``sample`` and ``export`` with one line.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from configs.errors import ConfigError

# DiffAugment's ops (trainers.gan.augment implements them under these names).
AUGMENT_OPS = ("color", "translation", "cutout")
# ADA's pipeline, in the order it applies them (trainers.gan.ada implements them under these names).
ADA_OPS = ("xflip", "translate", "rotate90", "brightness", "contrast", "saturation", "hue", "cutout")


def parse_ops(value, key: str = "loss.augment", choices: tuple[str, ...] = AUGMENT_OPS) -> tuple[str, ...]:
    """An augmentation list (loss.augment, loss.ada_ops) as a tuple of op names: a list, or a
    comma-separated string ("" / none: no ops); an unknown name stops with the valid ones."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    ops = tuple(str(v).strip() for v in items if str(v).strip() and str(v).strip() != "none")
    bad = [op for op in ops if op not in choices]
    if bad:
        raise ConfigError(f"bad value for '{key}': unknown augmentation {bad[0]!r}; choose from {', '.join(choices)}")
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
    # load_config has filled num_classes from the manifest by now: > 0 means class-conditional
    if cfg.model.projection_only and (cfg.model.arch != "r3gan" or cfg.model.num_classes == 0):
        raise ConfigError("model.projection_only is an option of the class-conditional r3gan discriminator: set "
                          "model.arch=r3gan and model.conditional=true, or model.projection_only=false")
    if loss.class_matched_pairs and (loss.loss != "relativistic" or cfg.model.num_classes == 0):
        raise ConfigError("loss.class_matched_pairs pairs real and generated images of one class: it needs "
                          "loss.loss=relativistic and a class-conditional model (model.conditional=true)")
    if loss.r1_every < 1 or loss.d_steps < 1:
        raise ConfigError(f"loss.r1_every and loss.d_steps must be >= 1, got {loss.r1_every} and {loss.d_steps}")
    if cfg.data.batch_size % loss.d_steps:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by loss.d_steps={loss.d_steps}")
    if min(loss.r1_gamma, loss.r2_gamma, loss.gp_gamma) < 0:
        raise ConfigError("loss.r1_gamma, loss.r2_gamma and loss.gp_gamma must be >= 0")
    ops = parse_ops(loss.augment)
    if not 0.0 <= cfg.optim.lr_decay_start <= 1.0 or cfg.optim.lr_decay_final < 0:
        raise ConfigError("optim.lr_decay_start must be in [0, 1] and optim.lr_decay_final >= 0")
    if ops and cfg.model.arch == "mlp":
        raise ConfigError("loss.augment works on images; the mlp (2-D points) model takes no augmentation")
    if loss.ada_target > 0:
        if ops:
            raise ConfigError("loss.ada_target (adaptive augmentation) and loss.augment (fixed DiffAugment) exclude "
                              "each other: set one")
        if (cfg.model.arch == "mlp" or not loss.ada_target < 1 or loss.ada_kimg <= 0 or loss.ada_interval < 1
                or not 0 < loss.ada_max_p <= 1):
            raise ConfigError("ADA needs images, 0 < loss.ada_target < 1, loss.ada_kimg > 0, loss.ada_interval >= 1, "
                              "0 < loss.ada_max_p <= 1")
        if not parse_ops(loss.ada_ops, "loss.ada_ops", ADA_OPS):
            raise ConfigError(f"loss.ada_ops is empty: name at least one of {', '.join(ADA_OPS)} (or set "
                              f"loss.ada_target=0 to turn ADA off)")
    if loss.pl_weight < 0 or loss.pl_every < 1 or (loss.pl_weight > 0 and cfg.model.arch == "mlp"):
        raise ConfigError("loss.pl_weight must be >= 0 (images only) and loss.pl_every >= 1")
    if loss.mode_seeking < 0 or (loss.mode_seeking > 0 and cfg.data.batch_size < 2):
        raise ConfigError("loss.mode_seeking must be >= 0 and needs data.batch_size >= 2 (it compares pairs)")


def check_paired(cfg: DictConfig) -> None:
    """The paired (image-to-image) run's cross-field rules: scale and sizes the networks can take,
    loss weights, the lazy R1 interval and the feature loss's network."""
    m, loss, size = cfg.model, cfg.loss, cfg.data.image_size
    if m.scale not in (1, 2, 4, 8):
        raise ConfigError(f"bad value for 'model.scale': {m.scale}; use 1 (translation) or 2, 4, 8 (super-resolution)")
    if size % m.scale:
        raise ConfigError(f"data.image_size={size} (the target's side) must be divisible by model.scale={m.scale}")
    if m.g_channels < 1 or m.d_channels < 1:
        raise ConfigError("model.g_channels and model.d_channels must be >= 1")
    if m.arch == "pix2pix":
        if m.depth < 1 or size % 2 ** m.depth:
            raise ConfigError(f"model.depth={m.depth}: data.image_size={size} must be divisible by 2**depth "
                              f"({2 ** max(m.depth, 0)}) and depth >= 1")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"bad value for 'model.dropout': {m.dropout}; it must be in [0, 1)")
        if m.d_layers < 1 or size // 2 ** m.d_layers < 3:
            raise ConfigError(f"model.d_layers={m.d_layers}: the PatchGAN needs >= 1 layer and "
                              f"data.image_size / 2**d_layers >= 3 (image size {size})")
    if m.arch == "esrgan":
        if m.num_blocks < 1 or m.growth_channels < 1:
            raise ConfigError("model.num_blocks and model.growth_channels must be >= 1")
        if loss.adv_weight > 0 and (size < 8 or size & (size - 1)):
            raise ConfigError(f"the esrgan discriminator needs data.image_size = 4 x a power of two (8, 16, 32, 64, "
                              f"128 ...), got {size}")
    if min(loss.l1_weight, loss.adv_weight, loss.feature_weight, loss.r1_gamma) < 0 or loss.adv_start_step < 0:
        raise ConfigError("loss.l1_weight, adv_weight, feature_weight, r1_gamma and adv_start_step must be >= 0")
    if loss.l1_weight + loss.adv_weight + loss.feature_weight <= 0:
        raise ConfigError("loss.l1_weight, loss.adv_weight and loss.feature_weight are all 0: nothing to train")
    if loss.r1_every < 1:
        raise ConfigError(f"bad value for 'loss.r1_every': {loss.r1_every}; it must be >= 1")
    if loss.feature_weight > 0 and not str(loss.feature_net).strip():
        raise ConfigError("loss.feature_weight > 0 needs loss.feature_net: inception:PATH, domain:PATH or random")
    if not 0.0 <= cfg.optim.lr_decay_start <= 1.0 or cfg.optim.lr_decay_final < 0:
        raise ConfigError("optim.lr_decay_start must be in [0, 1] and optim.lr_decay_final >= 0")
    metrics = cfg.get("metrics")
    if metrics is not None and metrics.get("every_kimg", 0) > 0:
        raise ConfigError("metrics.every_kimg: in-training sample quality is not measured for paired runs; "
                          "judge them with `python -m bench.translate` (held-out pairs)")


KIND_CHECKS = {"vae": check_vae, "gan": check_gan, "paired": check_paired}
