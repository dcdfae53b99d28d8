"""The data's shape comes from the shards' manifest; class-conditional GANs train on KEY.cls and
sample one class on request."""
import json

import numpy as np
import pytest
import torch

from configs import ConfigError, load_config
from models import DCGANDiscriminator, DCGANGenerator
from tests.conftest import run_gentrain

PHOTO_MANIFEST = {"kind": "image", "image_size": 64, "channels": 3, "num_classes": 12}


def test_unset_shape_and_class_count_come_from_the_manifest():
    notes = []
    cfg = load_config("gan_digits", ["model.conditional=true"], manifest_of=lambda spec: PHOTO_MANIFEST, notes=notes)
    assert (cfg.data.image_size, cfg.data.channels, cfg.model.num_classes) == (64, 3, 12)
    assert notes == []


def test_a_config_that_contradicts_the_manifest_says_so_in_one_line():
    notes = []
    cfg = load_config("gan_digits", ["data.image_size=32"], manifest_of=lambda spec: PHOTO_MANIFEST, notes=notes)
    assert cfg.data.image_size == 32 and cfg.data.channels == 3
    assert notes == ["data.image_size=32 from the config, but the shards hold 64 (manifest.json): "
                     "images are resized as they are read"]


def test_without_a_manifest_the_shape_is_32px_grey():
    cfg = load_config("gan_digits", manifest_of=lambda spec: None)
    assert (cfg.data.image_size, cfg.data.channels, cfg.model.num_classes) == (32, 1, 0)


def test_conditional_without_labels_is_refused():
    with pytest.raises(ConfigError, match="model.conditional=true needs labelled shards"):
        load_config("gan_digits", ["model.conditional=true"], manifest_of=lambda spec: {"kind": "image"})


def test_conditional_mlp_is_refused():
    with pytest.raises(ConfigError, match="model.arch=mlp is unconditional"):
        load_config("gan_ring8", ["model.num_classes=3"])


def test_conditional_dcgan_uses_the_label():
    torch.manual_seed(0)
    g, d = DCGANGenerator(16, 32, 3, 8, num_classes=4), DCGANDiscriminator(32, 3, 8, num_classes=4)
    z = torch.randn(2, 16).repeat(2, 1)
    c = torch.tensor([0, 0, 1, 1])
    x = g(z, c)
    assert x.shape == (4, 3, 32, 32)
    assert not torch.allclose(x[:2], x[2:])  # same z, other class: another image
    logits = d(x[:2].repeat(2, 1, 1, 1), c)
    assert not torch.allclose(logits[:2], logits[2:])  # same image, other class: another logit


def test_the_launcher_prints_the_manifest_note(digit_shards):
    proc = run_gentrain("launch", "--dry-run", "--nproc-per-node", "1", "configs/gan_digits.yaml",
                        f"data.shards={digit_shards}", "data.image_size=16")
    assert "gentrain: note: data.image_size=16 from the config, but the shards hold 32" in proc.stderr


@pytest.mark.slow
def test_conditional_gan_trains_and_samples_a_class(digit_shards, tmp_path):
    run = tmp_path / "cond"
    run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={run}", f"data.shards={digit_shards}",
                 "model.conditional=true", "trainer.max_steps=12", "trainer.log_every=4", "trainer.sample_every=12",
                 "trainer.ckpt_every=12", "trainer.progress=false", "data.batch_size=16", "wandb.mode=disabled",
                 "diagnostics.every=0", "loss.mode_seeking=1.0")
    saved = (run / "config.yaml").read_text()
    assert "num_classes: 10" in saved and "image_size: 32" in saved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in records)
    assert all(r["mode_seeking_ratio"] > 0 for r in records)  # G's pairs (i, i + B/2) were compared

    out = tmp_path / "three.npz"
    proc = run_gentrain("sample", run, "--n", "10", "--out", out, "--class", "3")
    assert "of class 3" in proc.stdout
    data = np.load(out)
    assert data["images"].shape == (10, 32, 32, 1) and (data["labels"] == 3).all()
    mixed = np.load(run_gentrain("sample", run, "--n", "20", "--out", tmp_path / "all.npz") and tmp_path / "all.npz")
    assert sorted(set(mixed["labels"].tolist())) == list(range(10))

    bad = run_gentrain("sample", run, "--n", "4", "--out", tmp_path / "x.npz", "--class", "10", check=False)
    assert bad.returncode == 2 and "the run has classes 0..9" in bad.stderr


@pytest.mark.parametrize("matched", [False, True])
def test_class_matched_pairs_give_each_fake_its_real_partners_class(tmp_path, one_rank, one_thread, monkeypatch,
                                                                    matched):
    """gan_photos (relativistic, conditional, mode seeking): with loss.class_matched_pairs every
    generated sample D scores carries the class of the real image its loss pairs it with, in D's
    update and in G's (where mode seeking makes samples i and i + B/2 share real i's class);
    without it the fake classes are drawn apart from the real ones."""
    from pathlib import Path

    from bench import trainer as bt
    from trainers.runtime.clock import Clock

    b = 16
    small = ("model.g_channels=8", "model.d_channels=8", f"data.batch_size={b}", "loss.r1_every=1",
             f"loss.class_matched_pairs={str(matched).lower()}")
    cfg, _, task, _ = bt.setup("gan_photos", Path(tmp_path), "disabled", small)
    assert cfg.loss.mode_seeking > 0 and cfg.loss.loss == "relativistic"
    d, seen, outputs, paired = task.d.module, [], [], []
    forward, g_loss = d.forward, task.g_rel_loss_fn

    def recording(x, c):
        seen.append(c.clone())
        outputs.append(forward(x, c))
        return outputs[-1]

    monkeypatch.setattr(d, "forward", recording)
    monkeypatch.setattr(task, "g_rel_loss_fn", lambda fake, real: paired.append(real) or g_loss(fake, real))
    batch = bt.synthetic_batch(cfg)
    task.train_step(batch, Clock(images_per_step=b))
    real = batch["label"]
    d_pair, r1, r2, g_fake, g_real = seen  # D's update (real then fake), R1, R2, G's fake, G's real
    assert torch.equal(d_pair[:b], real) and torch.equal(r1, real) and torch.equal(g_real, real)
    assert torch.equal(r2, d_pair[b:]) and torch.equal(g_fake[: b // 2], g_fake[b // 2:])
    partner = torch.cat([torch.arange(b // 2)] * 2)
    assert torch.equal(d_pair[b:], real) == matched
    assert torch.equal(g_fake, real[partner]) == matched
    assert torch.equal(paired[0], outputs[-1][partner] if matched else outputs[-1])  # G's loss pairs the same way
