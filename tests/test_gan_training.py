"""The GAN trainer's options on real DeepSpeed engines: Wasserstein + WGAN-GP in bf16 under ZeRO-2
with 2 discriminator steps and DiffAugment, 2 processes; config errors caught before training."""
import json
import math

import pytest

from tests.conftest import run_gentrain

pytestmark = pytest.mark.slow


def test_wgan_gp_bf16_zero2_d_steps_and_augment_two_processes(tmp_path, digit_shards):
    run_dir = tmp_path / "wgan"
    run_gentrain("launch", "--nproc-per-node", 2, "configs/gan_digits.yaml", f"run.dir={run_dir}",
                 f"data.shards={digit_shards}", "data.batch_size=16", "trainer.max_steps=4", "trainer.log_every=1",
                 "trainer.sample_every=4", "trainer.ckpt_every=4", "trainer.progress=false",
                 "trainer.zero_stage=2", "trainer.precision=bf16", "loss.loss=wasserstein", "loss.r1_gamma=0",
                 "loss.gp_gamma=10", "loss.r1_every=2", "loss.d_steps=2", "loss.augment=[translation,cutout,color]",
                 "loss.lazy_compensation=true", "diagnostics.every=2", "diagnostics.num_samples=64")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["nonfinite_skipped"] == 0 for r in records)
    assert "gp" in records[1] and "gp" not in records[0]  # lazy: every 2nd step
    assert records[0]["lr_d"] == pytest.approx(2e-4 * 2 / 3)  # StyleGAN2 compensation, c = k/(k+1)
    for rec in records:
        for key, value in rec.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, rec)
    assert {"d_rt", "grad_norm_d", "grad_norm_g", "diag/diversity", "diag/modes", "alert/collapse"} <= records[1].keys()


@pytest.mark.parametrize("override,message", [
    ("loss.d_steps=3", "divisible by loss.d_steps"),
    ("loss.augment=[flip]", "unknown augmentation 'flip'"),
    ("loss.loss=lsgan", "bad value for 'loss.loss'"),
])
def test_bad_gan_options_exit_2_with_one_line(tmp_path, digit_shards, override, message):
    proc = run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={tmp_path / 'r'}", f"data.shards={digit_shards}",
                        "data.batch_size=16", "trainer.max_steps=1", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stdout + proc.stderr


def test_lr_decay_follows_the_schedule_and_resumes_bit_exactly(tmp_path):
    from omegaconf import OmegaConf

    from trainers.runtime.checkpoint import differing_tensors
    from trainers.gan.task import lr_factor

    shards = tmp_path / "ring8"
    run_gentrain("shards", "build", "ring8", "--out", shards, "--num-samples", 2000, "--shard-size", 500, "--quiet")
    common = ("model.g_channels=32", "model.d_channels=32", "data.batch_size=32", "trainer.max_steps=12",
              "trainer.log_every=1", "trainer.ckpt_every=6", "trainer.sample_every=100", "trainer.progress=false",
              "optim.g.lr=1e-3", "optim.lr_decay=cosine", "optim.lr_decay_start=0.25", "optim.lr_decay_final=0.1",
              "diagnostics.every=0", "wandb.mode=disabled", f"data.shards={shards}")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_gentrain("train", "configs/gan_ring8.yaml", f"run.dir={reference}", *common)
    proc = run_gentrain("train", "configs/gan_ring8.yaml", f"run.dir={resumed}", *common,
                        f"trainer.resume={reference / 'checkpoints' / 'step-0000006'}")
    assert "resumed from" in proc.stdout

    records = {r["step"]: r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    schedule = OmegaConf.create({"lr_decay": "cosine", "lr_decay_start": 0.25, "lr_decay_final": 0.1})
    for step in (1, 3, 4, 8, 12):
        assert records[step]["lr_g"] == pytest.approx(1e-3 * lr_factor(schedule, step - 1, 12)), step
    assert records[12]["lr_g"] < 0.15e-3
    differing = differing_tensors(reference / "checkpoints" / "step-0000012", resumed / "checkpoints" / "step-0000012")
    assert not differing, differing[:3]


def test_several_d_steps_in_fp32_log_the_last_d_steps_grad_norm(tmp_path):
    """Plain fp32 engines (ZeRO 0) get their gradient norm from us, measured only on the last of
    the D steps (the one logged): it must still be there, finite, on every step."""
    shards = tmp_path / "ring8"
    run_gentrain("shards", "build", "ring8", "--out", shards, "--num-samples", 512, "--shard-size", 256, "--quiet")
    run_dir = tmp_path / "run"
    run_gentrain("train", "configs/gan_ring8.yaml", f"run.dir={run_dir}", f"data.shards={shards}",
                 "model.g_channels=16", "model.d_channels=16", "data.batch_size=32", "loss.d_steps=2",
                 "trainer.precision=fp32", "trainer.zero_stage=0", "trainer.max_steps=3", "trainer.log_every=1",
                 "trainer.ckpt_every=100", "trainer.sample_every=100", "trainer.progress=false",
                 "diagnostics.every=0", "wandb.mode=disabled")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for rec in records:
        assert math.isfinite(rec["grad_norm_d"]) and rec["grad_norm_d"] > 0, rec
        assert math.isfinite(rec["grad_norm_g"]) and rec["grad_norm_g"] > 0, rec
