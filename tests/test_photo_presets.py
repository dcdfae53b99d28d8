"""The real-image presets start and train a few steps on CPU (the GPU-sized ones too), on the
photo crops built from the photographs shipped inside installed packages."""
import json
import math

import pytest

from tests.conftest import run_gentrain

PRESETS = ["gan_photos", "gan_photos_stylegan2", "vae_photos", "gan_photos_64", "gan_photos_128", "gan_photos_256"]


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    run_gentrain("shards", "build", "photos", "--out", out / "train", "--image-size", "32", "--num-samples", "256",
                 "--split", "train", "--quiet")
    run_gentrain("shards", "build", "photos", "--out", out / "test", "--image-size", "32", "--num-samples", "64",
                 "--split", "test", "--quiet")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_a_few_steps_on_cpu(preset, photo_shards, tmp_path):
    small = ["data.batch_size=4", "model.g_channels=8", "model.d_channels=8"] if preset.startswith("gan_photos_") and \
        preset != "gan_photos_stylegan2" else ["data.batch_size=8"]
    run = tmp_path / preset
    run_gentrain("train", f"configs/{preset}.yaml", f"run.dir={run}", f"data.shards={photo_shards / 'train'}",
                 f"metrics.shards={photo_shards / 'test'}", "metrics.every_kimg=0.016", "metrics.num_samples=16",
                 "trainer.max_steps=2", "trainer.log_every=1", "trainer.progress=false", "wandb.mode=disabled",
                 "data.num_workers=1", *small)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = "loss" if preset.startswith("vae") else "d_loss"
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r[loss]) for r in records)
    assert any("quality/fd_random" in r for r in records)
