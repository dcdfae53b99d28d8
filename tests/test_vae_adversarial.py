"""The VAE's adversarial term: the adaptive weight (unit), and a real run that uses it (slow)."""
import json
import math

import pytest
import torch

from models import ConvVAE
from models.autoencoder_kl import AutoencoderKLVAE, autoencoder_kl_config
from tests.conftest import run_gentrain
from trainers.runtime.checkpoint import differing_tensors
from trainers.vae.task import last_decoder_layer
from trainers.vae.adversarial import adaptive_weight
from trainers.vae.objective import reconstruction_nll


def test_adaptive_weight_is_the_ratio_of_the_last_layer_gradient_norms():
    w = torch.randn(2, 3, requires_grad=True)
    a, b = torch.tensor([[3.0, 0, 0], [0, 4.0, 0]]), torch.tensor([[0, 0, 1.0], [0, 1.0, 0]])
    rec, adv = (w * a).sum(), (w * b).sum()  # grad_w rec = a (norm 5), grad_w adv = b (norm sqrt 2)
    weight = adaptive_weight(rec, adv, w)
    assert weight.item() == pytest.approx(5.0 / (math.sqrt(2) + 1e-4), rel=1e-6)
    assert not weight.requires_grad  # detached: the weight is a number, not a path for gradients
    (rec + weight * adv).backward()  # both graphs were kept for the single backward that follows
    assert torch.allclose(w.grad, a + weight * b)


def test_adaptive_weight_is_clamped():
    w = torch.randn(4, requires_grad=True)
    rec, flat_adv = (w * 100.0).sum(), (w * 0.0).sum()  # a discriminator that does not care yet
    assert adaptive_weight(rec, flat_adv, w, max_weight=1e4).item() == 1e4
    assert adaptive_weight((w * 0.0).sum(), (w * 3.0).sum(), w).item() == 0.0  # and never below 0


@pytest.mark.parametrize("arch", ["conv", "autoencoder_kl"])
def test_side_graph_gives_the_last_layer_gradient_of_the_full_graph(arch):
    """The trainer measures grad_w on decode(z.detach()), not through the engine's outputs: the
    last layer's weight must get exactly the gradient the full encoder-decoder graph gives it."""
    torch.manual_seed(0)
    if arch == "conv":
        vae, link = ConvVAE(16, 1, latent_dim=4, base_channels=8), "sigmoid"
    else:
        vae, link = AutoencoderKLVAE(autoencoder_kl_config(16, 1, [8, 16], 1, 2, 8, False)), "pm1"
    x = torch.rand(3, 1, 16, 16)
    out = vae(x, generator=torch.Generator().manual_seed(1))
    w = last_decoder_layer(vae).weight
    (full,) = torch.autograd.grad(reconstruction_nll(out.logits_bchw, x, "l2", link=link).mean(), w)
    side = vae.decode(out.z_bz.detach())
    (from_side,) = torch.autograd.grad(reconstruction_nll(side, x, "l2", link=link).mean(), w)
    assert torch.allclose(full, from_side, rtol=1e-5, atol=1e-7)


def _train(run_dir, shards, max_steps, adversarial=True):
    """One process (`gentrain train`, no torchrun: the launch tests cover that), ZeRO-2."""
    return run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={run_dir}",
                        f"data.shards={shards}", "data.batch_size=16", "data.shuffle_buffer=64",
                        "model.base_channels=16", "trainer.zero_stage=2", "trainer.log_every=1",
                        "trainer.sample_every=100", "trainer.ckpt_every=3", "trainer.progress=false",
                        f"loss.adversarial.enabled={str(adversarial).lower()}", "loss.adversarial.start_step=2",
                        "loss.adversarial.d_channels=16", "loss.adversarial.r1_gamma=0.1",
                        "loss.diagnostics_every=100", f"trainer.max_steps={max_steps}")


@pytest.mark.slow
def test_vae_with_the_adversarial_term_trains_logs_and_resumes_exactly(tmp_path, digit_shards):
    """ZeRO-2 (one backward per engine per step): finite losses, adv/* scalars only after
    start_step, the discriminator in the checkpoint and a bitwise-exact resume."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _train(reference, digit_shards, 6)
    _train(resumed, digit_shards, 3)
    proc = _train(resumed, digit_shards, 6)
    assert "resumed from" in proc.stdout

    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for rec in records:
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)), rec
        has_adv = {"adv/weight", "adv/g_loss", "adv/d_loss", "adv/logits_real", "adv/logits_fake"} <= set(rec)
        assert has_adv == (rec["step"] > 2), rec  # start_step=2 is 0-based: on from the third step
        if has_adv:
            assert 0 <= rec["adv/weight"] <= 0.5 * 1e4 and rec.get("nonfinite_skipped", 0) == 0

    final = reference / "checkpoints" / "step-0000006"
    assert (final / "disc" / "state").is_dir() and (final / "vae" / "state").is_dir()
    differing = differing_tensors(final, resumed / "checkpoints" / "step-0000006")
    assert not differing, f"{len(differing)} tensors differ after resuming, e.g. {differing[:3]}"


@pytest.mark.slow
def test_switching_the_adversarial_term_on_in_a_resumed_run_starts_its_discriminator_fresh(tmp_path, digit_shards):
    """A run trained without the term, resumed with it on: the VAE resumes from its checkpoint,
    the discriminator (which the checkpoint cannot hold) starts as initialised, and the term trains."""
    run_dir = tmp_path / "run"
    _train(run_dir, digit_shards, 3, adversarial=False)
    assert not (run_dir / "checkpoints" / "step-0000003" / "disc").exists()
    proc = _train(run_dir, digit_shards, 5)
    assert "resumed from" in proc.stdout and "'disc' starts fresh" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 6))
    assert all("adv/d_loss" in r and math.isfinite(r["adv/d_loss"]) for r in records[3:]), records[3:]
    assert (run_dir / "checkpoints" / "step-0000005" / "disc" / "state").is_dir()
