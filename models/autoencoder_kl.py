"""The latent-diffusion autoencoder (diffusers' AutoencoderKL) behind the interface of our VAE.

The network *is* a `diffusers.AutoencoderKL`, held as `self.ae`, so its state dict (under the
`ae.` prefix) saves to a diffusers folder that `AutoencoderKL.from_pretrained` loads as is.
This wrapper only adapts conventions:

- pixels: our trainers hand images in [0, 1]; diffusers' encoder takes and its decoder returns
  images in [-1, 1] (its pipelines show `(y / 2 + 0.5).clamp(0, 1)`). So the decoder output is
  a *linear* image, not logits: trainers read it with the `pm1` link (trainers.vae.objective).
- latents: diffusers keeps them spatial, (B, C, h, w); our objective and diagnostics treat a
  latent as a flat vector, so encode() returns (B, C*h*w) and decode() takes the same.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.registry import register
from models.vae import VAEOutput


def autoencoder_kl_config(image_size: int, channels: int, block_out_channels, layers_per_block: int,
                          latent_channels: int, norm_num_groups: int, mid_block_attention: bool) -> dict:
    """The diffusers config of the architecture: one down/up block per entry of block_out_channels,
    every block but the last halving the resolution."""
    levels = len(block_out_channels)
    return {
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": image_size,
        "mid_block_add_attention": mid_block_attention,
    }


class AutoencoderKLVAE(nn.Module):
    """diffusers.AutoencoderKL with encode -> (mean, logvar) and decode -> image in [-1, 1]."""

    link = "pm1"
    """How the decoder output maps to pixels: x = (y + 1) / 2 (see trainers.vae.objective)."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: the conv VAE needs no diffusers

        self.ae = AutoencoderKL(**config)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        size = config["sample_size"]
        self.latent_shape = (config["latent_channels"], size // factor, size // factor)
        self.latent_dim = math.prod(self.latent_shape)
        self.image_size, self.channels = size, config["in_channels"]

    @property
    def last_decoder_layer(self) -> nn.Module:
        """The layer whose output is the decoder output (where the adversarial weight is measured)."""
        return self.ae.decoder.conv_out

    def encode(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x) of images in [0, 1], as flat (mean, log-variance)."""
        posterior = self.ae.encode(x_bchw * 2 - 1).latent_dist
        return posterior.mean.flatten(1), posterior.logvar.flatten(1)

    def decode(self, z_bz: torch.Tensor) -> torch.Tensor:
        """Decoder output for flat latents: an image in [-1, 1] (unclamped)."""
        return self.ae.decode(z_bz.view(-1, *self.latent_shape)).sample

    def forward(self, x_bchw: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mean_bz, logvar_bz = self.encode(x_bchw)
        eps = torch.randn(mean_bz.shape, generator=generator, device=mean_bz.device, dtype=mean_bz.dtype)
        z_bz = mean_bz + eps * torch.exp(0.5 * logvar_bz)
        return VAEOutput(self.decode(z_bz), mean_bz, logvar_bz, z_bz)


@register("vae", "autoencoder_kl")
def build_autoencoder_kl(model, data, **_):
    """The latent-diffusion autoencoder (a Gaussian decoder scale, if asked for, is not learned here)."""
    return AutoencoderKLVAE(autoencoder_kl_config(data.image_size, data.channels, model.block_out_channels,
                                                  model.layers_per_block, model.latent_channels,
                                                  model.norm_num_groups, model.mid_block_attention))
