"""VAE objective pieces: likelihoods in nats, KL, free bits, schedules, diagnostics, slerp."""
import math

import pytest
import torch

from trainers.vae.task import interpolation_smoothness, slerp
from trainers.vae.objective import (active_units, beta_at, kl_per_dim, kl_term, log_normal, mutual_information,
                                    reconstruction_nll)


def test_gaussian_nll_is_the_normal_density():
    x = torch.rand(2, 1, 4, 4)
    logits = torch.randn(2, 1, 4, 4)
    scale = 0.3
    expected = -torch.distributions.Normal(torch.sigmoid(logits), scale).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(reconstruction_nll(logits, x, "gaussian", math.log(scale)), expected, atol=1e-5)


def test_bernoulli_nll_and_errors():
    x = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[0.0, 0.0]]]])
    assert torch.allclose(reconstruction_nll(logits, x, "bernoulli"), torch.tensor([2 * math.log(2)]))
    assert torch.allclose(reconstruction_nll(logits, x, "l1"), torch.tensor([1.0]))
    assert torch.allclose(reconstruction_nll(logits, x, "l2"), torch.tensor([0.5]))


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 5), torch.randn(3, 5)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    assert torch.allclose(kl_per_dim(mean, logvar), torch.distributions.kl_divergence(q, p), atol=1e-5)


def test_free_bits_clamp_after_the_minibatch_average():
    kl = torch.tensor([[0.0, 2.0], [0.2, 2.0]])  # dim 0 averages 0.1 < 0.5, dim 1 averages 2.0
    assert kl_term(kl, 0.0).item() == pytest.approx(2.1)
    assert kl_term(kl, 0.5).item() == pytest.approx(0.5 + 2.0)


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 0, 2.0), ("warmup", 0, 0.0), ("warmup", 50, 1.0), ("warmup", 500, 2.0),
    ("cyclical", 0, 0.0), ("cyclical", 25, 1.0), ("cyclical", 75, 2.0), ("cyclical", 100, 0.0),
])
def test_beta_schedules(schedule, step, expected):
    assert beta_at(step, 2.0, schedule, warmup_steps=100, cycle_steps=100, ramp=0.5) == pytest.approx(expected)


def test_active_units_and_mutual_information_see_collapse():
    informative = torch.randn(256, 4) * 2
    collapsed = torch.zeros(256, 4)
    assert active_units(informative) == 4 and active_units(collapsed) == 0
    g = torch.Generator().manual_seed(0)
    mi_informative = mutual_information(informative, torch.full((256, 4), -4.0), g)
    mi_collapsed = mutual_information(collapsed, torch.zeros(256, 4), g)
    assert mi_informative > 2.0 and abs(mi_collapsed) < 0.1


def test_log_normal_matches_torch():
    z, m, lv = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    ref = torch.distributions.Normal(m, torch.exp(0.5 * lv)).log_prob(z).sum(-1)
    assert torch.allclose(log_normal(z, m, lv), ref, atol=1e-5)


def test_slerp_endpoints_and_norm_and_smoothness():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 2, 8)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    even = torch.linspace(0, 1, 6).view(6, 1, 1, 1, 1).expand(6, 2, 1, 2, 2)
    jumpy = torch.tensor([0, 0, 0, 0, 0, 1.0]).view(6, 1, 1, 1, 1).expand(6, 2, 1, 2, 2)
    assert interpolation_smoothness(even) < 1e-5 < 1.0 < interpolation_smoothness(jumpy)
