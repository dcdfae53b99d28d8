"""Plain nn.Modules: they know nothing of training, storage or processes."""
from models.autoencoder_kl import AutoencoderKLVAE  # diffusers is imported only when one is built
from models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from models.vae import ConvVAE, VAEOutput

__all__ = ["ConvVAE", "VAEOutput", "AutoencoderKLVAE", "DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator"]
