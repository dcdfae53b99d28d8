"""Tests for data_shards.stream: rank/worker splitting, bad-data accounting, shard specs."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.build import build_shards
from data_shards.decode import BadSample, decode_image, decode_label
from data_shards.stream import ShardStream, batch_to_float, find_manifest, make_loader, read_shard, resolve_shards

# ---------------------------------------------------------------------------- helpers


def png_bytes(size=(16, 16), mode="L", seed=0) -> bytes:
    """A noisy PNG (noise keeps it from compressing to almost nothing)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header announces width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tar(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> Path:
    """Write samples given as (key, [(ext, bytes), ...]); members keep the given order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def collect(spec, *, world_size=1, num_workers=0, passes=1, batch_size=4, **options) -> list[dict]:
    """All batches of `passes` passes, over every simulated rank."""
    batches = []
    for rank in range(world_size):
        loader = make_loader(
            spec,
            batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=3,
            shuffle_buffer=8,
            passes=passes,
            return_keys=True,
            **options,
        )
        batches.extend(loader)
    return batches


def keys_of(batches) -> Counter:
    return Counter(key for b in batches for key in b["__key__"])


def skipped_of(batches) -> Counter:
    total: Counter = Counter()
    for b in batches:
        total.update(b["skipped"])
    return total


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """8 shards x 20 digits, 16x16."""
    out = tmp_path_factory.mktemp("digits")
    build_shards("digits", out, shard_size=20, num_samples=160, image_size=16, progress=False)
    return out


def subset(src: Path, dst: Path, n: int) -> Path:
    """A shard directory holding the first n shards of src."""
    dst.mkdir()
    for i in range(n):
        name = f"shard-{i:06d}.tar"
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ---------------------------------------------------------------------------- splitting


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_shards, world_size, num_workers", [(8, 2, 2), (3, 2, 2), (5, 2, 0), (5, 1, 2)])
def test_one_pass_covers_every_sample_once_across_slots(digits_dir, tmp_path, n_shards, world_size, num_workers):
    shards = subset(digits_dir, tmp_path / "s", n_shards)
    batches = collect(shards, world_size=world_size, num_workers=num_workers)

    expected = {f"{i:08d}" for i in range(20 * n_shards)}
    counts = keys_of(batches)
    assert set(counts) == expected and set(counts.values()) == {1}
    num_slots = world_size * max(num_workers, 1)
    assert {b["__slot__"] for b in batches} == set(range(num_slots))
    assert all(b["skipped"] == {} for b in batches)
    assert sum(len(b["label"]) for b in batches) == len(expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_shards, world_size, num_workers", [(3, 2, 2), (5, 2, 1)])
def test_uneven_shards_never_block_and_every_slot_keeps_yielding(
    digits_dir, tmp_path, n_shards, world_size, num_workers
):
    shards = subset(digits_dir, tmp_path / "s", n_shards)
    for rank in range(world_size):
        loader = make_loader(shards, 8, rank=rank, world_size=world_size, num_workers=num_workers, seed=0,
                             shuffle_buffer=16, return_keys=True)
        # 40 batches of 8 is several passes over every slot's share of the data.
        batches = list(islice(iter(loader), 40))
        assert len(batches) == 40 and all(b["image"].shape == (8, 1, 16, 16) for b in batches)
        slots = Counter(b["__slot__"] for b in batches)
        assert set(slots) == {rank * num_workers + w for w in range(num_workers)}
        del loader


@pytest.mark.timeout(60)
def test_fewer_samples_than_slots_still_feeds_every_slot(tmp_path):
    write_tar(tmp_path / "tiny.tar", [(f"k{i}", [("png", png_bytes(seed=i)), ("cls", b"1")]) for i in range(2)])
    for rank in range(2):
        loader = make_loader(tmp_path / "tiny.tar", 2, rank=rank, world_size=2, num_workers=2, seed=0,
                             shuffle_buffer=0, return_keys=True)
        batches = list(islice(iter(loader), 6))
        assert {b["__slot__"] for b in batches} == {2 * rank, 2 * rank + 1}
        del loader


def test_stream_batches_images_labels_and_is_seeded(digits_dir):
    first = list(islice(iter(ShardStream(digits_dir, 16, seed=1)), 3))
    again = list(islice(iter(ShardStream(digits_dir, 16, seed=1)), 3))
    other = list(islice(iter(ShardStream(digits_dir, 16, seed=2)), 3))

    batch = first[0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 1, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (16,)
    assert ((batch["label"] >= 0) & (batch["label"] <= 9)).all()
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_channels_and_image_size_are_converted(digits_dir):
    batch = next(iter(ShardStream(digits_dir, 4, channels=3, image_size=8)))
    assert batch["image"].shape == (4, 3, 8, 8)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])  # grey -> RGB replicates


def test_points_stream(tmp_path):
    build_shards("ring8", tmp_path, shard_size=50, num_samples=100, progress=False)
    batches = collect(tmp_path, batch_size=32)
    assert [len(b["label"]) for b in batches] == [32, 32, 32, 4]
    points = torch.cat([b["points"] for b in batches])
    assert points.dtype == torch.float32 and points.shape == (100, 2)
    assert torch.allclose(points.norm(dim=1), torch.ones(100), atol=0.06)
    assert "image" not in batches[0]


def test_batch_to_float_maps_to_unit_interval():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.allclose(batch_to_float(images), torch.tensor([-1.0, 0.0039216, 1.0]), atol=1e-6)
    assert batch_to_float(images, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- bad data

PLANTED = Counter(decode_error=2, bad_label=1, too_large=2, missing_image=1, truncated_tar=2, duplicate_member=1)


@pytest.fixture
def corrupt_shards(tmp_path) -> tuple[Path, set[str]]:
    return build_corrupt_shards(tmp_path)


def build_corrupt_shards(tmp_path: Path) -> tuple[Path, set[str]]:
    """Three shards with one of each kind of damage; returns (dir, keys of the valid samples)."""
    valid = lambda key, seed: (key, [("cls", str(seed % 10).encode()), ("png", png_bytes(seed=seed))])  # noqa: E731
    good = png_bytes(seed=99)
    first = [valid(f"v{i}", i) for i in range(5)] + [
        ("trunc", [("png", good[: len(good) // 2]), ("cls", b"1")]),  # decode_error
        ("garbage", [("png", os.urandom(300)), ("cls", b"2")]),  # decode_error
        ("badcls", [("png", good), ("cls", b"abc")]),  # bad_label
        ("onlycls", [("cls", b"3")]),  # missing_image
        ("huge1", [("png", png_header_only(20000, 20000))]),  # too_large (PIL's bomb error)
        ("huge2", [("png", png_header_only(9000, 9000))]),  # too_large (our own limit)
        ("rgbodd", [("png", png_bytes((20, 10), "RGB")), ("cls", b"4")]),  # valid, converted
        ("nolabel", [("png", good)]),  # valid, label -1
        ("dup", [("png", good), ("png", good), ("cls", b"5")]),  # valid; duplicate_member
    ] + [valid(f"v{i}", i) for i in range(5, 10)]
    write_tar(tmp_path / "shard-000000.tar", first)

    second = write_tar(tmp_path / "shard-000001.tar", [valid(f"w{i}", 20 + i) for i in range(6)])
    with tarfile.open(second) as tar:
        last_png = tar.getmember("w5.png")
    data = second.read_bytes()
    second.write_bytes(data[: last_png.offset_data + last_png.size // 2])  # cut inside w5.png

    # Cut inside the first member of x3 (png before cls here): x0-x2 are complete and must all
    # arrive (x2 was dropped with the damage before), x3 is counted once as truncated_tar.
    third = write_tar(tmp_path / "shard-000002.tar", [(f"x{i}", [("png", png_bytes(seed=40 + i)), ("cls", b"7")])
                                                      for i in range(6)])
    with tarfile.open(third) as tar:
        cut = tar.getmember("x3.png")
    third.write_bytes(third.read_bytes()[: cut.offset_data + cut.size // 2])

    keys = {f"v{i}" for i in range(10)} | {f"w{i}" for i in range(5)} | {f"x{i}" for i in range(3)}
    return tmp_path, keys | {"rgbodd", "nolabel", "dup"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (1, 2), (2, 2)])
def test_planted_corruption_is_counted_and_valid_samples_survive(corrupt_shards, world_size, num_workers):
    shards, valid_keys = corrupt_shards
    batches = collect(shards, world_size=world_size, num_workers=num_workers)

    assert skipped_of(batches) == PLANTED
    counts = keys_of(batches)
    assert set(counts) == valid_keys and set(counts.values()) == {1}
    assert all(b["image"].shape[1:] == (1, 16, 16) for b in batches)
    labels = {k: int(l) for b in batches for k, l in zip(b["__key__"], b["label"])}
    assert labels["nolabel"] == -1 and labels["rgbodd"] == 4 and labels["dup"] == 5


@pytest.mark.timeout(60)
def test_skips_are_reported_in_every_infinite_pass(corrupt_shards):
    shards, valid_keys = corrupt_shards
    stream = ShardStream(shards, 7, shuffle_buffer=0)
    # With no shuffle buffer, 3 passes of 21 valid samples are exactly 9 batches of 7.
    batches = list(islice(iter(stream), 9))
    assert skipped_of(batches) == Counter({reason: 3 * n for reason, n in PLANTED.items()})


@pytest.mark.parametrize("cut_before, delivered", [
    ("k2.cls", {"k0", "k1"}),  # between samples: k1 has the members k0 has, so it is complete
    ("k2.png", {"k0", "k1"}),  # between k2's members: k2 lacks its png, dropped with the damage
    ("end", {"k0", "k1", "k2", "k3"}),  # every member there, only the end-of-archive blocks missing
])
def test_tar_cut_at_a_member_boundary_is_not_a_silent_end(tmp_path, cut_before, delivered):
    """Python's tarfile (and so webdataset 1.0.2) ends quietly here, losing the rest."""
    path = write_tar(tmp_path / "cut.tar", [(f"k{i}", [("cls", b"1"), ("png", png_bytes(seed=i))]) for i in range(4)])
    with tarfile.open(path) as tar:
        last = tar.getmember("k3.png")
        boundary = last.offset_data + 512 * -(-last.size // 512) if cut_before == "end" else \
            tar.getmember(cut_before).offset  # the start of that member's header
    path.write_bytes(path.read_bytes()[:boundary])

    batches = collect(path)
    assert keys_of(batches) == Counter(delivered)
    assert skipped_of(batches) == Counter(truncated_tar=1)


def test_garbage_header_mid_archive_and_missing_shard_are_counted(tmp_path):
    path = write_tar(tmp_path / "a.tar", [(f"k{i}", [("png", png_bytes(seed=i))]) for i in range(4)])
    with tarfile.open(path) as tar:
        offset = tar.getmember("k2.png").offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 512] = os.urandom(512)
    path.write_bytes(bytes(data))
    gone = write_tar(tmp_path / "b.tar", [("x", [("png", png_bytes())])])

    stream = ShardStream([path, gone], 4, passes=1, shuffle_buffer=0, return_keys=True)
    gone.unlink()  # vanishes between resolving and reading
    batches = list(stream)
    assert keys_of(batches) == Counter({"k0": 1, "k1": 1})  # k1 has k0's members: complete
    assert skipped_of(batches) == Counter(truncated_tar=1, unreadable_shard=1)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:slot")
@pytest.mark.parametrize("rank, world_size, num_workers", [(0, 1, 0), (1, 2, 0), (0, 4, 0), (0, 1, 1)])
def test_all_bad_shards_raise_instead_of_hanging(tmp_path, rank, world_size, num_workers):
    # One worker only: torch 2.13 takes 5 s per worker to shut down after a worker raised.
    write_tar(tmp_path / "shard-000000.tar", [(f"g{i}", [("png", os.urandom(100))]) for i in range(5)])
    write_tar(tmp_path / "shard-000001.tar", [(f"c{i}", [("cls", b"x")]) for i in range(5)])
    loader = make_loader(tmp_path, 2, rank=rank, world_size=world_size, num_workers=num_workers, seed=0,
                         shuffle_buffer=4)
    with pytest.raises(RuntimeError, match="no valid samples in shards"):
        next(iter(loader))


def test_read_shard_groups_members_like_webdataset(tmp_path):
    path = write_tar(
        tmp_path / "a.tar",
        [("dir/k1", [("PNG", b"1"), ("cls", b"1")]), ("__meta__/info", [("json", b"{}")]), ("k2.x", [("png", b"2")])],
    )
    samples = list(read_shard(str(path)))
    assert [s["__key__"] for s in samples] == ["dir/k1", "k2"]  # __meta__/ members are not samples
    assert set(samples[0]) == {"__key__", "__url__", "png", "cls"}  # extensions lower-cased
    assert samples[1]["x.png"] == b"2"  # key = up to the first dot, as in webdataset


def test_decode_helpers_raise_bad_sample_only():
    assert decode_label(b" 7\n") == 7
    for bad in (b"abc", b"-1", b"1_000", b"", b"\xff"):
        with pytest.raises(BadSample, match="bad_label"):
            decode_label(bad)
    with pytest.raises(BadSample, match="too_large"):
        decode_image(png_header_only(100, 100), "png", max_pixels=99 * 100)
    assert decode_image(png_bytes((30, 10), "RGB"), "png", channels=1, image_size=8).shape == (8, 8, 1)


# ---------------------------------------------------------------------------- shard specs


def test_resolve_shards_forms(digits_dir):
    names = [str(digits_dir / f"shard-{i:06d}.tar") for i in range(8)]
    assert resolve_shards(digits_dir) == names
    assert resolve_shards(str(digits_dir)) == names
    assert resolve_shards(f"{digits_dir}/shard-{{000001..000003}}.tar") == names[1:4]
    assert resolve_shards(names[5]) == [names[5]]
    assert resolve_shards([names[2], f"{digits_dir}/shard-{{000000..000002}}.tar"]) == [names[2], names[0], names[1]]
    assert resolve_shards(f"{digits_dir}/shard-00000[67].tar") == names[6:8]
    assert resolve_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert find_manifest(digits_dir)["num_samples"] == 160


def test_resolve_shards_accepts_omegaconf_lists(digits_dir):
    omegaconf = pytest.importorskip("omegaconf")
    spec = omegaconf.OmegaConf.create({"shards": [str(digits_dir / "shard-000000.tar"), str(digits_dir)]})
    assert len(resolve_shards(spec.shards)) == 8


def test_resolve_shards_missing_raises_file_not_found(digits_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        resolve_shards(tmp_path / "nope.tar")
    with pytest.raises(FileNotFoundError, match=r"1 shard file\(s\) not found.*shard-000008.tar"):
        resolve_shards(f"{digits_dir}/shard-{{000000..000008}}.tar")
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory"):
        resolve_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shards found"):
        resolve_shards([])
    with pytest.raises(FileNotFoundError):
        ShardStream(tmp_path / "missing", 4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers, consumed", [(0, 7), (2, 5), (2, 8)])
def test_resumed_stream_continues_with_exactly_the_same_batches(digits_dir, num_workers, consumed):
    """Positions saved after N batches restart each worker where it stopped, mid-pass and across passes."""
    from data_shards.stream import make_loader

    def loader(**resume):
        return iter(make_loader(digits_dir, 64, rank=1, world_size=2, num_workers=num_workers, seed=3,
                                shuffle_buffer=100, return_keys=True, **resume))

    total = consumed + 12  # 19+ batches of 64 over ~900 samples per rank: crosses a pass boundary
    uninterrupted = [next(batches) for batches in [loader()] for _ in range(total)]
    positions = {}
    for batch in uninterrupted[:consumed]:
        positions[batch["__worker__"]] = batch["__position__"]
    workers = max(1, num_workers)
    resumed = loader(start_positions=positions, worker_offset=consumed % workers)
    for expected in uninterrupted[consumed:]:
        got = next(resumed)
        assert got["__key__"] == expected["__key__"]
        assert torch.equal(got["image"], expected["image"])
    assert any(b["__position__"]["pass"] >= 1 for b in uninterrupted), "test should cross a pass boundary"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("channels_last", [False, True])
def test_worker_batches_through_reused_slabs_are_the_in_process_batches(digits_dir, channels_last):
    """A worker decodes into a few shared-memory slabs it reuses (data_shards.slabs): 44 batches
    through at most 5 slabs, all kept, equal the in-process stream's, final partial batch too; the
    main process gets private copies, so a kept batch never changes when its slab is reused."""
    options = dict(seed=5, shuffle_buffer=16, passes=3, channels_last=channels_last, image_size=16, channels=3)
    want = list(ShardStream(digits_dir, 11, **options))  # 480 samples: 43 full batches and one of 7
    loader = make_loader(digits_dir, 11, num_workers=1, **options)
    got = list(loader)
    assert loader.dataset.transport is not None and len(got) == len(want) == 44 and len(got[-1]["label"]) == 7
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        assert a["image"].stride() == b["image"].stride() and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"]) and a["__position__"] == b["__position__"]
    assert not any(a["image"].is_shared() for a in got[:-1])  # the partial one goes out the usual way
    assert 2 <= len(loader.dataset.transport._received) <= 5  # 43 full batches through at most 5 slabs
    # A persistent worker's next epoch, after one cut short with batches still in flight: the
    # DataLoader drops those, and the worker takes its slabs back (else it would wait forever).
    for cut in (3, None):
        again = list(islice(iter(loader), cut))
        assert len(again) == (cut or 44)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, want))
    # The same with the cut before the worker had sent every slab's tensor once.
    fresh = make_loader(digits_dir, 11, num_workers=1, **options)
    assert len(list(islice(iter(fresh), 1))) == 1
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(fresh, want))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_slab_batches_arrive_intact_when_workers_are_spawned(digits_dir, start_method):
    """Workers that do not fork from the main process (spawn: macOS, Windows, CUDA users;
    forkserver: Linux's default from Python 3.14) get the transport's pipes pickled, not
    inherited: their slab batches must still equal the in-process stream's, through slabs."""
    script = f"""
import multiprocessing, sys, torch
from data_shards.stream import ShardStream, make_loader
if __name__ == "__main__":
    multiprocessing.set_start_method({start_method!r})
    options = dict(seed=5, shuffle_buffer=16, passes=2, image_size=16, channels=3)
    want = list(ShardStream(sys.argv[1], 11, **options))
    loader = make_loader(sys.argv[1], 11, num_workers=1, **options)
    got = list(loader)
    assert len(got) == len(want), (len(got), len(want))
    for a, b in zip(got, want):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["__position__"] == b["__position__"]
    print("slabs", len(loader.dataset.transport._received))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(digits_dir)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 2  # the batches came through (reused) slabs


@pytest.mark.timeout(60)
def test_worker_batches_too_big_for_the_shared_memory_budget_go_the_usual_way(digits_dir, monkeypatch):
    from data_shards import slabs

    monkeypatch.setattr(slabs, "_shm_budget", lambda: 4 * 11 * 16 * 16 * 3)  # 4 slabs: 5 are needed
    options = dict(seed=5, shuffle_buffer=16, passes=1, image_size=16, channels=3)
    want = list(ShardStream(digits_dir, 11, **options))
    loader = make_loader(digits_dir, 11, num_workers=1, **options)
    got = list(loader)
    assert len(got) == len(want) and all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))
    assert loader.dataset.transport._received == {}  # no slab ever crossed


def test_a_script_holding_a_loader_with_workers_exits(digits_dir):
    """Workers ignore SIGTERM (SLURM signals them too), which is how multiprocessing stops
    daemonic children at exit; a script that still holds a loader, or only its iterator, must not hang there."""
    script = ("import sys\nfrom data_shards.stream import make_loader\n"
              "loader = make_loader(sys.argv[1], 8, num_workers=1)\nbatch = next(iter(loader))\n"
              "orphan = iter(make_loader(sys.argv[1], 8, num_workers=1))\nbatch = next(orphan)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(digits_dir)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_script_exits_even_when_a_loader_iterator_fails_to_shut_down(digits_dir):
    """A worker whose iterator cannot shut it down (here its shutdown raises) is killed at exit
    rather than joined forever by multiprocessing's exit hook (it ignores SIGTERM)."""
    script = ("import sys\nfrom data_shards.stream import make_loader\n"
              "it = iter(make_loader(sys.argv[1], 8, num_workers=1))\nbatch = next(it)\n"
              "def broken():\n    raise RuntimeError('shutdown failed')\n"
              "it._shutdown_workers = broken\nprint('ready', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(digits_dir)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ready", proc.stderr[-2000:]


# ---------------------------------------------------------------------------- the table fast path


def jpeg_bytes(h=64, w=64, seed=0, mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 7.0 + c + seed) * 60 + np.cos(y / 5.0 - c) * 50 + 128 for c in range(3)], axis=-1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_jpeg_shards(tmp_path_factory) -> Path:
    """Uniform cls+jpg shards (tables) full of odd samples, and one non-uniform shard."""
    out = tmp_path_factory.mktemp("mixed")
    good = [jpeg_bytes(seed=i) for i in range(30)]
    odd = [jpeg_bytes(mode="CMYK"), jpeg_bytes(mode="L"), jpeg_bytes(40, 50), jpeg_bytes(32, 128),
           jpeg_bytes(200, 210), jpeg_bytes(progressive=True), good[0][:800], good[1][:3] + os.urandom(300),
           png_bytes((64, 64), "RGB"), png_bytes((30, 70), "L"), png_header_only(20000, 20000)]
    labels = [b"x1", b"", b" 12\n", b"1" * 19]
    samples = [(f"g{i:02d}", [("cls", str(i % 7).encode()), ("jpg", data)]) for i, data in enumerate(good[:20])]
    samples += [(f"o{i:02d}", [("cls", b"3"), ("jpg", data)]) for i, data in enumerate(odd)]
    samples += [(f"l{i}", [("cls", label), ("jpg", good[20 + i])]) for i, label in enumerate(labels)]
    order = np.random.default_rng(0).permutation(len(samples))
    samples = [samples[i] for i in order]
    write_tar(out / "shard-000000.tar", samples[:18])
    write_tar(out / "shard-000001.tar", samples[18:])
    write_tar(out / "shard-000002.tar", [("n0", [("jpg", good[25])]), ("n1", [("cls", b"2")]),
                                         ("n2", [("jpg", good[26]), ("jpg", good[27]), ("cls", b"4")])])
    return out


