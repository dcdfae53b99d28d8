"""Model shapes follow the config's resolution and channels; bad sizes are refused."""
import pytest
import torch

from models import ConvVAE, DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator


@pytest.mark.parametrize("size, channels", [(16, 1), (32, 1), (32, 3), (64, 3)])
def test_vae_shapes(size, channels):
    vae = ConvVAE(size, channels, latent_dim=8, base_channels=8)
    x = torch.rand(3, channels, size, size)
    out = vae(x)
    assert out.logits_bchw.shape == x.shape
    assert out.mean_bz.shape == out.logvar_bz.shape == out.z_bz.shape == (3, 8)
    assert vae.decode(torch.randn(5, 8)).shape == (5, channels, size, size)


def test_vae_sample_is_reparameterised():
    vae = ConvVAE(16, 1, latent_dim=4, base_channels=8)
    x = torch.rand(2, 1, 16, 16)
    a = vae(x, generator=torch.Generator().manual_seed(0))
    b = vae(x, generator=torch.Generator().manual_seed(0))
    c = vae(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.z_bz, b.z_bz) and not torch.equal(a.z_bz, c.z_bz)
    a.z_bz.sum().backward()  # gradients reach the encoder through the sample
    assert vae.to_stats.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_dcgan_shapes_and_range(size, channels):
    g, d = DCGANGenerator(16, size, channels, 8), DCGANDiscriminator(size, channels, 8)
    x = g(torch.randn(4, 16))
    assert x.shape == (4, channels, size, size) and x.abs().max() <= 1
    assert d(x).shape == (4,)


def test_mlp_gan_shapes():
    g, d = MLPGenerator(8, 32), MLPDiscriminator(32)
    assert g(torch.randn(5, 8)).shape == (5, 2) and d(torch.randn(5, 2)).shape == (5,)


@pytest.mark.parametrize("size", [12, 48, 4])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="not 4 x a power of two"):
        ConvVAE(size, 1)
