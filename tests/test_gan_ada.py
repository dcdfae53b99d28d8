"""ADA and path-length regularisation inside the real GAN trainer: p moves, is logged, and
resumes exactly; the lazy G regulariser runs on its interval."""
import json

import pytest

from tests.conftest import run_gentrain
from trainers.runtime.checkpoint import differing_tensors

pytestmark = pytest.mark.slow

COMMON = ("trainer.log_every=2", "trainer.sample_every=100", "trainer.progress=false", "data.batch_size=16",
          "wandb.mode=disabled", "diagnostics.every=0", "loss.ada_target=0.2", "loss.ada_kimg=0.5",
          "loss.ada_interval=2", "loss.pl_weight=2", "loss.pl_every=2", "model.arch=stylegan2",
          "model.g_channels=16", "model.d_channels=16", "model.conditional=true")


def train(run, shards, *extra):
    return run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={run}", f"data.shards={shards}", *COMMON, *extra)


def test_ada_p_moves_and_resumes_exactly(digit_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, digit_shards, "trainer.max_steps=12", "trainer.ckpt_every=6")
    train(resumed, digit_shards, "trainer.max_steps=6", "trainer.ckpt_every=6")
    train(resumed, digit_shards, "trainer.max_steps=12", "trainer.ckpt_every=6")
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    # A fresh D calls every real image fake (r_t = -1, below the 0.2 target), so p, starting at 0, may
    # only fall and stays clamped at 0 (tests/test_ada.py checks that it rises when r_t is above).
    assert [r["ada/p"] for r in records] == [0.0] * len(records)
    assert records[0]["ada/rt"] == -1.0 and records[-1]["ada/rt"] > -1.0  # r_t follows D as it learns
    assert all(r["ada/rt"] < 0.2 for r in records)
    assert any("pl_penalty" in r for r in records)
    assert differing_tensors(straight / "checkpoints/step-0000012", resumed / "checkpoints/step-0000012") == []
