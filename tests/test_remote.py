"""Shards streamed from real servers on 127.0.0.1: HTTP (bench.remote.ShardServer, with Range and
planted faults), S3 (moto's server) and pipe: commands; the streamed tar parser against tarfile."""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench.remote import ShardServer
from data_shards import remote
from data_shards.build import build_shards, read_manifest
from data_shards.errors import TRUNCATED_TAR, UNREADABLE_SHARD, NoValidSamples, ShardError
from data_shards.specs import find_manifest, resolve_shards
from data_shards.stream import ShardStream, make_loader
from data_shards.tars import (
    _group_members,
    _stream_members,
    _stream_samples,
    _tarfile_members,
    read_shard,
    record_sample,
)
from trainers.runtime.distributed import free_port

N_SHARDS = 8
BRACES = "shard-{000000..000007}.tar"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("GENTRAIN_REMOTE_BACKOFF", "0.01")
    monkeypatch.setenv("GENTRAIN_REMOTE_RETRIES", "3")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """8 shards x 20 digits, 16x16 PNG."""
    out = tmp_path_factory.mktemp("digits")
    build_shards("digits", out, shard_size=20, num_samples=160, image_size=16, progress=False)
    return out


def batches_of(spec, *, passes=1, world_size=1, num_workers=0, **options) -> list[dict]:
    out = []
    for rank in range(world_size):
        out += list(make_loader(spec, 6, rank=rank, world_size=world_size, num_workers=num_workers, seed=5,
                                shuffle_buffer=16, passes=passes, return_keys=True, **options))
    return out


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) and len(want) > 0
    for a, b in zip(got, want):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["__position__"] == b["__position__"] and a["skipped"] == b["skipped"]


# ---------------------------------------------------------------------------- the streamed tar parser


class Chunks:
    """A shard's bytes in pieces of ``size``; ``lose_at``: the bytes stop there for good."""

    def __init__(self, data: bytes, size: int, lose_at: int | None = None):
        self.data, self.size, self.pos = data, size, 0
        self.end = len(data) if lose_at is None else min(lose_at, len(data))
        self.lost = lose_at is not None and lose_at < len(data)

    def next(self):
        if self.pos >= self.end:
            if self.lost:
                raise remote.SourceLost("gone")
            return None
        piece = self.data[self.pos : min(self.pos + self.size, self.end)]
        self.pos += len(piece)
        return piece


def outcome(members) -> tuple[list[dict], tuple | None]:
    samples, error = [], None
    try:
        for sample in _group_members("u", members):
            samples.append(sample)
    except ShardError as exn:
        error = (exn.reason, exn.cut_key)
    return samples, error


def streamed(chunks, batch) -> tuple[list[dict], tuple | None]:
    """_stream_samples' samples as read_shard dicts (records converted), and its error."""
    samples, error = [], None
    try:
        for part in _stream_samples("u", chunks, batch):
            samples += [record_sample(raw) if type(raw) is tuple else raw for raw in part]
    except ShardError as exn:
        error = (exn.reason, exn.cut_key)
    return samples, error


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, mode="w", directory=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(n=4, prefix="k") -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"{prefix}{i}.cls", str(i).encode()),
                                          (f"{prefix}{i}.png", bytes([i]) * (300 + 211 * i)))]


TARS = {
    "ustar": tar_bytes(sample_members()),
    "dir_meta_dots": tar_bytes([("__meta__/x.json", b"{}"), ("a/b.c.png", b"1" * 700), ("a/b.c.cls", b"2"),
                                ("noext", b"3")], directory="a"),
    "gnu_longnames": tar_bytes(sample_members(3, "d" * 120 + "/k"), fmt=tarfile.GNU_FORMAT),
    "pax_midway": tar_bytes(sample_members(2) + [("\u00e9t\u00e9.png", b"x" * 900), ("\u00e9t\u00e9.cls", b"1")]
                            + sample_members(2, "z"), fmt=tarfile.PAX_FORMAT),
    "gzip": tar_bytes(sample_members(), mode="w:gz"),
    "duplicates_big": tar_bytes(sample_members(2) + [("d.png", b"1" * 5000), ("d.png", b"2"), ("d.cls", b"3")]
                                + sample_members(3, "e")),
    "empty": b"",
    "only_end": bytes(1024),
}


