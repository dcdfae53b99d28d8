"""GAN objectives and the R1 penalty: values, fp32 under low precision, gradient flow."""
import math

import torch

from models import DCGANDiscriminator, MLPDiscriminator
from trainers.ema import EMA
from trainers.gan_losses import d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty


def test_nonsaturating_losses_at_chance():
    zeros = torch.zeros(8)
    assert math.isclose(d_loss_nonsaturating(zeros, zeros).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(g_loss_nonsaturating(zeros).item(), math.log(2), rel_tol=1e-6)


def test_r1_matches_the_closed_form_for_a_linear_discriminator():
    d = torch.nn.Linear(3, 1)
    x = torch.randn(5, 3)
    expected = d.weight.square().sum()  # grad_x (w.x + b) = w for every sample
    got = r1_penalty(torch.nn.Sequential(d, torch.nn.Flatten(0)), x)
    assert torch.allclose(got, expected)


def test_r1_is_fp32_and_reaches_bf16_parameters():
    torch.manual_seed(0)
    d32 = DCGANDiscriminator(16, 1, 8)
    d16 = DCGANDiscriminator(16, 1, 8).to(torch.bfloat16)
    d16.load_state_dict({k: v.to(torch.bfloat16) for k, v in d32.state_dict().items()})
    x = torch.randn(4, 1, 16, 16)
    r1_low = r1_penalty(d16, x.to(torch.bfloat16))
    assert r1_low.dtype == torch.float32
    # Same bf16-rounded weights evaluated in fp32: the penalty must match an fp32 computation.
    d_ref = DCGANDiscriminator(16, 1, 8)
    d_ref.load_state_dict({k: v.float() for k, v in d16.state_dict().items()})
    assert torch.allclose(r1_low, r1_penalty(d_ref, x.to(torch.bfloat16).float()), rtol=1e-5)
    r1_low.backward()
    # Every weight shapes grad_x D; biases do not, so autograd leaves them without a gradient.
    grads = [p.grad for name, p in d16.named_parameters() if name.endswith("weight")]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    assert sum(g.float().abs().sum() for g in grads) > 0


def test_ema_tracks_with_half_life_in_images():
    net = MLPDiscriminator(4)
    ema = EMA(net, halflife_kimg=0.1, rampup=0.0)  # half-life: 100 images
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, images_per_step=100, images_seen=100)  # one half-life: halfway to the new weights
    for p_ema, p in zip(ema.module.parameters(), net.parameters()):
        assert torch.allclose(p_ema, p - 0.5, atol=1e-6)
