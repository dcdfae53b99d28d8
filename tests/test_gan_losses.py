"""GAN objectives and the R1 penalty: values, fp32 under low precision, gradient flow."""
import math

import torch

from models import DCGANDiscriminator, MLPDiscriminator
from trainers.gan.ema import EMA
from trainers.gan.losses import d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty


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


def test_hinge_and_wasserstein_losses():
    from trainers.gan.losses import d_loss_hinge, d_loss_wasserstein, g_loss_linear

    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert math.isclose(d_loss_hinge(real, fake).item(), (0 + 0.5) / 2 + (0 + 1) / 2)
    assert math.isclose(d_loss_wasserstein(real, fake).item(), -1.0 - 1.25)
    assert math.isclose(g_loss_linear(fake).item(), 1.0)
    assert d_loss_hinge(real.bfloat16(), fake.bfloat16()).dtype == torch.float32


def test_r2_and_wgan_gp_closed_forms_for_a_linear_discriminator():
    from trainers.gan.losses import r2_penalty, wgan_gp_penalty

    d = torch.nn.Linear(3, 1)
    net = torch.nn.Sequential(d, torch.nn.Flatten(0))
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    w2 = d.weight.square().sum()
    assert torch.allclose(r2_penalty(net, y), w2)
    gp = wgan_gp_penalty(net, x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(gp, (w2.sqrt() - 1).square())  # the gradient is w at every interpolate
    gp.backward()
    assert d.weight.grad is not None and torch.isfinite(d.weight.grad).all()


def test_wgan_gp_is_finite_in_bf16_where_a_bf16_norm_is_not():
    from trainers.gan.losses import wgan_gp_penalty

    torch.manual_seed(0)
    d = DCGANDiscriminator(16, 1, 8)
    with torch.no_grad():  # a critic with huge weights: its input gradient overflows bf16's square
        for p in d.parameters():
            p.mul_(400.0)
    d16 = d.to(torch.bfloat16)
    real, fake = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    gp = wgan_gp_penalty(d16, real.bfloat16(), fake.bfloat16(), torch.Generator().manual_seed(1))
    assert gp.dtype == torch.float32 and torch.isfinite(gp)
    gp.backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in d16.parameters() if p.grad is not None)


def test_lazy_regularisation_compensation_matches_stylegan2():
    from trainers.gan.losses import lazy_adam_compensation

    lr, betas = lazy_adam_compensation(0.002, (0.0, 0.99), 16)  # StyleGAN2: D reg every 16 steps
    c = 16 / 17
    assert math.isclose(lr, 0.002 * c) and betas == (0.0, 0.99 ** c)
    assert lazy_adam_compensation(1e-3, (0.5, 0.9), 1) == (1e-3, (0.5, 0.9))


def test_ema_beta_is_stylegan2_ada_formula_with_rampup():
    net = MLPDiscriminator(4)
    ema = EMA(net, halflife_kimg=10.0, rampup=0.05)
    # StyleGAN2-ADA training_loop: ema_nimg = min(ema_kimg*1000, cur_nimg*ema_rampup);
    # ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    for seen in (0, 64, 64_000, 10_000_000):
        expected = 0.5 ** (64 / max(min(10_000.0, seen * 0.05), 1e-8))
        assert math.isclose(ema.beta(64, seen), expected)
    assert ema.beta(64, 0) == 0.0  # first step: copy the generator


def test_mode_seeking_loss_is_small_for_diverse_pairs_and_large_for_collapsed_ones():
    from trainers.gan.losses import mode_seeking_loss

    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 3 * 2 * 2, generator=torch.Generator().manual_seed(1))
    diverse = (z @ w).view(8, 3, 2, 2)
    collapsed = diverse.mean(0, keepdim=True).expand(8, 3, 2, 2) + 1e-3 * diverse
    loss_diverse, ratio = mode_seeking_loss(diverse, z)
    loss_collapsed, _ = mode_seeking_loss(collapsed, z)
    pairs = [((diverse[i] - diverse[i + 4]).abs().mean() / (z[i] - z[i + 4]).abs().mean()).item() for i in range(4)]
    assert math.isclose(ratio.item(), sum(pairs) / 4, rel_tol=1e-5)  # the pairs are (i, i + B/2)
    assert math.isclose(loss_diverse.item(), 1 / (ratio.item() + 1e-5), rel_tol=1e-5)
    assert loss_collapsed.item() > 100 * loss_diverse.item()
    assert not ratio.requires_grad
