"""Tests for data_shards.build: sources -> deterministic WebDataset tars + manifest."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.build import MODE_STD, build_shards, mode_centers, parse_labels, read_manifest
from tests.conftest import ROOT


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one shard."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples[key][ext] = tar.extractfile(info).read()
    return dict(samples)


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(out.glob("shard-*.tar")):
        samples.update(read_tar(shard))
    return samples


def test_digits_shards_counts_hashes_and_classes(tmp_path):
    manifest = build_shards("digits", tmp_path, shard_size=500, progress=False)

    assert manifest["num_samples"] == 1797
    assert manifest["num_shards"] == 4
    assert [s["num_samples"] for s in manifest["shards"]] == [500, 500, 500, 297]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    for shard in manifest["shards"]:
        data = (tmp_path / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    assert read_manifest(tmp_path) == manifest
    assert manifest["kind"] == "image" and manifest["format"] == "png"
    assert manifest["channels"] == 1 and manifest["image_size"] == 32
    assert manifest["num_classes"] == 10 and sum(manifest["class_counts"].values()) == 1797
    assert manifest["skipped"] == 0 and manifest["seed"] == 0

    # The shuffle before sharding puts every class in every shard.
    for shard in manifest["shards"]:
        samples = read_tar(tmp_path / shard["name"])
        assert {int(s["cls"]) for s in samples.values()} == set(range(10))
    sample = next(iter(read_tar(tmp_path / "shard-000000.tar").values()))
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.mode == "L" and image.size == (32, 32)


def test_build_is_byte_for_byte_deterministic(tmp_path):
    first = build_shards("digits", tmp_path / "a", shard_size=100, num_samples=250, progress=False)
    second = build_shards("digits", tmp_path / "b", shard_size=100, num_samples=250, progress=True)
    other_seed = build_shards("digits", tmp_path / "c", shard_size=100, num_samples=250, seed=1, progress=False)

    assert first == second
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert first["shards"][0]["sha256"] != other_seed["shards"][0]["sha256"]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in tar)


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path):
    build_shards("digits", tmp_path, shard_size=50, num_samples=200, progress=False)
    manifest = build_shards("digits", tmp_path, shard_size=100, num_samples=200, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert manifest["num_shards"] == 2


def test_stacked_digits_are_rgb_with_three_digit_labels(tmp_path):
    manifest = build_shards("stacked-digits", tmp_path, shard_size=60, num_samples=150, image_size=16, progress=False)
    assert manifest["num_samples"] == 150 and manifest["num_shards"] == 3
    assert manifest["channels"] == 3 and manifest["num_classes"] == 1000
    for sample in read_all(tmp_path).values():
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (16, 16)
        assert 0 <= int(sample["cls"]) <= 999


@pytest.mark.parametrize("source, n_modes", [("ring8", 8), ("grid25", 25)])
def test_point_sources_sit_on_their_modes(tmp_path, source, n_modes):
    manifest = build_shards(source, tmp_path, shard_size=400, num_samples=1000, progress=False)
    assert manifest["kind"] == "points" and manifest["format"] == "npy"
    assert manifest["image_size"] is None and manifest["channels"] is None
    assert manifest["num_classes"] == n_modes and manifest["num_shards"] == 3

    samples = read_all(tmp_path)
    points = np.stack([np.load(io.BytesIO(s["npy"])) for s in samples.values()])
    modes = np.array([int(s["cls"]) for s in samples.values()])
    assert points.dtype == np.float32 and points.shape == (1000, 2)
    distance = np.linalg.norm(points - mode_centers(source)[modes], axis=1)
    assert distance.max() < 6 * MODE_STD[source]
    assert set(modes) == set(range(n_modes))


def _write_image(path: Path, size: tuple[int, int], mode: str = "RGB", color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color[0] if mode == "L" else color if mode == "RGB" else (*color, 255)
    Image.new(mode, size, fill).save(path)


def _three_band_image(path: Path) -> None:
    """60x20: red | green | blue thirds. A centre crop to a square keeps only green."""
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, :20, 0] = array[:, 20:40, 1] = array[:, 40:, 2] = 255
    Image.fromarray(array).save(path)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    _write_image(root / "cats" / "a.png", (40, 30))
    _write_image(root / "cats" / "b.jpg", (30, 50))
    _write_image(root / "cats" / "deep" / "c.png", (16, 16), mode="L")
    _write_image(root / "dogs" / "d.PNG", (64, 64), mode="RGBA")
    _write_image(root / "dogs" / "e.bmp", (20, 20))
    _three_band_image(root / "dogs" / "bands.png")
    (root / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_folder_source_labels_resizes_and_skips_corrupt(tmp_path, image_tree, image_format):
    out = tmp_path / "out"
    manifest = build_shards(
        f"folder:{image_tree}", out, shard_size=4, image_size=16, image_format=image_format, progress=False
    )
    assert manifest["classes"] == ["cats", "dogs"] and manifest["num_classes"] == 2
    assert manifest["skipped"] == 1 and manifest["skipped_files"] == ["dogs/corrupt.png"]
    assert manifest["num_samples"] == 6 and manifest["num_shards"] == 2
    assert manifest["class_counts"] == {"0": 3, "1": 3}
    assert manifest["channels"] == 3 and manifest["format"] == image_format

    samples = read_all(out)
    assert len(samples) == 6
    for sample in samples.values():
        image = Image.open(io.BytesIO(sample[image_format]))
        assert image.mode == "RGB" and image.size == (16, 16)
    # The three-band image is the only one with green dominating after a centre crop.
    greens = [s for s in samples.values() if np.asarray(Image.open(io.BytesIO(s[image_format])))[..., 1].mean() > 200]
    assert len(greens) == 1 and int(greens[0]["cls"]) == 1
    centre = np.asarray(Image.open(io.BytesIO(greens[0][image_format])), dtype=int)[4:12, 4:12]
    assert (centre[..., 1] > 200).all() and (centre[..., 0] < 60).all() and (centre[..., 2] < 60).all()


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _write_image(root / f"img{i}.png", (24, 24))
    manifest = build_shards(f"folder:{root}", tmp_path / "out", image_size=8, progress=False)
    assert manifest["num_samples"] == 3 and manifest["num_classes"] is None
    assert "classes" not in manifest and manifest["class_counts"] == {}
    assert all(set(s) == {"png"} for s in read_all(tmp_path / "out").values())


def test_unknown_source_lists_valid_sources(tmp_path):
    listing = ("unknown shard source 'mnist'; valid sources: digits, stacked-digits, ring8, grid25, photos, "
               "folder:PATH, pairs:sr4:SOURCE, pairs:edges:SOURCE, pairs:folder:PATH")
    with pytest.raises(ValueError, match=re.escape(listing)):
        build_shards("mnist", tmp_path, progress=False)


def test_empty_or_missing_folder_raises(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        build_shards(f"folder:{tmp_path / 'empty'}", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="not a directory"):
        build_shards(f"folder:{tmp_path / 'nope'}", tmp_path / "out", progress=False)


def test_folder_with_only_unreadable_images_raises(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable samples"):
        build_shards(f"folder:{tmp_path / 'bad'}", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shard_size": 0}, "shard_size"),
        ({"image_size": -1}, "image_size"),
        ({"image_format": "gif"}, "image_format"),
        ({"num_samples": 5000}, "num_samples"),
    ],
)
def test_bad_options_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_shards("digits", tmp_path, progress=False, **kwargs)


def test_class_counts_match_labels_in_tars(tmp_path):
    manifest = build_shards("digits", tmp_path, shard_size=128, num_samples=300, progress=False)
    counts = Counter(s["cls"].decode() for s in read_all(tmp_path).values())
    assert dict(counts) == manifest["class_counts"]


def test_parse_labels_ranges_lists_and_errors():
    assert parse_labels(None) is None and parse_labels("") is None
    assert parse_labels("0-3,7") == {0, 1, 2, 3, 7} and parse_labels("5") == {5}
    with pytest.raises(ValueError, match="labels must look like"):
        parse_labels("a-b")


def test_shards_build_cli_with_labels_does_not_import_torch(tmp_path):
    """Building shards is data work: the command must not pay for importing torch or the trainers."""
    code = ("import sys; from launcher.cli import main; "
            f"rc = main(['shards', 'build', 'digits', '--out', {str(tmp_path)!r}, '--quiet', '--labels', '0-2']); "
            "print(rc, 'torch' in sys.modules, 'trainers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "0 False False"
    assert read_manifest(tmp_path)["labels"] == [0, 1, 2]
