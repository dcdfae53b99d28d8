"""A convolutional VAE: encoder -> (mean, log-variance), reparameterised sample, decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.blocks import down_block, num_resolution_steps, to_image, up_block, widths
from models.registry import register


@dataclass
class VAEOutput:
    logits_bchw: torch.Tensor
    """Decoder output: Bernoulli logits, or Gaussian means in logit space (see trainers.vae.task)."""
    mean_bz: torch.Tensor
    logvar_bz: torch.Tensor
    z_bz: torch.Tensor


class ConvVAE(nn.Module):
    """Encoder halves the resolution down to 4x4, a linear layer gives mean and log-variance."""

    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 16, base_channels: int = 32,
                 learn_scale: bool = False, init_scale: float = 0.1):
        super().__init__()
        # One learned log standard deviation for a Gaussian decoder (None when it is fixed).
        # Shape (1,), not (): DeepSpeed broadcasts parameters viewed as bytes, which a 0-d bf16 tensor cannot be.
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init_scale))) if learn_scale else None
        steps = num_resolution_steps(image_size)
        chans = widths(base_channels, steps)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim

        enc = [down_block(channels, chans[0], norm=False)]
        enc += [down_block(chans[i - 1], chans[i]) for i in range(1, steps)]
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_stats = nn.Linear(chans[-1] * 16, 2 * latent_dim)

        self.from_latent = nn.Linear(latent_dim, chans[-1] * 16)
        dec = [up_block(chans[i], chans[i - 1]) for i in range(steps - 1, 0, -1)]
        self.decoder = nn.Sequential(*dec, to_image(chans[0], channels))
        self._base_channels = chans[-1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scale = state_dict.get(prefix + "log_scale")
        if scale is not None and scale.dim() == 0:  # weights saved when log_scale was 0-d
            state_dict[prefix + "log_scale"] = scale.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x) as (mean, log-variance)."""
        mean_bz, logvar_bz = self.to_stats(self.encoder(x_bchw)).chunk(2, dim=1)
        return mean_bz, logvar_bz.clamp(-30.0, 20.0)

    def decode(self, z_bz: torch.Tensor) -> torch.Tensor:
        """Decoder logits for a batch of latents."""
        h = self.from_latent(z_bz).view(-1, self._base_channels, 4, 4)
        return self.decoder(h)

    def forward(self, x_bchw: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mean_bz, logvar_bz = self.encode(x_bchw)
        eps = torch.randn(mean_bz.shape, generator=generator, device=mean_bz.device, dtype=mean_bz.dtype)
        z_bz = mean_bz + eps * torch.exp(0.5 * logvar_bz)
        return VAEOutput(self.decode(z_bz), mean_bz, logvar_bz, z_bz)


@register("vae", "conv")
def build_conv_vae(model, data, learn_scale: bool = False, init_scale: float = 0.1):
    return ConvVAE(data.image_size, data.channels, model.latent_dim, model.base_channels,
                   learn_scale=learn_scale, init_scale=init_scale)