def batches_of(spec, n, **options) -> list[dict]:
    batches = list(islice(iter(make_loader(spec, seed=4, return_keys=True, **options)), n))
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", [
    dict(batch_size=4, shuffle_buffer=8, image_size=64, channels=3, channels_last=True),
    dict(batch_size=3, shuffle_buffer=8, image_size=64, channels=3),
    dict(batch_size=5, shuffle_buffer=0),
    dict(batch_size=4, shuffle_buffer=6, image_size=48, channels=1, channels_last=True),
    dict(batch_size=3, shuffle_buffer=8, image_size=64, channels=3, rank=1, world_size=2, channels_last=True),
    dict(batch_size=2, shuffle_buffer=4, image_size=64, channels=3, rank=2, world_size=5),  # interleaved
])
def test_tables_give_exactly_what_per_sample_dicts_give(mixed_jpeg_shards, monkeypatch, options):
    """Shards read as ShardTables (bulk index, labels and JPEG checks, decode into the batch)
    yield the same batches, skips and positions as the same shards read sample dict by sample
    dict (the general path); resuming mid-pass too."""
    from data_shards import tars

    def run():
        batches = batches_of(mixed_jpeg_shards, 40, **options)
        return batches, batches_of(mixed_jpeg_shards, 30, start_positions={0: batches[9]["__position__"]}, **options)

    fast, fast_resumed = run()
    with monkeypatch.context() as patch:
        patch.setattr(tars.ShardTable, "build", classmethod(lambda *args: None))
        tars._TABLE_CACHE.clear()
        slow, slow_resumed = run()
    assert sum(sum(b["skipped"].values()) for b in fast) > 0
    for got, want in ((fast, slow), (fast_resumed, slow_resumed)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and a[key].stride() == b[key].stride()
                    assert torch.equal(a[key], b[key]), key
                else:
                    assert a[key] == b[key], key


# ---------------------------------------------------------------------------- paired samples


def flat_image(value: int, side: int, fmt: str, mode: str = "RGB") -> bytes:
    """A side x side image of one colour that encodes ``value`` (0-255) in every pixel."""
    colour = value if mode == "L" else (value, 255 - value, value // 2)
    buf = io.BytesIO()
    Image.new(mode, (side, side), colour).save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=95)
    return buf.getvalue()


def pair_members(i: int, fmt: str = "png", label: bool = True) -> list[tuple[str, bytes]]:
    """Pair i as build_shards writes pairs (KEY.src + KEY.tgt + KEY.cls): a 16x16 target and its
    4x4 input, both of value 8 * i, so a batch shows which input went with which target."""
    members = [(f"src.{fmt}", flat_image(8 * i, 4, fmt)), (f"tgt.{fmt}", flat_image(8 * i, 16, fmt))]
    return members + ([("cls", str(i % 5).encode())] if label else [])


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    """30 pairs p00-p29 in 3 shards: two of PNGs, one of JPEGs."""
    out = tmp_path_factory.mktemp("pairs")
    for k in range(3):
        write_tar(out / f"shard-{k:06d}.tar", [(f"p{i:02d}", pair_members(i, "jpg" if k == 2 else "png"))
                                               for i in range(10 * k, 10 * k + 10)])
    return out


def check_pairs(batches: list[dict], channels_last: bool = False) -> Counter:
    """Each batch row's target and input encode the index of its key; returns the keys seen."""
    for b in batches:
        image, source = b["image"], b["source"]
        assert image.dtype == source.dtype == torch.uint8
        assert image.shape[1:] == (3, 16, 16) and source.shape[1:] == (3, 4, 4)
        assert image.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for key, target, input_, label in zip(b["__key__"], image, source, b["label"]):
            i = int(key[1:])
            tolerance = 3 if i >= 20 else 0  # the JPEG shard
            for side in (target, input_):
                assert (side[0].int() - 8 * i).abs().max() <= tolerance, (key, side[0])
                assert (side[1].int() - (255 - 8 * i)).abs().max() <= tolerance, key
            assert int(label) == i % 5
    return keys_of(batches)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers, world_size, channels_last", [(0, 1, False), (0, 2, True), (2, 1, True),
                                                                     (2, 2, False)])
