"""The collapse alert on real runs: it fires on a collapsing GAN and stays quiet on a healthy one.

Both runs are the same small MLP GAN on grid25 (25 Gaussians) with diagnostics every 50 steps;
the collapsing one freezes the discriminator (optim.d.lr=0): G then climbs a fixed random D
and all its samples drift, together, away from every mode. The healthy one (same seed and
data) covers all 25 modes coarsely from step 150 on. Note that a young grid25 GAN at this
learning rate is not always healthy: other data orders measured 2-8 of 25 modes at step 400,
and the alert rightly fires on those.
"""
import json

import pytest

from tests.conftest import run_gentrain

pytestmark = pytest.mark.slow

COMMON = ("model.arch=mlp", "model.z_dim=16", "model.g_channels=128", "model.d_channels=128",
          "data.batch_size=64", "optim.g.lr=3e-3", "optim.d.lr=3e-3",
          "loss.r1_gamma=0.01", "loss.ema_halflife_kimg=0", "diagnostics.every=50",
          "diagnostics.alert_after_steps=150", "diagnostics.alert_patience=2", "trainer.max_steps=200",
          "trainer.precision=fp32", "trainer.log_every=50", "trainer.sample_every=1000",
          "trainer.ckpt_every=1000", "trainer.progress=false", "wandb.mode=offline",
          "optim.lr_decay=none")  # the preset's end-of-training decay would change these short runs


@pytest.fixture(scope="module")
def grid_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid25")
    run_gentrain("shards", "build", "grid25", "--out", out, "--num-samples", 20000, "--shard-size", 2500, "--quiet")
    return out


def train(run_dir, shards, *overrides):
    proc = run_gentrain("train", "configs/gan_grid25.yaml", f"run.dir={run_dir}", f"data.shards={shards}",
                        *COMMON, *overrides, env={"OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, {r["step"]: r for r in records}


def test_alert_fires_when_the_generator_collapses(tmp_path, grid_shards):
    out, records = train(tmp_path / "collapse", grid_shards, "optim.d.lr=0")
    assert "[gentrain] ALERT: mode collapse" in out and "at step 150" in out
    assert records[150]["alert/collapse"] == 1.0 and records[200]["alert/collapse"] == 1.0
    assert records[200]["diag/modes_coarse"] == 0 and records[200]["diag/diversity"] < 0.25


def test_alert_stays_quiet_on_a_healthy_run(tmp_path, grid_shards):
    out, records = train(tmp_path / "healthy", grid_shards)
    assert "ALERT" not in out
    assert all(r["alert/collapse"] == 0.0 for r in records.values())
    assert records[200]["diag/modes_coarse"] >= 20 and records[200]["diag/diversity"] > 0.5
    for key in ("d_rt", "grad_norm_g", "grad_norm_d", "diag/near_duplicates", "diag/high_quality"):
        assert key in records[200], key
