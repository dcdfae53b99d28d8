"""Real runs: `gentrain launch` starts 2 torchrun processes with DeepSpeed engines on digit shards."""
import json
import math

import numpy as np
import pytest

from tests.conftest import run_gentrain

pytestmark = pytest.mark.slow

VAE_KEYS = {"step", "loss", "recon_nll", "kl", "neg_elbo_nats_per_dim", "lr", "samples_per_sec", "images_seen"}
DIAGNOSTIC_KEYS = {"active_units", "mutual_info", "kl_dim/00", "interp/smoothness_cv_linear",
                   "interp/smoothness_cv_slerp", "alert/posterior_collapse", "beta"}
GAN_KEYS = {"step", "d_loss", "g_loss", "d_real_logit", "d_fake_logit", "lr_g", "lr_d", "r1", "samples_per_sec"}


def launch(preset, run_dir, shards, *overrides, nproc=2):
    return run_gentrain("launch", "--nproc-per-node", nproc, preset, f"run.dir={run_dir}", f"data.shards={shards}",
                        "data.batch_size=16", "trainer.log_every=2", "trainer.sample_every=4",
                        "trainer.ckpt_every=4", "trainer.progress=false", *overrides)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_run_outputs(run_dir, keys, last_step):
    records = read_metrics(run_dir)
    assert records[-1]["step"] == last_step
    assert keys <= set().union(*records), keys - set().union(*records)
    for rec in records:
        for key, value in rec.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, rec)
    ckpts = run_dir / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert latest.name == f"step-{last_step:07d}" and (latest / "COMPLETE").exists()
    assert (latest / "trainer-rank00000.pt").exists() and (latest / "trainer-rank00001.pt").exists()
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "samples").glob("samples-*.png"))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    # W&B cannot resume an offline run in place: each (re)start writes a segment, all with the run's id.
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert offline and all(p.name.endswith(run_id) for p in offline), offline
    images = list(offline[-1].rglob("media/images/*.png"))
    assert images, "W&B offline run has no logged images"
    return records


def test_vae_two_processes_zero1(tmp_path, digit_shards):
    run_dir = tmp_path / "vae"
    launch("configs/vae_digits.yaml", run_dir, digit_shards, "trainer.max_steps=8", "loss.diagnostics_every=4")
    records = assert_run_outputs(run_dir, VAE_KEYS | DIAGNOSTIC_KEYS, 8)
    assert list((run_dir / "samples").glob("interpolation_slerp-*.png"))
    assert list((run_dir / "samples").glob("reconstructions-*.png"))
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["images_seen"] == 8 * 16 * 2

    # The trained VAE, judged on the shards: bounds, anomaly scores with AUROC, latents.
    metrics_file, scores_file, latents_file = tmp_path / "m.json", tmp_path / "s.csv", tmp_path / "z.npz"
    run_gentrain("evaluate", run_dir, "--out", metrics_file, "--k", 8)
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_samples"] == 1797 and 0 <= metrics["active_units"] <= 16
    assert metrics["iw_nll_k8"] <= metrics["neg_elbo"] + 1e-3  # the IW bound is the tighter one
    out = run_gentrain("anomaly", run_dir, "--shards", digit_shards, "--out", scores_file, "--normal-labels", "0-8")
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["num_anomalies"] == 180 and 0 <= summary["auroc_neg_elbo"] <= 1
    assert len(scores_file.read_text().splitlines()) == 1797 + 1
    run_gentrain("encode", run_dir, "--shards", digit_shards, "--out", latents_file)
    latents = np.load(latents_file)
    assert latents["mean"].shape == latents["std"].shape == (1797, 16) and (latents["std"] > 0).all()


def test_gan_two_processes_zero2_bf16_resumes(tmp_path, digit_shards):
    run_dir = tmp_path / "gan"
    common = ("trainer.zero_stage=2", "trainer.precision=bf16", "loss.r1_every=2")
    launch("configs/gan_digits.yaml", run_dir, digit_shards, "trainer.max_steps=4", *common)
    proc = launch("configs/gan_digits.yaml", run_dir, digit_shards, "trainer.max_steps=8", *common)
    assert "resumed from" in proc.stdout and "step-0000004" in proc.stdout
    records = assert_run_outputs(run_dir, GAN_KEYS, 8)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert [r["step"] for r in records] == [2, 4, 6, 8]

    out = tmp_path / "samples.npz"
    run_gentrain("sample", run_dir, "--n", 10, "--out", out)
    images = np.load(out)["images"]
    assert images.shape == (10, 32, 32, 1) and images.dtype == np.uint8 and images.std() > 0
