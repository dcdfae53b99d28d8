"""The typed config tree.

Every run is described by one structured config per kind, `VAEConfig`, `GANConfig` or `PairedConfig`, chosen by
the preset's top-level `kind`. Presets (YAML beside this file) and dotted command-line overrides
are merged onto the schema, so an unknown key or a value of the wrong type is caught before any
process starts. This module imports nothing from the rest of gentrain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from configs.checks import ADA_OPS


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; also the W&B run name."""
    dir: Optional[str] = None
    """Run directory; defaults to runs/<name>."""
    seed: int = 0
    """Seed for weights, latents and the data order (offset per rank)."""


@dataclass
class DataConfig:
    shards: Any = "data/digits"
    """A directory of .tar files, a brace pattern (dir/shard-{000000..000009}.tar) or a list."""
    batch_size: int = 64
    """Samples per process per step."""
    num_workers: int = 1
    """DataLoader worker processes per rank; each reads a disjoint slice of the shards."""
    shuffle_buffer: int = 512
    """Samples held in the shuffle buffer of each worker."""
    image_size: Optional[int] = None
    """Square image size; unset: the size the shards' manifest.json records (32 without one).
    Set to another size, images are resized as they are read (the run says so in one line)."""
    channels: Optional[int] = None
    """1 (grayscale) or 3 (RGB); unset: what the shards' manifest.json records (1 without one)."""


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    """Adam learning rate."""
    betas: List[float] = field(default_factory=lambda: [0.5, 0.99])
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 turns it off (DeepSpeed's default of 1.0 is overridden)."""


@dataclass
class GANOptimConfig:
    g: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Generator optimizer."""
    d: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Discriminator optimizer: its own learning rate and betas (TTUR)."""
    lr_decay: str = "none"
    """Decay of both learning rates over the last part of training, to let G and D settle on
    sharp modes: none, linear or cosine (from each optimizer's lr down to lr * lr_decay_final)."""
    lr_decay_start: float = 0.5
    """Fraction of trainer.max_steps at which the decay begins (constant lr before it)."""
    lr_decay_final: float = 0.0
    """The learning rate at trainer.max_steps, as a fraction of the configured one."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (each step consumes data.batch_size x world samples)."""
    precision: str = "auto"
    """auto (CUDA: bf16 where supported else fp16; CPU: bf16 where the CPU has native bf16, else fp32), bf16, fp16 (CUDA only) or fp32."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel: for networks too small to shard, such as the
    2-D point MLPs), 1 or 2."""
    log_every: int = 20
    """Steps between scalar logs (metrics.jsonl and W&B)."""
    sample_every: int = 250
    """Steps between sample grids (PNG in samples/ and W&B); the last step always writes one."""
    ckpt_every: int = 500
    """Steps between checkpoints; the last step always writes one."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep."""
    resume: str = "auto"
    """auto (continue from the run directory's latest checkpoint if any), never, or a checkpoint path."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    max_nonfinite_in_row: int = 20
    """Non-finite steps (skipped and counted) in a row before rolling back to the last checkpoint."""
    channels_last: bool = False
    """Networks and their image inputs in channels_last memory (oneDNN's direct conv layout on
    CPU, tensor-core friendly on GPU). Same parameters, same function; checkpoints are layout-free."""
    compile: bool = False
    """torch.compile each network (inductor; needs a C++ compiler on CPU). The first compile of a
    shape takes tens of seconds and is cached under ~/.cache/gentrain/inductor."""
    fused_optimizer: bool = True
    """AdamW's fused (single-kernel) implementation where this torch has it for the device, else
    its foreach one."""
    edge_convs_as_gemm: bool = True
    """Convolutions reading or writing a 1-4 channel image run as one matrix product (im2col /
    col2im) instead of oneDNN's direct kernels, which are slow for so few channels. Same
    parameters, same function."""
    keep_host_memory: bool = True
    """CPU: keep freed host memory in the process (glibc mallopt) so each step's activations do
    not page-fault in again."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (no account needed; `wandb sync` later), online, or disabled."""
    project: str = "gentrain"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); None uses the default."""
    tags: List[str] = field(default_factory=list)
    """Tags for the W&B run."""


@dataclass
class MetricsConfig:
    every_kimg: float = 0.0
    """Thousands of images seen between sample-quality measurements during training (FD, KID,
    precision/recall, density/coverage against real images; trainers.judge.live); 0 turns them off."""
    num_samples: int = 1000
    """Generated and real images per measurement (split over the ranks)."""
    extractor: str = "random"
    """Feature extractor: random (fixed-seed conv net), domain (a classifier fitted on the run's
    training shards, kept in RUN_DIR/judge/) or inception:PATH (the FID Inception weights)."""
    shards: Optional[str] = None
    """Real images to compare with; unset: data.shards."""
    best: str = "fd"
    """Keep the checkpoint with the lowest value of this metric (fd or kid) as checkpoints/best;
    empty: keep none."""


@dataclass
class VAEModelConfig:
    arch: str = "conv"
    """conv (the small convolutional VAE) or autoencoder_kl (diffusers' AutoencoderKL, the
    latent-diffusion autoencoder: spatial latents, exports with `--format diffusers`)."""
    latent_dim: int = 16
    """Dimensions of the latent space (conv; autoencoder_kl's is latent_channels x h x w)."""
    base_channels: int = 32
    """Channels of the first encoder block; doubled at each downsampling (conv)."""
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    """autoencoder_kl: channels of each resolution level; every level but the last halves the
    resolution (three levels: 32x32 images -> 8x8 latents)."""
    layers_per_block: int = 1
    """autoencoder_kl: ResNet layers per level (the decoder has one more, as in diffusers)."""
    latent_channels: int = 4
    """autoencoder_kl: channels of the spatial latent (4 in Stable Diffusion's VAE)."""
    norm_num_groups: int = 32
    """autoencoder_kl: GroupNorm groups; must divide every entry of block_out_channels."""
    mid_block_attention: bool = True
    """autoencoder_kl: self-attention in the middle block at the lowest resolution."""


@dataclass
class VAEAdversarialConfig:
    enabled: bool = False
    """Add lambda * L_adv to the VAE loss and train a discriminator (the GAN trainer's DCGAN one,
    its own DeepSpeed engine and AdamW) on data vs reconstructions; no perceptual loss."""
    start_step: int = 0
    """First (0-based) step at which the discriminator trains and the term enters the VAE loss
    (taming's disc_start): the logged adv/* scalars appear from step start_step + 1."""
    weight: float = 0.5
    """Factor on the adaptive weight (taming's disc_weight): lambda = clamp(||grad L_rec|| /
    (||grad L_adv|| + 1e-4), 0, max_weight) * weight, gradients on the decoder's last layer."""
    max_weight: float = 1.0e4
    """Upper clamp of the adaptive ratio before the factor (taming: 1e4)."""
    loss: str = "hinge"
    """Discriminator loss: hinge (taming's default), nonsaturating or wasserstein; the VAE gets the
    matching generator loss (trainers.gan.losses)."""
    d_channels: int = 64
    """Discriminator width."""
    r1_gamma: float = 0.0
    """R1 penalty weight on real data, gamma/2 * E||grad_x D(x)||^2, every step (0 turns it off)."""
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-4, betas=[0.5, 0.9]))
    """The discriminator's optimizer."""