def damaged(data: bytes) -> dict[str, tuple[bytes, int]]:
    """(tar, offset of its damaged header)."""
    offsets = [info.offset for info in tarfile.open(fileobj=io.BytesIO(data))]
    garbage = bytearray(data)
    garbage[offsets[3] : offsets[3] + 512] = bytes(range(256)) * 2
    checksum = bytearray(data)
    checksum[offsets[5] + 100] ^= 1  # the mode field: only the checksum notices
    return {"garbage_header": (bytes(garbage), offsets[3]), "bad_checksum": (bytes(checksum), offsets[5])}


@pytest.mark.parametrize("name", [*TARS, "garbage_header", "bad_checksum"])
def test_streamed_tars_read_exactly_as_tarfile_reads_them(name):
    """Whole, cut at every 97th byte, and bytes lost for good there (unreadable_shard, with the
    same samples and the same cut sample as a tar cut at that byte), in pieces of any size."""
    data, damage_at = (TARS[name], len(TARS[name])) if name in TARS else damaged(TARS["ustar"])[name]
    whole = outcome(_tarfile_members("u", io.BytesIO(data)))
    for cut in [*range(0, len(data), 97), len(data)]:
        want_samples, want_error = outcome(_tarfile_members("u", io.BytesIO(data[:cut])))
        for size in (1, 100, 512, 4096, 1 << 20):
            if size == 1 and cut % 5:
                continue  # byte by byte is slow: a fifth of the cuts
            assert outcome(_stream_members("u", Chunks(data[:cut], size))) == (want_samples, want_error), (cut, size)
            if cut < len(data) and name != "gzip":
                lost = outcome(_stream_members("u", Chunks(data, size, lose_at=cut)))
                if cut >= damage_at + 512 or want_error is None:  # the damage, or the end, comes first
                    assert lost == whole, (cut, size)
                else:
                    assert lost == (want_samples, (UNREADABLE_SHARD, want_error[1])), (cut, size)
    if name == "ustar":
        assert outcome(_stream_members("u", Chunks(data, 512)))[0][3]["png"] == bytes([3]) * 933


@pytest.mark.parametrize("name", [*TARS, "garbage_header", "bad_checksum"])
def test_streamed_samples_in_indexed_batches_are_the_member_by_member_ones(name):
    """_stream_samples (batches of members indexed at once, as table records where uniform) gives
    what _stream_members gives, whole, cut, or lost at every 131st byte, for batch sizes that hold
    a few members, a few samples, or all."""
    data = TARS[name] if name in TARS else damaged(TARS["ustar"])[name][0]
    for cut in [*range(0, len(data), 131), len(data)]:
        for size, batch in ((100, 700), (512, 1500), (1 << 20, 1 << 20), (333, 3000)):
            want = outcome(_stream_members("u", Chunks(data[:cut], size)))
            assert streamed(Chunks(data[:cut], size), batch) == want, (cut, size, batch)
            if cut < len(data):
                want = outcome(_stream_members("u", Chunks(data, size, lose_at=cut)))
                assert streamed(Chunks(data, size, lose_at=cut), batch) == want, (cut, size, batch)


# ---------------------------------------------------------------------------- HTTP


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (1, 2)])
def test_http_shards_give_the_local_batches(digits, world_size, num_workers):
    with ShardServer(digits) as server:
        want = batches_of(digits, passes=2, world_size=world_size, num_workers=num_workers)
        got = batches_of(server.url(BRACES), passes=2, world_size=world_size, num_workers=num_workers)
        assert_same_batches(got, want)
        assert got[0]["__url__"][0].startswith(server.url())
        assert sum(server.requests.values()) == 2 * N_SHARDS  # each shard read once per pass, by its slot


def test_http_manifest_and_folder_forms(digits):
    with ShardServer(digits) as server:
        assert resolve_shards(server.url(BRACES)) == [server.url(f"shard-{i:06d}.tar") for i in range(N_SHARDS)]
        assert resolve_shards(server.url()) == resolve_shards(server.url(BRACES))  # from its manifest.json
        (digits / "sub").mkdir(exist_ok=True)
        (digits / "sub" / "manifest.json").write_text((digits / "manifest.json").read_text())
        (digits / "sub" / "shard-000000.tar").write_bytes((digits / "shard-000000.tar").read_bytes())
        assert resolve_shards(server.url("sub"))[0] == server.url("sub/shard-000000.tar")
        assert find_manifest(server.url(BRACES)) == read_manifest(digits)
        assert find_manifest(server.url("nowhere/shard-000000.tar")) is None  # 404: no manifest
        strip = lambda samples: [{k: v for k, v in s.items() if k != "__url__"} for s in samples]  # noqa: E731
        assert strip(read_shard(server.url("shard-000003.tar"))) == strip(read_shard(str(digits / "shard-000003.tar")))
        with pytest.raises(FileNotFoundError, match="no manifest.json"):
            resolve_shards(server.url("nowhere/"))


