"""Multi-node torchrun across two simulated hosts, compared with the same job on one host.

Two network namespaces joined by a veth pair (10.213.7.1 and .2, a private /24 only they use),
each with its own hostname (nodeA, nodeB) and an /etc/hosts naming both. One
`gentrain launch --nnodes 2 --nproc-per-node 1 --rdzv-endpoint 10.213.7.1:PORT` runs in each;
the DeepSpeed VAE and GAN must end with the same weights as `gentrain launch --nproc-per-node 2`
on one host (compared through `gentrain export` safetensors).

Across the two hosts too: a rank on nodeB that fails (its shards all bad) ends the whole job
within 30 s with its message on both hosts and non-zero exit codes; a run directory held by a
live job on nodeA refuses a job from nodeB, and a lock whose lease nodeA stopped renewing
(killed with -9) does not block nodeB's resume.

Needs root, `ip` and `unshare` (`make test-multinode`); skipped otherwise.
"""
import json
import os
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from bench.faults import kill_whole_job, wait_all_gone
from tests.conftest import ROOT, run_gentrain

CLUSTER = ROOT / "tests" / "cluster"
PREFIX = "10.213.7"
PORT = 29411


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "multi-node tests need root (they create network namespaces); run `sudo make test-multinode`"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"multi-node tests need {' and '.join(missing)} (iproute2, util-linux)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.multinode,
              pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")]


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces with their own addresses and hostnames; removed again afterwards."""
    tag = uuid.uuid4().hex[:5]
    names = (f"gt{tag}a", f"gt{tag}b")
    try:
        proc = subprocess.run(["bash", CLUSTER / "netns_up.sh", *names, PREFIX, "nodeA", "nodeB"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        yield names
    finally:
        subprocess.run(["bash", CLUSTER / "netns_down.sh", *names], capture_output=True, timeout=60)


COMMON = ("data.batch_size=16", "trainer.max_steps=4", "trainer.log_every=1", "trainer.sample_every=4",
          "trainer.ckpt_every=4", "trainer.progress=false")
# The same intra-op thread count in both layouts: left to the launcher, each simulated host gives
# its one process all the machine's cores (2 threads here) and the shared host gives each of its
# two processes one, and a different thread count sums conv gradients in another order. The GAN
# amplifies those last-bit differences (Adam normalises near-zero gradients): measured on a Zen 4
# VM, 6 of D's first 512 weights ended 2.4e-4 apart after 4 steps; with 1 thread on both, equal.
THREADS = {"OMP_NUM_THREADS": "1"}


def train_on_two_hosts(hosts, preset, run_dir, shards, *overrides) -> float:
    """One launch per namespace; returns seconds from launch to the first logged step."""
    args = ["launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"{PREFIX}.1:{PORT}",
            "--rdzv-id", run_dir.name, preset, f"run.dir={run_dir}", f"data.shards={shards}", *COMMON, *overrides]
    started = time.time()
    procs = [subprocess.Popen(["bash", CLUSTER / "on_host.sh", ns, name, os.sys.executable, "-m", "launcher.cli",
                               *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **THREADS})
             for ns, name in zip(hosts, ("nodeA", "nodeB"))]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-5000:]
    joined = "\n".join(outputs)
    assert "2 process(es)" in joined and "done: 4 steps" in joined
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - started


def train_on_one_host(preset, run_dir, shards, *overrides) -> float:
    started = time.time()
    run_gentrain("launch", "--nproc-per-node", 2, preset, f"run.dir={run_dir}", f"data.shards={shards}", *COMMON,
                 *overrides, env=THREADS)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - started


def weights(run_dir, out):
    run_gentrain("export", run_dir, "--out", out)
    return load_file(out)


def compare(tmp_path, multi, single) -> float:
    a, b = weights(multi, tmp_path / "multi.safetensors"), weights(single, tmp_path / "single.safetensors")
    assert a.keys() == b.keys() and a
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    losses = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (multi, single)]
    assert [r["step"] for r in losses[0]] == [r["step"] for r in losses[1]] == [1, 2, 3, 4]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    return worst


@pytest.mark.parametrize("preset,overrides", [
    ("configs/vae_digits.yaml", ()),
    ("configs/gan_digits.yaml", ("loss.r1_every=2",)),
], ids=["vae", "gan"])
def test_two_hosts_match_one_host(hosts, preset, overrides, tmp_path, digit_shards):
    multi, single = tmp_path / "two-hosts", tmp_path / "one-host"
    t_multi = train_on_two_hosts(hosts, preset, multi, digit_shards, *overrides)
    t_single = train_on_one_host(preset, single, digit_shards, *overrides)
    worst = compare(tmp_path, multi, single)
    print(f"\n[multinode] {preset}: launch -> first step {t_multi:.1f} s on two hosts, {t_single:.1f} s on one; "
          f"max |weight difference| {worst:.3g}")


# ---- nothing hangs, one job per run directory ------------------------------------------------------
def on_host(ns: str, name: str, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen(["bash", CLUSTER / "on_host.sh", ns, name, os.sys.executable, "-m", "launcher.cli",
                             *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **THREADS, **(env or {})})


class Output:
    """A process's merged output, read as it comes, with the time each line arrived."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def bad_shards(directory):
    from tests.test_stream import write_tar

    directory.mkdir()
    for i in range(2):
        write_tar(directory / f"shard-{i:06d}.tar", [(f"s{i}{j}", [("png", b"not a png"), ("cls", b"1")])
                                                    for j in range(8)])
    return directory