@dataclass
class VAELossConfig:
    likelihood: str = "bernoulli"
    """bernoulli (pixels in [0,1] as probabilities), gaussian (scale fixed or learned), l1 or l2 (errors, not likelihoods)."""
    gaussian_scale: float = 0.1
    """Standard deviation of the Gaussian likelihood when it is fixed."""
    learn_scale: bool = False
    """Gaussian likelihood: learn one log standard deviation instead of gaussian_scale."""
    beta: float = 1.0
    """Weight of the KL term (its maximum, under a schedule)."""
    beta_schedule: str = "constant"
    """constant, warmup (linear 0 -> beta over beta_warmup_steps) or cyclical (Fu et al. 2019)."""
    beta_warmup_steps: int = 1000
    """Steps of the linear warm-up (warmup schedule)."""
    beta_cycle_steps: int = 1000
    """Length of one cycle (cyclical schedule)."""
    beta_cycle_ramp: float = 0.5
    """Fraction of each cycle spent ramping beta up; the rest holds it at beta."""
    free_bits: float = 0.0
    """Nats per latent dimension below which its (minibatch-averaged) KL is not penalised (Kingma et al. 2016)."""
    diagnostics_every: int = 100
    """Steps between posterior diagnostics (KL per dimension, active units, mutual information)."""
    collapse_active_units: int = 0
    """Alert when the active units drop to this number or fewer (posterior collapse)."""
    adversarial: VAEAdversarialConfig = field(default_factory=VAEAdversarialConfig)
    """An optional adversarial term with its own discriminator, as in the latent-diffusion autoencoder."""


