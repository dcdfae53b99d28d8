"""Collapse diagnostics and differentiable augmentation: unit level (no training)."""
import numpy as np
import pytest
import torch

from data_shards.build import MODE_STD, mode_centers
from trainers.gan.augment import diff_augment, parse_ops
from trainers.gan.diagnostics import CollapseMonitor, PointModes, diversity, expected_distinct


def mixture(source, n, seed=0, modes=None):
    rng = np.random.default_rng(seed)
    centers = mode_centers(source)
    idx = rng.integers(0, len(centers), n) if modes is None else rng.choice(modes, n)
    return (centers[idx] + MODE_STD[source] * rng.standard_normal((n, 2))).astype(np.float32)


@pytest.mark.parametrize("source,k", [("ring8", 8), ("grid25", 25)])
def test_point_modes_on_real_and_collapsed_samples(source, k):
    scorer = PointModes(source)
    real = scorer.score(mixture(source, 2500))
    assert real["modes"] == k and real["high_quality"] > 0.98 and real["coverage"] > 0.99
    assert real["kl_to_real"] < 0.02
    collapsed = scorer.score(mixture(source, 2500, modes=[0, 1]))
    assert collapsed["modes"] == 2 and collapsed["modes_coarse"] == 2 and collapsed["coverage"] < 0.3
    off = scorer.score(mixture(source, 2500) + 0.5)  # every sample between modes
    assert off["high_quality"] == 0.0 and off["modes"] == 0 and off["coverage"] == 0.0
    blurry = scorer.score(mixture(source, 2500) + 0.5 * scorer.coarse_radius)  # not sharp, not collapsed
    assert blurry["high_quality"] < 0.5 and blurry["coverage"] == 1.0


def test_diversity_and_near_duplicates():
    real = torch.randn(64, 3, 8, 8)
    same = diversity(real.clone(), real, 0.05)
    assert abs(same["diag/diversity"] - 1) < 1e-5 and same["diag/near_duplicates"] == 0.0
    one = diversity(real[:1].repeat(64, 1, 1, 1) + 1e-4 * torch.randn(64, 3, 8, 8), real, 0.05)
    assert one["diag/diversity"] < 0.01 and one["diag/near_duplicates"] == 1.0


def test_expected_distinct():
    assert expected_distinct(8, 2500) == pytest.approx(8)
    assert expected_distinct(1000, 500) == pytest.approx(1000 * (1 - 0.999 ** 500))


def test_collapse_monitor_patience_and_warmup(capsys):
    mon = CollapseMonitor(min_coverage=0.5, min_diversity=0.25, after_steps=100, patience=2, is_main=True)
    bad = {"diag/coverage": 0.1, "diag/modes": 1, "diag/num_modes": 8, "diag/diversity": 0.9}
    good = {"diag/coverage": 1.0, "diag/modes": 8, "diag/num_modes": 8, "diag/diversity": 0.9}
    assert mon.update(50, bad) == 0.0 and mon.update(100, good) == 0.0  # warm-up, then healthy
    assert mon.update(150, bad) == 0.0  # patience: one bad diagnostic is not an alert
    assert mon.update(200, bad) == 1.0 and mon.update(250, bad) == 1.0
    out = capsys.readouterr().out
    assert out.count("[gentrain] ALERT: mode collapse") == 1 and "modes covered 1/8" in out
    assert mon.update(300, good) == 0.0 and "cleared" in capsys.readouterr().out
    assert mon.update(350, {"diag/diversity": 0.1}) == 0.0 and mon.update(400, {"diag/diversity": 0.1}) == 1.0


def test_diff_augment_is_seeded_differentiable_and_keeps_shape():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    ops = parse_ops("color,translation,cutout")
    a = diff_augment(x, ops, torch.Generator().manual_seed(3))
    b = diff_augment(x, ops, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, diff_augment(x, ops, torch.Generator().manual_seed(4)))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert parse_ops([]) == () and parse_ops("none") == () and parse_ops(["cutout"]) == ("cutout",)
    with pytest.raises(ValueError):
        parse_ops("flip")
