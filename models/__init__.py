"""Plain nn.Modules: they know nothing of training, storage or processes.

One file per family of networks, each registering its builders under `model.arch` in
models.registry; `build(family, cfg.model, cfg.data)` returns the configured networks.
Shared layers live in models.blocks.
"""
from models import autoencoder_kl, dcgan, mlp, r3gan, rrdb, stylegan2, unet, vae  # noqa: F401 - each registers its architectures
from models.autoencoder_kl import AutoencoderKLVAE  # diffusers is imported only when one is built
from models.dcgan import DCGANDiscriminator, DCGANGenerator
from models.mlp import MLPDiscriminator, MLPGenerator
from models.registry import archs, build, register
from models.vae import ConvVAE, VAEOutput

__all__ = ["ConvVAE", "VAEOutput", "AutoencoderKLVAE", "DCGANGenerator", "DCGANDiscriminator", "MLPGenerator",
           "MLPDiscriminator", "archs", "build", "register"]