@dataclass
class GANModelConfig:
    arch: str = "dcgan"
    """dcgan (images), r3gan (R3GAN-style residual networks), stylegan2 (StyleGAN2-style mapping +
    modulated-conv generator, residual discriminator) or mlp (2-D points)."""
    z_dim: int = 64
    """Dimensions of the generator's input noise."""
    g_channels: int = 64
    """Generator width (channels at the highest resolution x 2^k below it; MLP hidden size)."""
    d_channels: int = 64
    """Discriminator width."""
    conditional: bool = False
    """Class-conditional G and D (label embedding into G, projection D), labels from the shards'
    KEY.cls; the number of classes comes from the manifest unless num_classes is set."""
    num_classes: int = 0
    """Classes for a class-conditional GAN (labels from the shards' KEY.cls); 0 = unconditional
    (or, with model.conditional, the manifest's num_classes)."""
    blocks_per_stage: int = 1
    """r3gan: residual blocks per resolution stage in G and D (R3GAN's configs use 2-4)."""
    cardinality: int = 4
    """r3gan: groups of each residual block's 3x3 conv (ResNeXt cardinality; reduced to a divisor
    of the block's hidden width where it does not divide it)."""
    expansion: int = 1
    """r3gan: hidden width of a residual block as a multiple of its stage's width (R3GAN uses 2)."""
    min_channels: int = 1
    """r3gan: no stage narrower than this (widths otherwise halve at each doubling of resolution;
    R3GAN's own configs keep every stage equally wide)."""
    projection_only: bool = False
    """r3gan, conditional: D's logit is the projection <embed(c), features> alone, as in R3GAN's own
    D, without the class-agnostic linear head beside it (Miyato & Koyama's form, the default)."""
    mapping_layers: int = 2
    """stylegan2: FC layers of the mapping network z -> w (8 in StyleGAN2, 2 in its CIFAR config)."""
    w_dim: int = 128
    """stylegan2: dimensions of the intermediate latent w (512 in StyleGAN2)."""


@dataclass
class GANLossConfig:
    loss: str = "nonsaturating"
    """nonsaturating (logistic, -log D(G(z)) for G), hinge (D: relu(1-r)+relu(1+f); G: -f),
    wasserstein (D: f-r; G: -f; pair it with gp_gamma > 0) or relativistic (R3GAN's pairing loss,
    D: softplus(f-r); G: softplus(r-f); pair it with R1 and R2)."""
    r1_gamma: float = 1.0
    """R1 weight: gamma/2 * E||grad_x D(x)||^2 on real data (0 turns it off); computed in fp32."""
    r2_gamma: float = 0.0
    """R2 weight: the same zero-centred penalty on generated data (0 turns it off); fp32."""
    gp_gamma: float = 0.0
    """WGAN-GP weight lambda: lambda * E(||grad D(x_hat)|| - 1)^2 on random interpolates of real
    and generated data (0 turns it off; 10 in the WGAN-GP paper); fp32."""
    r1_every: int = 4
    """Lazy regularisation interval k for every penalty above (R1, R2, WGAN-GP): they run on every
    k-th step, scaled by k, and D's Adam gets lr*c and betas**c with c = k/(k+1) (StyleGAN2)."""
    lazy_compensation: bool = True
    """Apply StyleGAN2's lr/beta compensation for lazy regularisation (only when r1_every > 1 and a
    penalty is on)."""
    d_steps: int = 1
    """Discriminator updates per generator update. Each loop step's real batch is split into
    d_steps equal chunks, one per D update (data.batch_size must be divisible by d_steps); the
    generator update then uses data.batch_size fresh latents."""
    augment: List[str] = field(default_factory=list)
    """Differentiable augmentation (DiffAugment) applied to real and generated images before D, in
    both phases: any of translation, cutout, color; empty turns it off. Images only."""
    ada_target: float = 0.0
    """Adaptive discriminator augmentation (Karras et al. 2020): the r_t = E[sign(D(real))] (with
    the relativistic loss, of D(real) - D(fake) per pair) it steers toward by raising or lowering
    the augmentation probability p (0.6 in the paper; 0 turns ADA off). The ops of loss.ada_ops on
    every image D sees; the fixed alternative is loss.augment (DiffAugment)."""
    ada_ops: List[str] = field(default_factory=lambda: list(ADA_OPS))
    """ADA's pipeline: any of xflip, translate, rotate90, brightness, contrast, saturation, hue,
    cutout, applied in that order (all by default: StyleGAN2-ADA's bgc pipeline plus cutout)."""
    ada_kimg: float = 100.0
    """ADA speed: p can go from 0 to 1 in this many thousand images (500 in the paper)."""
    ada_interval: int = 4
    """Steps between adjustments of ADA's p."""
    ada_max_p: float = 1.0
    """Upper bound of ADA's p (1: none). p still follows r_t below it; a cap keeps the strongest
    augmentation from washing out what D can tell apart (a conditional D's class evidence)."""
    pl_weight: float = 0.0
    """StyleGAN2's path-length regularisation weight (2 in the paper; 0 off), lazy like R1: every
    loss.pl_every steps on half the batch, scaled by the interval. Generators with a mapping
    network (stylegan2) regularise w; others z."""
    pl_every: int = 4
    """Steps between path-length regularisation steps of G."""
    mode_seeking: float = 0.0
    """Weight of the mode-seeking term (MSGAN, Mao et al. 2019; 0 off): in G's update the second half
    of the batch repeats the first half's labels with other latents, and G also minimises
    1 / (mean|G(z1,c) - G(z2,c)| / mean|z1 - z2|). Counters a conditional G that ignores z and draws
    one image per class (measured on configs/gan_photos.yaml: docs/judging.md)."""
    class_matched_pairs: bool = False
    """Relativistic loss, class-conditional: each generated sample takes the class of the real image
    it is paired with (in D's and G's update), so a pair's margin D(real, c) - D(fake, c) compares
    like with like; off, fake classes are drawn uniformly, independent of the pair (R3GAN's way)."""
    ema_halflife_kimg: float = 2.0
    """Half-life of the generator EMA in thousands of images seen (0 turns EMA off)."""
    ema_rampup: float = 0.05
    """EMA half-life ramp-up as a fraction of images seen (StyleGAN2-ADA); 0 turns it off."""