@pytest.mark.timeout(60)
def test_dropped_connections_resume_where_they_stopped(digits):
    """Responses cut short (closed or reset), a 503, a server that ignores Range: every drop is
    retried and resumed at the first missing byte; the batches are the local ones exactly."""
    faults = {"shard-000001.tar": [0.3], "shard-000003.tar": [("reset", 0.5), 0.2, ("status", 503), 700],
              "shard-000006.tar": [1000]}
    want = batches_of(digits, passes=1)
    before = Counter(remote.COUNTS)
    with ShardServer(digits, faults) as server:
        got = batches_of(server.url(BRACES), passes=1)
    assert_same_batches(got, want)
    assert server.drops == 5
    assert remote.COUNTS["retries"] - before["retries"] == 6 and remote.COUNTS["gave_up"] == before["gave_up"]
    starts = [(start, status) for name, start, status, _ in server.log if name == "shard-000003.tar"]
    assert starts[0] == (0, 200) and all(start > 0 and status == 206 for start, status in starts[1:] if status != 503)
    with ShardServer(digits, {"shard-000002.tar": [0.5, 0.5]}, ranges=False) as plain:
        assert_same_batches(batches_of(plain.url(BRACES), passes=1), want)
    assert plain.drops == 2


@pytest.mark.timeout(60)
def test_a_shard_that_stops_for_good_keeps_what_arrived_and_counts_the_rest(digits, tmp_path):
    """Half of shard 2, then nothing more (3 retries): the samples that arrived are the ones a local
    copy cut at that byte holds; the rest of the shard is unreadable_shard, and training goes on."""
    faults = {"shard-000002.tar": [0.5] + [0] * 10}
    with ShardServer(digits, faults) as server:
        got = batches_of(server.url(BRACES), passes=1)
    arrived = sum(sent for name, _, _, sent in server.log if name == "shard-000002.tar")
    assert server.requests["shard-000002.tar"] == 1 + 3  # the first (cut), then 3 retries without progress
    cut = tmp_path / "cut"
    cut.mkdir()
    for path in digits.glob("shard-*.tar"):
        data = path.read_bytes()
        (cut / path.name).write_bytes(data[:arrived] if path.name == "shard-000002.tar" else data)
    want = batches_of(cut, passes=1)
    assert [b["__key__"] for b in got] == [b["__key__"] for b in want]
    total = lambda batches: sum((Counter(b["skipped"]) for b in batches), Counter())  # noqa: E731
    assert total(got) == Counter({UNREADABLE_SHARD: 1}) and total(want) == Counter({TRUNCATED_TAR: 1})


@pytest.mark.timeout(60)
def test_every_shard_unreachable_stops_with_one_line_soon():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(NoValidSamples) as raised:
        next(iter(ShardStream(f"http://127.0.0.1:{port}/{BRACES}", 4, passes=1)))
    message = str(raised.value)
    assert "\n" not in message and "unreadable_shard': 8" in message and "Connection refused" in message
    # one shard's retries (0.01 + 0.02 + 0.04 s), then a single attempt for each other shard of that host
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------- pipe:


def test_pipe_commands_and_their_manifest(digits, tmp_path):
    spec = f"pipe:cat {digits}/{BRACES}"
    assert_same_batches(batches_of(spec), batches_of(digits))
    assert find_manifest(spec) == read_manifest(digits)
    assert find_manifest(f"pipe:cat {digits}/nothing/shard-000000.tar") is None
    # A command that fails part-way the first time is run again, the bytes already read dropped.
    flaky = []
    for i in range(N_SHARDS):
        shard, mark = digits / f"shard-{i:06d}.tar", tmp_path / f"ran-{i}"
        flaky.append(f"pipe:if [ -e {mark} ]; then cat {shard}; else touch {mark}; head -c 5000 {shard}; exit 3; fi")
    before = remote.COUNTS["retries"]
    assert_same_batches(batches_of(flaky), batches_of(digits))
    assert remote.COUNTS["retries"] - before == N_SHARDS


