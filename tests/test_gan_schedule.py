"""The GAN learning-rate decay (optim.lr_decay): its shape, and the config check."""
import pytest
from omegaconf import OmegaConf

from trainers.gan.task import lr_factor


def optim(kind, start=0.5, final=0.0):
    return OmegaConf.create({"lr_decay": kind, "lr_decay_start": start, "lr_decay_final": final})


def test_none_keeps_the_configured_rate():
    assert all(lr_factor(optim("none"), s, 100) == 1.0 for s in range(100))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_is_flat_before_the_start_then_falls_to_the_final_fraction(kind):
    o = optim(kind, start=0.5, final=0.1)
    factors = [lr_factor(o, s, 100) for s in range(101)]
    assert factors[:51] == [1.0] * 51
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert factors[100] == pytest.approx(0.1)
    assert factors[75] == pytest.approx(0.55)  # both shapes pass the midpoint half-way


def test_linear_and_cosine_differ_between_start_and_end():
    assert lr_factor(optim("linear"), 60, 100) == pytest.approx(0.8)
    assert lr_factor(optim("cosine"), 60, 100) == pytest.approx(0.9045, abs=1e-4)


def test_start_zero_decays_from_the_first_step():
    assert lr_factor(optim("linear", start=0.0), 0, 10) == 1.0
    assert lr_factor(optim("linear", start=0.0), 5, 10) == pytest.approx(0.5)