@dataclass
class GANDiagnosticsConfig:
    every: int = 100
    """Steps between collapse diagnostics (0 turns them off). Cheap ones (logits, r_t) run every step."""
    num_samples: int = 0
    """Generated samples scored for mode coverage per diagnostic; 0 picks 2,500 for 2-D points
    (the VEEGAN/PacGAN protocol) and 500 for images."""
    near_duplicate: float = 0.05
    """Two samples are near-duplicates when closer than this fraction of the real batch's mean
    pairwise distance."""
    alert_min_coverage: float = 0.5
    """Alert when the fraction of modes/classes covered falls below this (where coverage is known)."""
    alert_min_diversity: float = 0.25
    """Alert when generated/real mean pairwise distance falls below this."""
    alert_after_steps: int = 500
    """No alert before this step (a fresh generator is a collapsed blob by construction)."""
    alert_patience: int = 2
    """Consecutive collapsed diagnostics before the alert fires."""


@dataclass
class VAEConfig:
    kind: str = "vae"
    """Which trainer runs this config."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, betas=[0.9, 0.999]))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Sample quality measured during training."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class GANConfig:
    kind: str = "gan"
    """Which trainer runs this config."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GANModelConfig = field(default_factory=GANModelConfig)
    loss: GANLossConfig = field(default_factory=GANLossConfig)
    diagnostics: GANDiagnosticsConfig = field(default_factory=GANDiagnosticsConfig)
    """Collapse diagnostics and the collapse alert."""
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Sample quality measured during training."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PairedModelConfig:
    arch: str = "pix2pix"
    """pix2pix (U-Net generator, PatchGAN discriminator on concat(input, image); Isola et al. 2017) or
    esrgan (residual-in-residual dense block generator, VGG-style discriminator; Wang et al. 2018)."""
    scale: int = 1
    """Target side / input side: 1 (translation, e.g. edges -> photo) or 2, 4, 8 (super-resolution);
    the shards' inputs must be this much smaller than their targets."""
    g_channels: int = 64
    """Generator width (pix2pix: the U-Net's first level, doubling to 8x; esrgan: every RRDB's)."""
    d_channels: int = 64
    """Discriminator width (first layer; doubling per stage, capped at 8x)."""
    d_condition: bool = True
    """The discriminator sees the input (resized nearest to the target's size) beside the image, as
    pix2pix's does; false: the image alone, as ESRGAN's."""
    depth: int = 5
    """pix2pix: U-Net levels (stride-2 convs); data.image_size must be divisible by 2**depth."""
    dropout: float = 0.0
    """pix2pix: dropout in the 3 innermost decoder levels (the paper's 0.5 is its noise source)."""
    d_layers: int = 3
    """pix2pix: stride-2 layers of the PatchGAN (3: 70x70 patches; 2: 34x34)."""
    num_blocks: int = 23
    """esrgan: residual-in-residual dense blocks (23 in ESRGAN)."""
    growth_channels: int = 32
    """esrgan: growth channels of each dense block's convs."""
    upsample: str = "nearest"
    """esrgan: nearest (nearest x2 + conv, ESRGAN) or pixelshuffle (conv to 4x channels + sub-pixel shuffle)."""
    global_skip: bool = True
    """esrgan: output = bicubic(input) + the network's residual (starts as bicubic upsampling)."""