# ---------------------------------------------------------------------------- S3 (moto's server)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket 'gentrain'; the endpoint in GENTRAIN_S3_ENDPOINT."""
    pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "GENTRAIN_S3_ENDPOINT": f"http://{host}:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    remote._S3_CLIENTS.clear()
    remote.s3_client().create_bucket(Bucket="gentrain")
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    remote._S3_CLIENTS.clear()
    server.stop()


@pytest.mark.timeout(120)
def test_build_to_s3_then_stream_from_it(s3, digits, monkeypatch):
    manifest = build_shards("digits", "s3://gentrain/digits", shard_size=20, num_samples=160, image_size=16,
                            progress=False)
    assert manifest["shards"] == read_manifest(digits)["shards"]  # byte-identical shards (sha256)
    assert sorted(remote.list_names("s3://gentrain/digits/")) == sorted(["manifest.json"] + [
        f"shard-{i:06d}.tar" for i in range(N_SHARDS)])
    assert read_manifest("s3://gentrain/digits") == manifest
    assert resolve_shards("s3://gentrain/digits/") == [f"s3://gentrain/digits/shard-{i:06d}.tar" for i in range(8)]
    assert resolve_shards("s3://gentrain/digits") == resolve_shards("s3://gentrain/digits/")
    assert find_manifest(f"s3://gentrain/digits/{BRACES}") == manifest

    # An S3 response cut short: retried with a Range request (and If-Match), batches as local.
    real_open = remote._S3Source.open

    def flaky_open(self, offset):
        reader = real_open(self, offset)
        if offset == 0:  # the first response of each shard: 3000 bytes, then a cut
            real_read, reads = reader.read, []

            def cut_read(n):
                reads.append(n)
                if len(reads) > 1:
                    raise remote._Transient("IncompleteReadError: planted")
                return real_read(min(n, 3000))
            reader.read = cut_read
        return reader

    monkeypatch.setattr(remote._S3Source, "open", flaky_open)
    before = Counter(remote.COUNTS)
    assert_same_batches(batches_of("s3://gentrain/digits/", world_size=2), batches_of(digits, world_size=2))
    assert remote.COUNTS["resumed"] - before["resumed"] == N_SHARDS  # each first response cut once, resumed

    # The endpoint from AWS_ENDPOINT_URL alone (boto3 reads it; path-style addressing then too).
    with monkeypatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", os.environ["GENTRAIN_S3_ENDPOINT"])
        patch.delenv("GENTRAIN_S3_ENDPOINT")
        remote._S3_CLIENTS.clear()
        assert len(list(read_shard("s3://gentrain/digits/shard-000005.tar"))) == 20
    remote._S3_CLIENTS.clear()

    # A smaller build into the same prefix leaves no stale shard behind.
    build_shards("digits", "s3://gentrain/digits", shard_size=80, num_samples=160, image_size=16, progress=False)
    assert resolve_shards("s3://gentrain/digits/") == [f"s3://gentrain/digits/shard-{i:06d}.tar" for i in range(2)]


