"""Tests for the photos and paired shard sources (data_shards.sources)."""

from __future__ import annotations

import io
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.build import MissingPackage, build_shards
from data_shards.sources import photos as photos_mod
from data_shards.sources.pairs import edge_map
from tests.conftest import run_gentrain


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard of ``out``, in key order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples[key][ext] = tar.extractfile(info).read()
    return dict(sorted(samples.items()))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def tar_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(out.glob("shard-*.tar"))]


# ---------------------------------------------------------------------------- photos


def test_photos_are_labelled_rgb_crops_of_every_photo(tmp_path):
    manifest = build_shards("photos", tmp_path, shard_size=40, image_size=24, num_samples=96, progress=False)

    assert manifest["kind"] == "image" and manifest["channels"] == 3 and manifest["image_size"] == 24
    assert manifest["num_classes"] == 16 and len(manifest["classes"]) == 16
    assert manifest["classes"] == [name for name, _ in photos_mod.PHOTOS]
    assert {"astronaut", "coffee", "camera", "china", "flower", "grace_hopper"} <= set(manifest["classes"])
    assert [p["name"] for p in manifest["photos"]] == manifest["classes"]
    assert all(p["width"] >= 300 and p["height"] >= 300 for p in manifest["photos"])
    assert manifest["num_samples"] == 96 and manifest["num_shards"] == 3
    assert manifest["class_counts"] == {str(c): 6 for c in range(16)}  # balanced: 96 / 16

    samples = read_all(tmp_path)
    labels = Counter(int(s["cls"]) for s in samples.values())
    assert labels == Counter({c: 6 for c in range(16)})
    for sample in samples.values():
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (24, 24)
    # Crops of different photos differ: not 96 copies of one image.
    assert len({s["png"] for s in samples.values()}) == 96


def test_photos_are_byte_for_byte_deterministic(tmp_path):
    kwargs = dict(shard_size=30, image_size=16, num_samples=64, split="train", progress=False)
    first = build_shards("photos", tmp_path / "a", **kwargs)
    second = build_shards("photos", tmp_path / "b", **kwargs)
    other_seed = build_shards("photos", tmp_path / "c", seed=1, **kwargs)

    assert first == second
    assert tar_bytes(tmp_path / "a") == tar_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert first["shards"][0]["sha256"] != other_seed["shards"][0]["sha256"]


def _photo_sizes() -> list[tuple[int, int]]:
    return [photo.size for photo in photos_mod.load_photos()]


def _inside(box, region) -> bool:
    return region[0] <= box[0] and region[1] <= box[1] and box[2] <= region[2] and box[3] <= region[3]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("image_size", [16, 64])
def test_train_and_test_crops_come_from_disjoint_regions(image_size):
    sizes = _photo_sizes()
    train = list(photos_mod.crop_boxes(sizes, 3000, 0, "train", image_size))
    test = list(photos_mod.crop_boxes(sizes, 3000, 0, "test", image_size))

    train_pixels = [np.zeros((h, w), bool) for w, h in sizes]
    test_pixels = [np.zeros((h, w), bool) for w, h in sizes]
    for boxes, masks in ((train, train_pixels), (test, test_pixels)):
        for label, (left, top, right, bottom) in boxes:
            width, height = sizes[label]
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert right - left == bottom - top  # square
            short = min(width, height)
            assert right - left <= round(photos_mod.CROP_MAX_FRACTION * short)
            assert right - left >= min(max(short / 8, image_size), 0.4 * short) - 1
            masks[label][top:bottom, left:right] = True
    for label, box in test:
        assert _inside(box, photos_mod.held_out_block(*sizes[label]))
    for label, box in train:
        assert not _overlap(box, photos_mod.held_out_block(*sizes[label]))
    # No pixel of any photo is seen by both splits; both splits see every photo.
    for label in range(len(sizes)):
        assert not (train_pixels[label] & test_pixels[label]).any()
        assert train_pixels[label].any() and test_pixels[label].any()
    # The test block is about 20% of each photo and the two splits draw the same crop scales.
    w, h = sizes[0]
    block = photos_mod.held_out_block(w, h)
    assert 0.18 < (block[2] - block[0]) * (block[3] - block[1]) / (w * h) < 0.22
    train_rel = np.median([(b[2] - b[0]) / min(sizes[label]) for label, b in train])
    test_rel = np.median([(b[2] - b[0]) / min(sizes[label]) for label, b in test])
    assert abs(train_rel - test_rel) < 0.03