def test_a_failure_on_the_second_host_stops_the_whole_job(hosts, tmp_path, digit_shards):
    """nodeB's trainer has only bad shards (NoValidSamples at its first batch) while nodeA's is in its
    first step's all-reduce: without the abort flag nodeA would wait for gloo's timeout."""
    run_dir, bad = tmp_path / "fail", bad_shards(tmp_path / "bad")
    common = ["launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"{PREFIX}.1:{PORT + 1}",
              "--rdzv-id", "fail", "configs/vae_digits.yaml", f"run.dir={run_dir}", "data.batch_size=16",
              "data.image_size=32", "data.channels=1", "trainer.max_steps=50", "trainer.progress=false"]
    outputs = [Output(on_host(hosts[0], "nodeA", *common, f"data.shards={digit_shards}")),
               Output(on_host(hosts[1], "nodeB", *common, f"data.shards={bad}"))]
    try:
        for out in outputs:
            out.proc.wait(timeout=400)
            out.thread.join(timeout=10)
    finally:
        for out in outputs:
            if out.proc.poll() is None:
                kill_whole_job(out.proc.pid)
    ended = time.time()
    a, b = outputs
    failed_at = b.first("on nodeB failed: NoValidSamples: no valid samples")
    assert failed_at is not None, b.text[-5000:]
    assert a.proc.returncode != 0 and b.proc.returncode != 0, (a.text[-3000:], b.text[-3000:])
    # nodeA's ranks (rank 0's output included) say why they stopped: nodeB's one line
    assert "stopping, rank" in a.text and "on nodeB failed: NoValidSamples: no valid samples" in a.text, a.text[-5000:]
    assert not (run_dir / ".lock").exists()  # released by rank 0 as it stopped
    stopped = ended - failed_at
    assert stopped < 30, f"the job took {stopped:.0f} s to end after nodeB's rank failed"
    said = next(line for _, line in a.lines if "stopping, rank" in line).strip()
    print(f"\n[multinode] nodeB's rank failed; both hosts' launches ended {stopped:.1f} s later "
          f"(exit codes {a.proc.returncode}, {b.proc.returncode}); nodeA said: {said}")


def test_a_run_held_on_one_host_refuses_a_job_from_the_other(hosts, tmp_path, digit_shards):
    run_dir = tmp_path / "held"
    lease = {"GENTRAIN_LOCK_LEASE_S": "4"}  # renewed every second; dead 4 s after the last renewal
    args = ["configs/vae_digits.yaml", f"run.dir={run_dir}", f"data.shards={digit_shards}", "data.batch_size=16",
            "trainer.ckpt_every=2", "trainer.progress=false"]
    holder = on_host(hosts[0], "nodeA", "train", *args, "trainer.max_steps=100000", env=lease)
    out = Output(holder)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "latest").exists():
            assert holder.poll() is None and time.time() < deadline, out.text[-5000:]
            time.sleep(0.2)
        lock = json.loads((run_dir / ".lock").read_text())
        assert lock["host"] == "nodeA"
        for command in ("launch", "train"):
            proc = on_host(hosts[1], "nodeB", command, *args, "trainer.max_steps=4", env=lease)
            text = proc.communicate(timeout=300)[0]
            assert proc.returncode == 2, text[-3000:]
            line = text.strip().splitlines()[-1]
            assert line.startswith(f"gentrain: error: run directory {run_dir} is in use by another job "
                                   f"(host nodeA, pid {lock['pid']}, started "), line
            assert "lease renewed" in line
    finally:
        killed = kill_whole_job(holder.pid)
        holder.wait()
    assert not wait_all_gone(killed, 10, mentioning=f"run.dir={run_dir}")
    lock = json.loads((run_dir / ".lock").read_text())  # left behind by kill -9
    time.sleep(max(0.0, lock["renewed"] + lock["lease_s"] + 0.5 - time.time()))  # its lease expires
    step = int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    resumed = on_host(hosts[1], "nodeB", "train", *args, f"trainer.max_steps={step + 2}", env=lease)
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text[-5000:]
    assert "took over the lock of a job that is gone (host nodeA" in text and "resumed from" in text
    assert not (run_dir / ".lock").exists()