def test_pairs_batch_each_target_with_its_own_input(pair_shards, num_workers, world_size, channels_last):
    """Paired shards (detected from their members) yield `image` (the targets) and `source`
    (the inputs, their own size), every pair once per pass, over ranks and workers."""
    batches = collect(pair_shards, world_size=world_size, num_workers=num_workers, channels_last=channels_last,
                      batch_size=4)
    assert check_pairs(batches, channels_last) == Counter({f"p{i:02d}": 1 for i in range(30)})
    assert all(b["skipped"] == {} for b in batches)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_pair_batches_through_slabs_equal_the_in_process_stream(pair_shards, num_workers):
    """A worker sends a batch of pairs through two slabs (targets, inputs), reused: the same
    batches as the in-process stream, final partial batch (sent the usual way) included."""
    options = dict(seed=5, shuffle_buffer=8, passes=3, channels_last=True, return_keys=True, kind="pairs")
    want = list(ShardStream(pair_shards, 7, **options))  # 90 pairs: 12 full batches and one of 6
    loader = make_loader(pair_shards, 7, num_workers=num_workers, **options)
    got = list(loader)
    assert len(got) == len(want) == 13 and len(got[-1]["label"]) == 6
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and a["__key__"] == b["__key__"] and a["__position__"] == b["__position__"]
        for name in ("image", "source", "label"):
            assert a[name].stride() == b[name].stride() and torch.equal(a[name], b[name]), name
    check_pairs(got, channels_last=True)
    if num_workers:  # torch's transport would have sent shared-memory tensors
        assert not any(b["image"].is_shared() or b["source"].is_shared() for b in got[:-1])
        assert 4 <= len(loader.dataset.transport._received) <= 10  # two pools of at most 5 slabs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers, consumed", [(0, 5), (2, 7)])
