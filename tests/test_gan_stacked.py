"""The stacked-digits benchmark's pieces: shards at the preset's resolution, the preset's networks,
and the benchmark's scoring of samples at that resolution."""
import numpy as np
import pytest
import torch

from bench.gan_modes import score
from configs import load_config
from data_shards.build import build_shards
from trainers.gan.task import build_networks
from trainers.judge.probe import read_labelled_images

PRESET = "configs/gan_stacked_digits.yaml"


@pytest.fixture(scope="module")
def stacked_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked")
    build_shards("stacked-digits", out, shard_size=400, num_samples=1200, progress=False)
    return out


def test_default_stacked_shards_match_the_preset(stacked_shards):
    from data_shards.build import read_manifest

    cfg = load_config(PRESET)
    manifest = read_manifest(stacked_shards)
    # Built at the preset's size, the loader decodes without a resize (a quarter of its CPU time).
    assert manifest["image_size"] == cfg.data.image_size == 16
    assert manifest["channels"] == cfg.data.channels == 3


def test_preset_networks_make_and_judge_rgb_images_of_its_size():
    cfg = load_config(PRESET)
    g, d = build_networks(cfg)
    x = g(torch.randn(5, cfg.model.z_dim))
    assert x.shape == (5, 3, cfg.data.image_size, cfg.data.image_size)
    assert d(x).shape == (5,)


def test_bench_scores_real_images_at_their_own_resolution(stacked_shards, tmp_path):
    images, labels = read_labelled_images(stacked_shards, 16, 3)
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=images.transpose(0, 2, 3, 1))  # `gentrain sample` writes NHWC
    s = score("stacked", npz, stacked_shards)
    assert s["probe_accuracy"] > 0.9
    # Real data: (nearly) every distinct label it holds is found again.
    assert s["modes"] >= 0.9 * len(np.unique(labels))