@dataclass
class PairedLossConfig:
    l1_weight: float = 100.0
    """Weight of the pixel loss, mean |G(x) - y| over pixels in [-1, 1] (pix2pix: 100 beside adv 1)."""
    adv_weight: float = 1.0
    """Weight of the adversarial term in G's loss. 0 is the pixel-only baseline: no discriminator
    is built, trained or checkpointed (resuming such a run with adv_weight > 0 starts D fresh)."""
    adv_loss: str = "nonsaturating"
    """nonsaturating (pix2pix), hinge, or relativistic (relativistic average GAN, ESRGAN: D judges
    whether real is more realistic than the average fake and vice versa; G gets both terms)."""
    adv_start_step: int = 0
    """Steps of pixel-only training before D trains and the adversarial term enters G's loss
    (ESRGAN starts its GAN from a PSNR-trained generator)."""
    r1_gamma: float = 0.0
    """R1 weight: gamma/2 * E||grad_image D(image, input)||^2 on real pairs (0 turns it off); fp32."""
    r1_every: int = 16
    """Lazy R1: every k-th step, scaled by k; D's Adam gets StyleGAN2's lr*c, beta**c, c = k/(k+1)."""
    lazy_compensation: bool = True
    """Apply that lr/beta compensation (only when r1_every > 1 and r1_gamma > 0)."""
    feature_weight: float = 0.0
    """Weight of a feature (perceptual) loss: mean |f(G(x)) - f(y)| under feature_net (0: off).
    VGG weights cannot be downloaded here; give a network file instead."""
    feature_net: str = ""
    """The feature network of that loss: inception:PATH (the FID InceptionV3 file), domain:PATH
    (a classifier fitted by trainers.judge.extractors) or random (trainers.judge.extractors)."""
    ema_halflife_kimg: float = 2.0
    """Half-life of the generator EMA in thousands of images (0 turns EMA off); translate uses the EMA."""
    ema_rampup: float = 0.05
    """EMA half-life ramp-up as a fraction of images seen (StyleGAN2-ADA); 0 turns it off."""


@dataclass
class PairedConfig:
    kind: str = "paired"
    """Which trainer runs this config: paired image-to-image (pix2pix, super-resolution)."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/sr4_photos", batch_size=16))
    model: PairedModelConfig = field(default_factory=PairedModelConfig)
    loss: PairedLossConfig = field(default_factory=PairedLossConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """In-training sample quality: not measured for paired runs (metrics.every_kimg must stay 0);
    `python -m bench.translate` judges them on held-out pairs."""


SCHEMAS = {"vae": VAEConfig, "gan": GANConfig, "paired": PairedConfig}

# Allowed values of string-valued options, checked after merging (OmegaConf types only say `str`).
CHOICES = {
    "kind": tuple(SCHEMAS),
    "trainer.precision": ("auto", "bf16", "fp16", "fp32"),
    "trainer.zero_stage": (0, 1, 2),
    "wandb.mode": ("offline", "online", "disabled"),
    "data.channels": (1, 3),
    "loss.likelihood": ("bernoulli", "gaussian", "l1", "l2"),
    "loss.beta_schedule": ("constant", "warmup", "cyclical"),
    "loss.loss": ("nonsaturating", "hinge", "wasserstein", "relativistic"),
    "loss.adversarial.loss": ("nonsaturating", "hinge", "wasserstein"),
    "metrics.best": ("fd", "kid", ""),
}
# Choices that depend on the kind of run.
KIND_CHOICES = {
    "vae": {"model.arch": ("conv", "autoencoder_kl")},
    "gan": {"model.arch": ("dcgan", "mlp", "r3gan", "stylegan2"), "optim.lr_decay": ("none", "linear", "cosine")},
    "paired": {"model.arch": ("pix2pix", "esrgan"), "model.upsample": ("nearest", "pixelshuffle"),
               "loss.adv_loss": ("nonsaturating", "hinge", "relativistic"), "optim.lr_decay": ("none", "linear", "cosine")},
}
