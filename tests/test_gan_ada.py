"""ADA and path-length regularisation inside the real GAN trainer: p follows r_t toward the target,
is logged, and resumes exactly; the lazy G regulariser runs on its interval."""
import json

import pytest

from tests.conftest import run_gentrain
from trainers.runtime.checkpoint import differing_tensors

pytestmark = pytest.mark.slow

TARGET, KIMG, INTERVAL, BATCH, CAP = 0.2, 0.5, 2, 16, 0.1
COMMON = ("trainer.log_every=1", "trainer.sample_every=100", "trainer.progress=false", f"data.batch_size={BATCH}",
          "wandb.mode=disabled", "diagnostics.every=0", f"loss.ada_target={TARGET}", f"loss.ada_kimg={KIMG}",
          f"loss.ada_interval={INTERVAL}", f"loss.ada_max_p={CAP}", "loss.pl_weight=2", "loss.pl_every=2",
          "model.conditional=true", "model.g_channels=16", "model.d_channels=16")


def train(run, shards, *extra):
    return run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={run}", f"data.shards={shards}", *COMMON, *extra)


def test_ada_p_follows_r_t_and_resumes_exactly(digit_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, digit_shards, "trainer.max_steps=12", "trainer.ckpt_every=6")
    train(resumed, digit_shards, "trainer.max_steps=6", "trainer.ckpt_every=6")
    train(resumed, digit_shards, "trainer.max_steps=12", "trainer.ckpt_every=6")
    records = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
    move = INTERVAL * BATCH / (KIMG * 1000)  # p moves this much per interval, up if r_t > target, else down
    p = 0.0
    for step in range(1, 13):
        if step % INTERVAL == 0:
            rt = records[step]["ada/rt"]
            p = min(max(p + (move if rt > TARGET else -move), 0.0), CAP)
        assert records[step]["ada/p"] == pytest.approx(p, abs=1e-9), step
    assert max(r["ada/p"] for r in records.values()) == CAP  # loss.ada_max_p reached the trainer's ADA
    assert [s for s, r in records.items() if "pl_penalty" in r] == [2, 4, 6, 8, 10, 12]
    assert differing_tensors(straight / "checkpoints/step-0000012", resumed / "checkpoints/step-0000012") == []
