"""Sample-quality metrics where users meet them: `gentrain evaluate`, and during training with the
best checkpoint kept."""
import json

import numpy as np
import pytest

from tests.conftest import run_gentrain
from trainers.judge import quality
from trainers.judge.extractors import get_extractor

TRAIN = ("trainer.log_every=4", "trainer.sample_every=100", "trainer.ckpt_every=8", "trainer.keep_checkpoints=1",
         "trainer.progress=false", "data.batch_size=16", "wandb.mode=disabled", "diagnostics.every=0")


def test_metric_names_are_checked():
    assert quality.parse_metrics("fd, kid") == ("fd", "kid")
    with pytest.raises(ValueError, match="unknown metric 'fid'; choose from fd,kid,pr,dc"):
        quality.parse_metrics("fd,fid")


def test_reference_features_are_cached_by_the_manifest(digit_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("GENTRAIN_CACHE", str(tmp_path))
    extractor = get_extractor("random")
    first = quality.reference_features(digit_shards, extractor, 64, 32, 1)
    cached = list((tmp_path / "reference").glob("random-*.npy"))
    assert first.shape == (64, extractor.dim) and len(cached) == 1
    cached[0].write_bytes(b"")  # a second call must read the cache, not recompute: an empty file fails loudly
    with pytest.raises(Exception):
        quality.reference_features(digit_shards, extractor, 64, 32, 1)
    other = quality.reference_features(digit_shards, extractor, 32, 32, 1)  # another n: another entry
    assert other.shape[0] == 32 and len(list((tmp_path / "reference").glob("random-*.npy"))) == 2


@pytest.mark.slow
def test_quality_during_training_keeps_the_best_and_changes_nothing(digit_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("GENTRAIN_CACHE", str(tmp_path / "cache"))
    with_metrics, without = tmp_path / "with", tmp_path / "without"
    for run, extra in ((with_metrics, ["metrics.every_kimg=0.128", "metrics.num_samples=64"]), (without, [])):
        run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={run}", f"data.shards={digit_shards}",
                     "trainer.max_steps=24", *TRAIN, *extra, env={"GENTRAIN_CACHE": str(tmp_path / "cache")})
    records = [json.loads(line) for line in (with_metrics / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "quality/fd_random" in r]
    assert [r["step"] for r in measured] == [8, 16, 24]  # 128 images = 8 steps of 16
    for key in ("kid_random", "kid_random_std", "precision_random", "recall_random", "density_random",
                "coverage_random"):
        assert all(np.isfinite(r[f"quality/{key}"]) for r in measured), key
    best = json.loads((with_metrics / "checkpoints" / "best" / "BEST.json").read_text())
    fds = {r["step"]: r["quality/fd_random"] for r in measured}
    assert best["metric"] == "fd_random" and best["value"] == min(fds.values())
    assert best["step"] == min(fds, key=fds.get)
    assert (with_metrics / "checkpoints" / "best" / "weights.safetensors").is_file()  # keep-k=1 did not prune it

    from trainers.runtime.checkpoint import differing_tensors
    last = "checkpoints/step-0000024"
    assert differing_tensors(with_metrics / last, without / last) == []  # measuring changed nothing


@pytest.mark.slow
def test_evaluate_writes_the_field_metrics(digit_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("GENTRAIN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "vae"
    run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={run}", f"data.shards={digit_shards}",
                 "trainer.max_steps=8", *TRAIN[:-1])
    out = tmp_path / "metrics.json"
    run_gentrain("evaluate", run, "--shards", digit_shards, "--n", "100", "--k", "2", "--out", out,
                 "--metrics", "fd,kid,pr,dc", "--extractor", "random")
    got = json.loads(out.read_text())
    for key in ("fd_random", "kid_random", "kid_random_std", "precision_random", "recall_random",
                "density_random", "coverage_random", "psnr", "ssim", "recon_fd_random", "neg_elbo"):
        assert np.isfinite(got[key]), key
    assert got["n"] == 100 and got["fd_random"] > 0 and 0 <= got["ssim"] <= 1
    bad = run_gentrain("evaluate", run, "--out", out, "--metrics", "fid", check=False)
    assert bad.returncode == 2 and "unknown metric 'fid'" in bad.stderr