@pytest.mark.parametrize("split", ["train", "test"])
def test_photo_shards_hold_exactly_the_crop_boxes(tmp_path, split):
    """The tars are the boxes of crop_boxes, cropped and bicubic-resized: the split check above covers them."""
    build_shards("photos", tmp_path, image_size=16, num_samples=24, split=split, seed=3, progress=False)
    photos = photos_mod.load_photos()
    boxes = list(photos_mod.crop_boxes(_photo_sizes(), 24, 3, split, 16))
    samples = list(read_all(tmp_path).values())
    assert len(samples) == len(boxes) == 24
    for sample, (label, box) in zip(samples, boxes):
        assert int(sample["cls"]) == label
        expected = np.asarray(photos[label].resize((16, 16), Image.Resampling.BICUBIC, box=box))
        np.testing.assert_array_equal(pixels(sample["png"]), expected)


def test_photos_cli_test_split_defaults(tmp_path):
    proc = run_gentrain("shards", "build", "photos", "--out", tmp_path, "--split", "test", "--image-size", 16,
                        "--shard-size", 500, "--quiet")
    assert "wrote 1200 samples in 3 shard(s)" in proc.stdout
    manifest = __import__("json").loads((tmp_path / "manifest.json").read_text())
    assert manifest["split"] == "test" and manifest["num_samples"] == 1200 and manifest["num_classes"] == 16
    assert photos_mod.DEFAULT_NUM_SAMPLES == {"all": 6000, "train": 6000, "test": 1200}
    assert photos_mod.DEFAULT_IMAGE_SIZE == 64


@pytest.mark.parametrize("module, package", [("skimage.data", "scikit-image"), ("matplotlib.cbook", "matplotlib"),
                                             ("sklearn.datasets", "scikit-learn")])
