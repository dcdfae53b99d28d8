"""Plain nn.Modules: they know nothing of training, storage or processes."""
from models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from models.vae import ConvVAE, VAEOutput

__all__ = ["ConvVAE", "VAEOutput", "DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator"]