def test_resumed_pair_stream_continues_with_exactly_the_same_batches(pair_shards, num_workers, consumed):
    def loader(**resume):
        return iter(make_loader(pair_shards, 4, num_workers=num_workers, seed=3, shuffle_buffer=8,
                                return_keys=True, **resume))

    total = consumed + 12  # 17 batches of 4 over 30 pairs: crosses a pass boundary
    uninterrupted = [next(batches) for batches in [loader()] for _ in range(total)]
    positions = {b["__worker__"]: b["__position__"] for b in uninterrupted[:consumed]}
    resumed = loader(start_positions=positions, worker_offset=consumed % max(1, num_workers))
    for expected in uninterrupted[consumed:]:
        got = next(resumed)
        assert got["__key__"] == expected["__key__"]
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["source"], expected["source"])
    assert any(b["__position__"]["pass"] >= 1 for b in uninterrupted)


def test_a_pair_missing_a_side_is_skipped_and_counted(tmp_path):
    good = [(f"p{i:02d}", pair_members(i)) for i in range(6)]
    src, tgt, cls = pair_members(40)
    broken_target = (tgt[0], tgt[1][: len(tgt[1]) // 2])
    bad = [("nosrc", [tgt, cls]), ("notgt", [src, cls]), ("neither", [cls]), ("badtgt", [src, broken_target, cls]),
           ("badcls", [src, tgt, ("cls", b"x")]), ("plain", [("png", flat_image(1, 16, "png"))])]
    write_tar(tmp_path / "shard-000000.tar", good[:3] + bad + good[3:])

    batches = collect(tmp_path, batch_size=2)
    assert check_pairs(batches) == Counter({f"p{i:02d}": 1 for i in range(6)})
    assert skipped_of(batches) == Counter(missing_source=1, missing_target=1, missing_image=2, decode_error=1,
                                          bad_label=1)


def test_pair_options_convert_the_input_and_the_target(pair_shards):
    batch = next(iter(ShardStream(pair_shards, 4, source_channels=1, source_size=8, image_size=12, channels=3)))
    assert batch["image"].shape == (4, 3, 12, 12) and batch["source"].shape == (4, 1, 8, 8)
    unlabelled = pair_shards.parent / "unlabelled"
    unlabelled.mkdir()
    write_tar(unlabelled / "a.tar", [(f"p{i:02d}", pair_members(i, label=False)) for i in range(3)])
    batch = next(iter(ShardStream(unlabelled, 3, kind="pairs", passes=1)))
    assert batch["label"].tolist() == [-1, -1, -1] and batch["source"].shape == (3, 3, 4, 4)


# ---------------------------------------------------------------------------- options


def test_stream_options_are_one_value_passed_through(digits_dir):
    from data_shards.options import StreamOptions

    options = StreamOptions(batch_size=8, seed=2, shuffle_buffer=16, channels=3, passes=1, return_keys=True)
    by_value = list(make_loader(digits_dir, options))
    by_fields = list(make_loader(digits_dir, 8, seed=2, shuffle_buffer=16, channels=3, passes=1, return_keys=True))
    assert [b["__key__"] for b in by_value] == [b["__key__"] for b in by_fields]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(by_value, by_fields))
    assert ShardStream(digits_dir, options, seed=9).options == StreamOptions(**{**vars(options), "seed": 9})
    for bad, message in [(dict(batch_size=0), "batch_size"), (dict(batch_size=1, rank=2, world_size=2), "rank"),
                         (dict(batch_size=1, channels=2), "channels"), (dict(batch_size=1, kind="video"), "kind"),
                         (dict(batch_size=1, passes=0), "passes"),
                         (dict(batch_size=1, source_channels=4), "source_channels")]:
        with pytest.raises(ValueError, match=message):
            ShardStream(digits_dir, **bad)