def test_photos_without_a_package_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys, module, package):
    from launcher.cli import main

    photos_mod.load_photos.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)  # import of `module` now raises ImportError
    try:
        with pytest.raises(MissingPackage, match=f"needs the Python package {package}, which is not installed"):
            build_shards("photos", tmp_path, num_samples=8, progress=False)
        assert main(["shards", "build", "photos", "--out", str(tmp_path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pip install {package}" in err and "Traceback" not in err
        assert not list(tmp_path.glob("*.tar"))
    finally:
        photos_mod.load_photos.cache_clear()


# ---------------------------------------------------------------------------- sr4 and edges


def test_sr4_input_is_exactly_pil_bicubic_downscale_of_target(tmp_path):
    manifest = build_shards("pairs:sr4:photos", tmp_path / "a", image_size=32, num_samples=24, shard_size=10,
                            progress=False)
    again = build_shards("pairs:sr4:photos", tmp_path / "b", image_size=32, num_samples=24, shard_size=10,
                         progress=False)
    assert manifest == again and tar_bytes(tmp_path / "a") == tar_bytes(tmp_path / "b")
    assert manifest["kind"] == "pairs" and manifest["paired"] is True and manifest["pair_kind"] == "sr4"
    assert manifest["src_size"] == 8 and manifest["tgt_size"] == 32 and manifest["image_size"] == 32
    assert manifest["channels"] == 3 and manifest["num_classes"] == 16 and manifest["inner_source"] == "photos"
    assert manifest["members"] == ["src.png", "tgt.png"]

    samples = read_all(tmp_path / "a")
    assert len(samples) == 24
    for sample in samples.values():
        assert set(sample) == {"src.png", "tgt.png", "cls"}
        target = Image.open(io.BytesIO(sample["tgt.png"]))
        source = pixels(sample["src.png"])
        assert target.size == (32, 32) and source.shape == (8, 8, 3)
        np.testing.assert_array_equal(source, np.asarray(target.resize((8, 8), Image.BICUBIC)))
        # ... and not some other filter's result (the check can fail).
        assert not np.array_equal(source, np.asarray(target.resize((8, 8), Image.NEAREST)))


def test_paired_photos_take_the_inner_split_and_targets(tmp_path):
    build_shards("photos", tmp_path / "plain", image_size=16, num_samples=12, split="test", progress=False)
    build_shards("pairs:sr4:photos", tmp_path / "pairs", image_size=16, num_samples=12, split="test", progress=False)
    plain, pairs = read_all(tmp_path / "plain"), read_all(tmp_path / "pairs")
    assert [s["png"] for s in plain.values()] == [s["tgt.png"] for s in pairs.values()]
    assert [s["cls"] for s in plain.values()] == [s["cls"] for s in pairs.values()]


def test_sr4_of_digits_keeps_one_channel(tmp_path):
    manifest = build_shards("pairs:sr4:digits", tmp_path, num_samples=20, progress=False)
    assert manifest["channels"] == 1 and manifest["src_size"] == 8 and manifest["tgt_size"] == 32
    sample = next(iter(read_all(tmp_path).values()))
    assert Image.open(io.BytesIO(sample["src.png"])).mode == "L"


@pytest.mark.parametrize("size", [30, 18, 1])
def test_sr4_needs_an_image_size_divisible_by_4(tmp_path, size):
    with pytest.raises(ValueError, match=f"divisible by 4.*got {size}"):
        build_shards("pairs:sr4:photos", tmp_path, image_size=size, num_samples=4, progress=False)
    assert not list(tmp_path.glob("*.tar"))


def test_sr4_bad_size_on_the_command_line_exits_2_with_one_line(tmp_path):
    proc = run_gentrain("shards", "build", "pairs:sr4:photos", "--out", tmp_path, "--image-size", 30, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "divisible by 4" in proc.stderr


def test_edges_input_is_a_plausible_edge_map_of_the_target(tmp_path):
    manifest = build_shards("pairs:edges:photos", tmp_path, image_size=32, num_samples=32, progress=False)
    assert manifest["pair_kind"] == "edges" and manifest["src_size"] == manifest["tgt_size"] == 32
    dark_gradient, light_gradient = [], []
    for sample in read_all(tmp_path).values():
        source, target = pixels(sample["src.png"]), pixels(sample["tgt.png"])
        assert source.shape == target.shape == (32, 32, 3)
        assert not np.array_equal(source, target)
        assert (source[..., 0] == source[..., 1]).all() and (source[..., 1] == source[..., 2]).all()
        np.testing.assert_array_equal(source, np.asarray(edge_map(Image.fromarray(target))))
        grey = target.astype(float).mean(axis=2)
        gradient = np.hypot(*np.gradient(grey))
        lines = source[..., 0] < 128
        if lines.any() and (~lines).any():
            dark_gradient.append(gradient[lines].mean())
            light_gradient.append(gradient[~lines].mean())
    # Dark lines sit where the target changes fast: black lines on a white page.
    assert len(dark_gradient) >= 24
    assert np.mean(np.array(dark_gradient) > np.array(light_gradient)) > 0.9


def test_edge_map_draws_a_line_at_a_step_and_white_elsewhere():
    array = np.zeros((32, 32, 3), np.uint8)
    array[:, 16:] = 255
    edges = np.asarray(edge_map(Image.fromarray(array)))
    assert edges.shape == (32, 32, 3)
    assert (edges[:, 15:17] == 0).all()  # the step
    assert (edges[:, :12] == 255).all() and (edges[:, 20:] == 255).all()  # flat regions stay white
    flat = np.asarray(edge_map(Image.new("L", (8, 8), 90)))
    assert flat.shape == (8, 8) and (flat == 255).all()


@pytest.mark.parametrize(
    "source, message",
    [
        ("pairs:sr4:mnist", "unknown inner source 'mnist' for pairs:sr4"),
        ("pairs:edges:ring8", "pairs:edges needs an image source; 'ring8' is a point source"),
        ("pairs:sr4:pairs:sr4:photos", "unknown inner source 'pairs:sr4:photos'"),
        ("pairs:blur:photos", "unknown paired source 'pairs:blur:photos'"),
        ("pairs:sr4", "unknown inner source '' for pairs:sr4"),
        ("pairs:folder", "pairs:folder needs a path"),
    ],
)
def test_bad_paired_sources_raise_clear_errors(tmp_path, source, message):
    with pytest.raises(ValueError, match=message):
        build_shards(source, tmp_path, progress=False)


# ---------------------------------------------------------------------------- pairs:folder


def _save(path: Path, size: tuple[int, int], color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


COLORS = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250), "sub/d": (250, 250, 0)}


def test_pairs_folder_src_tgt_subfolders(tmp_path):
    root = tmp_path / "pairs"
    for name, color in COLORS.items():  # 4 good pairs: 16px inputs, 64px targets (ratio 1/4)
        _save(root / "src" / f"{name}.png", (16, 16), color)
        _save(root / "tgt" / f"{name}.jpg", (64, 64), color)
    _save(root / "src" / "lonely.png", (16, 16), (9, 9, 9))  # no target
    _save(root / "tgt" / "orphan.png", (64, 64), (9, 9, 9))  # no input
    _save(root / "src" / "b.bmp", (16, 16), (9, 9, 9))  # a second input for "b": b is ambiguous
    _save(root / "src" / "ratio.png", (32, 32), (9, 9, 9))  # ratio 1/2, not the common 1/4
    _save(root / "tgt" / "ratio.png", (64, 64), (9, 9, 9))
    _save(root / "src" / "wide.png", (32, 16), (9, 9, 9))  # 2:1 input for a square target
    _save(root / "tgt" / "wide.png", (64, 64), (9, 9, 9))
    _save(root / "src" / "broken.png", (16, 16), (9, 9, 9))
    (root / "tgt" / "broken.png").write_bytes(b"not an image at all")

    manifest = build_shards(f"pairs:folder:{root}", tmp_path / "out", image_size=32, shard_size=3, progress=False)
    assert manifest["kind"] == "pairs" and manifest["paired"] is True and manifest["pair_kind"] == "folder"
    assert manifest["layout"] == "src/NAME + tgt/NAME"
    assert manifest["tgt_size"] == 32 and manifest["src_size"] == 8 and manifest["channels"] == 3
    assert manifest["num_samples"] == 3 and manifest["num_shards"] == 1 and manifest["num_classes"] is None
    assert manifest["skipped_reasons"] == {"aspect_mismatch": 1, "duplicate": 1, "size_ratio_mismatch": 1,
                                           "unmatched": 2, "unreadable": 1}
    assert sorted(manifest["skipped_files"]) == sorted([
        "src/lonely.png", "tgt/orphan.png", "src/b.bmp", "src/b.png", "tgt/b.jpg", "src/ratio.png",
        "tgt/ratio.png", "src/wide.png", "tgt/wide.png", "src/broken.png", "tgt/broken.png"])
    assert manifest["skipped"] == len(manifest["skipped_files"])

    colors = sorted(color for name, color in COLORS.items() if name != "b")
    seen = []
    for sample in read_all(tmp_path / "out").values():
        assert set(sample) == {"src.png", "tgt.png"}
        source, target = pixels(sample["src.png"]), pixels(sample["tgt.png"])
        assert source.shape == (8, 8, 3) and target.shape == (32, 32, 3)
        src_color, tgt_color = source.reshape(-1, 3).mean(0), target.reshape(-1, 3).mean(0)
        assert np.abs(src_color - tgt_color).max() < 8  # input and target come from the same NAME
        seen.append(min(colors, key=lambda c: np.abs(np.array(c) - tgt_color).sum()))
    assert sorted(seen) == colors


def test_pairs_folder_name_suffix_layout(tmp_path):
    root = tmp_path / "flat"
    for i, color in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        _save(root / f"img{i}_src.png", (40, 20), color)  # same size as the target: an edges-like task
        _save(root / f"img{i}_tgt.png", (40, 20), color)
    _save(root / "alone_src.png", (40, 20), (0, 0, 0))
    _save(root / "notes.png", (40, 20), (0, 0, 0))
    (root / "readme.txt").write_text("not an image")

    manifest = build_shards(f"pairs:folder:{root}", tmp_path / "out", image_size=16, progress=False)
    assert manifest["layout"] == "NAME_src + NAME_tgt"
    assert manifest["src_size"] == manifest["tgt_size"] == 16 and manifest["num_samples"] == 3
    assert sorted(manifest["skipped_files"]) == ["alone_src.png", "notes.png"]
    assert manifest["skipped_reasons"] == {"unmatched": 2}
    for sample in read_all(tmp_path / "out").values():
        np.testing.assert_array_equal(pixels(sample["src.png"]), pixels(sample["tgt.png"]))


def test_pairs_folder_split_and_cap_and_determinism(tmp_path):
    root = tmp_path / "many"
    for i in range(10):
        _save(root / "src" / f"{i:02d}.png", (8, 8), (20 * i, 0, 0))
        _save(root / "tgt" / f"{i:02d}.png", (16, 16), (20 * i, 0, 0))
    kwargs = dict(image_size=16, progress=False)
    train = build_shards(f"pairs:folder:{root}", tmp_path / "train", split="train", **kwargs)
    test = build_shards(f"pairs:folder:{root}", tmp_path / "test", split="test", **kwargs)
    again = build_shards(f"pairs:folder:{root}", tmp_path / "test2", split="test", **kwargs)
    capped = build_shards(f"pairs:folder:{root}", tmp_path / "cap", num_samples=4, **kwargs)
    assert (train["num_samples"], test["num_samples"], capped["num_samples"]) == (8, 2, 4)
    assert train["src_size"] == 8
    assert tar_bytes(tmp_path / "test") == tar_bytes(tmp_path / "test2") and again == test
    train_tgts = {s["tgt.png"] for s in read_all(tmp_path / "train").values()}
    test_tgts = {s["tgt.png"] for s in read_all(tmp_path / "test").values()}
    assert not train_tgts & test_tgts and len(train_tgts | test_tgts) == 10


def test_pairs_folder_without_pairs_raises(tmp_path):
    _save(tmp_path / "x" / "a.png", (8, 8), (0, 0, 0))
    _save(tmp_path / "x" / "b_src.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match=r"no matching pairs .* 2 unmatched image files"):
        build_shards(f"pairs:folder:{tmp_path / 'x'}", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="not a directory"):
        build_shards(f"pairs:folder:{tmp_path / 'nope'}", tmp_path / "out", progress=False)