def test_shards_build_to_a_missing_bucket_fails_in_one_line(s3, capsys):
    from launcher.cli import main

    code = main(["shards", "build", "digits", "--out", "s3://no-such-bucket/x", "--quiet", "--num-samples", "20"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gentrain: error: cannot upload")
    assert "NoSuchBucket" in lines[0]


# ---------------------------------------------------------------------------- end to end (slow)

GAN = "configs/gan_digits.yaml"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, digit_shards) -> Path:
    """The 2-process GAN run of tests/test_resilience.py, from the local directory."""
    from tests.conftest import run_gentrain
    from tests.test_resilience import launch_args

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_gentrain(*launch_args(GAN, run_dir, digit_shards), env={"GENTRAIN_REMOTE_BACKOFF": "0.05"})
    return run_dir


def assert_same_weights(reference: Path, run_dir: Path) -> None:
    from tests.test_resilience import latest_checkpoint
    from trainers.runtime.checkpoint import differing_tensors

    assert latest_checkpoint(run_dir).name == latest_checkpoint(reference).name == "step-0000014"
    differing = differing_tensors(latest_checkpoint(reference), latest_checkpoint(run_dir))
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert "data/skipped" not in (run_dir / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("faulty", [False, True], ids=["clean", "dropping"])
def test_two_process_run_from_http_ends_with_the_local_weights(local_reference, digit_shards, tmp_path, faulty):
    """2 trainers x 1 loader worker from http://127.0.0.1:PORT/shard-{...}.tar; 'dropping': every
    shard's first response is cut (closed at 30%, or a 503 first), its second cut again (a reset
    half-way through the rest, or closed at 60%): each drop is retried and resumed where it stopped,
    and the weights are the local run's bit for bit (nothing valid counted twice or skipped)."""
    from tests.conftest import run_gentrain
    from tests.test_resilience import launch_args

    faults = {f"shard-{i:06d}.tar": ([0.3, ("reset", 0.5)] if i % 2 else [("status", 503), 0.6])
              for i in range(N_SHARDS)} if faulty else {}
    with ShardServer(digit_shards, faults) as server:
        run_dir = tmp_path / "http"
        proc = run_gentrain(*launch_args(GAN, run_dir, server.url(BRACES)))
    assert_same_weights(local_reference, run_dir)
    retries = proc.stderr.count("; retry ")
    refused = sum(1 for _, _, status, _ in server.log if status == 503)
    print(f"\n[remote] {'dropping' if faulty else 'clean'} server: {sum(server.requests.values())} shard requests, "
          f"{server.drops} responses dropped part-way, {refused} answered 503, {retries} retries logged; "
          f"weights equal to the local run's")
    assert "giving up" not in proc.stderr
    if faulty:
        # Each cut or refused response was retried once, but those of a shard read ahead and not
        # reached before the run's end (at most one per loader worker) may go unseen.
        assert server.drops >= 2 and server.drops + refused - 2 <= retries <= server.drops + refused
    else:
        assert retries == 0 and server.drops == 0


@pytest.mark.slow
def test_run_from_s3_killed_with_9_resumes_to_the_local_weights(s3, local_reference, digit_shards, tmp_path):
    """`shards build --out s3://...` (moto's server, GENTRAIN_S3_ENDPOINT), a 2-process run from
    s3://gentrain/digits/, kill -9 of every process of the job once a checkpoint exists, and the
    resumed run: bitwise the weights of the uninterrupted local run."""
    from bench.faults import kill_whole_job, wait_all_gone
    from tests.conftest import run_gentrain
    from tests.test_resilience import kill_delay, launch_args, start_background

    run_gentrain("shards", "build", "digits", "--out", "s3://gentrain/e2e", "--shard-size", 256, "--quiet")
    assert read_manifest("s3://gentrain/e2e")["shards"] == read_manifest(digit_shards)["shards"]
    spec = "s3://gentrain/e2e/"
    run_dir = tmp_path / "s3"
    proc = start_background(launch_args(GAN, run_dir, spec))
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.05)
    time.sleep(kill_delay(local_reference))  # a random moment before the run could end
    assert proc.poll() is None, "the run ended before it could be killed"
    killed = kill_whole_job(proc.pid)
    proc.wait()
    assert not wait_all_gone(killed, 10, mentioning=f"run.dir={run_dir}")
    killed_at = latest.read_text().strip()
    assert killed_at < "step-0000014", killed_at
    resumed = run_gentrain(*launch_args(GAN, run_dir, spec))
    assert "resumed from" in resumed.stdout, f"did not resume (killed after {killed_at})"
    assert_same_weights(local_reference, run_dir)
    print(f"\n[remote] s3 run killed after {killed_at}, resumed: weights equal to the local run's")


@pytest.mark.slow
def test_a_run_whose_every_shard_is_unreachable_exits_2_with_one_line(tmp_path):
    from tests.conftest import run_gentrain

    port = free_port()
    started = time.monotonic()
    proc = run_gentrain("train", GAN, f"run.dir={tmp_path / 'run'}", f"data.shards=http://127.0.0.1:{port}/{BRACES}",
                        "trainer.max_steps=3", "data.num_workers=1", "trainer.progress=false", check=False,
                        timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gentrain: error: no valid samples in shards: http://127.0.0.1:{port}/shard-00000")
    assert "Connection refused" in last and "Traceback" not in proc.stderr
    print(f"\n[remote] every shard unreachable: exit 2 after {took:.1f} s: {last[:160]}...")
