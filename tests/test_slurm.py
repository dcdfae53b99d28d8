"""A real SLURM cluster on this machine (munged, slurmctld, two slurmd "nodes"), started by the fixture.

`gentrain launch --backend slurm` submits real jobs to it: a VAE on 2 nodes x 1 process runs to the
end; a GAN is sent the preemption signal (SIGUSR1 to the batch script, as `--signal=B:USR1@GRACE`
does), checkpoints, exits 75, is requeued by its own script and finishes from where it stopped.

Needs root and Debian's slurm-wlm (`make test-slurm` installs it); skipped otherwise, unless
GENTRAIN_TEST_SLURM=1 (then missing pieces fail instead).
"""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_gentrain
from trainers.runtime.distributed import free_port

CLUSTER = ROOT / "tests" / "cluster"
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue")


def _why_skip() -> str | None:
    if os.environ.get("GENTRAIN_TEST_SLURM") == "1":
        return None
    if os.geteuid() != 0:
        return "real SLURM tests need root (they start munged/slurmctld/slurmd); run `sudo make test-slurm`"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); `make test-slurm` installs it"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")]


class Cluster:
    def __init__(self, directory: Path):
        self.dir = directory
        self.env = {"SLURM_CONF": str(directory / "slurm.conf")}

    def run(self, *cmd, check=True) -> str:
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env={**os.environ, **self.env},
                              timeout=60)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def state(self, job_id: str) -> str:
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()

    def nodes_idle(self) -> bool:
        """Every node IDLE: the last job's allocation is fully cleaned up (no COMPLETING)."""
        states = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).split()
        return bool(states) and all(s == "idle" for s in states)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_TEST_CTLD_PORT": str(free_port()),
           "SLURM_TEST_SLURMD_PORTS": f"{free_port()} {free_port()}"}
    started = time.perf_counter()
    proc = subprocess.run(["bash", CLUSTER / "start_slurm.sh", directory, "nodeA nodeB", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"cluster did not start:\n{proc.stdout}\n{proc.stderr}"
        print(f"\n[slurm] cluster up in {time.perf_counter() - started:.1f} s:\n{proc.stdout}")
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", CLUSTER / "stop_slurm.sh", directory], capture_output=True, timeout=60)


def wait_for(predicate, timeout: float, what: str, cluster: Cluster, run_dir: Path, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    job_logs = "\n".join(f"--- {p}\n{p.read_text()[-6000:]}" for p in sorted((run_dir / "launch").glob("slurm-*.out")))
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{job_logs}\n{cluster.logs()}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def submit(cluster: Cluster, preset: str, run_dir: Path, shards: Path, *overrides) -> tuple[str, float]:
    started = time.time()
    proc = run_gentrain("launch", "--backend", "slurm", "--nnodes", 2, "--nproc-per-node", 1, "--cpus-per-task", 1,
                        "--time", "00:20:00", "--signal-grace", 60, "--master-port", free_port(),
                        preset, f"run.dir={run_dir}", f"data.shards={shards}", "data.batch_size=16",
                        "trainer.log_every=1", "trainer.progress=false", *overrides, env=cluster.env)
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), proc.stdout
    assert f"submitted job {job_id}" in proc.stdout
    return job_id, started


def test_slurm_vae_two_nodes(cluster, digit_shards, tmp_path):
    run_dir = tmp_path / "vae"
    job_id, started = submit(cluster, "configs/vae_digits.yaml", run_dir, digit_shards,
                             "trainer.max_steps=6", "trainer.sample_every=6", "trainer.ckpt_every=6")
    script = (run_dir / "launch" / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=B:USR1@60" in script and "#SBATCH --requeue" in script

    wait_for(lambda: cluster.state(job_id) == "", 300, f"job {job_id} to finish", cluster, run_dir)
    finished = time.time()
    job = cluster.job(job_id)
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log[-4000:])
    assert job["NodeList"] == "nodeA,nodeB" and job["Restarts"] == "0"
    assert "restart 0 on nodeA,nodeB (2 node(s))" in log and "training finished" in log
    assert not (run_dir / ".lock").exists()  # released at the end
    assert "2 process(es)" in log

    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-0000006" and (latest / "COMPLETE").exists()
    assert (latest / "trainer-rank00000.pt").exists() and (latest / "trainer-rank00001.pt").exists()
    print(f"\n[slurm] VAE job {job_id}: submit -> first step {records[0]['time'] - started:.1f} s, "
          f"submit -> done {finished - started:.1f} s")


def test_slurm_gan_preempted_requeued_resumes(cluster, digit_shards, tmp_path):
    run_dir = tmp_path / "gan"
    max_steps = 24
    job_id, started = submit(cluster, "configs/gan_digits.yaml", run_dir, digit_shards,
                             f"trainer.max_steps={max_steps}", "trainer.sample_every=100", "trainer.ckpt_every=100")
    wait_for(lambda: len(metrics(run_dir)) >= 3, 300, "3 training steps", cluster, run_dir)
    first_step = metrics(run_dir)[0]["time"] - started

    # What SLURM does GRACE seconds before the time limit with --signal=B:USR1@GRACE.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    signalled = time.time()

    # The script requeues the job itself; SLURM then holds it ~2 min (BeginTime): release it now.
    wait_for(lambda: cluster.state(job_id) in ("PENDING", ""), 180, "the job to be requeued", cluster, run_dir)
    job = cluster.job(job_id)
    if job["JobState"] != "PENDING" or job["Restarts"] != "1":
        log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
        raise AssertionError(f"job not requeued: {job['JobState']} ExitCode={job['ExitCode']} "
                             f"Restarts={job['Restarts']}\n{log[-6000:]}")
    requeued = time.time()
    # Released at once, SLURM may allocate the job again within the second its old credential was
    # revoked in and kill it ("Job credential revoked", seen here in CI). Its own ~2 min hold never
    # does; wait for the nodes to be idle and a new second before releasing it.
    wait_for(cluster.nodes_idle, 60, "the nodes to be idle after the requeue", cluster, run_dir)
    time.sleep(max(0.0, requeued + 2.0 - time.time()))
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    wait_for(lambda: cluster.state(job_id) == "", 300, f"job {job_id} to finish after the requeue", cluster, run_dir)
    finished = time.time()

    job = cluster.job(job_id)
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", (job, log[-4000:])
    assert "got SIGUSR1" in log
    stopped = re.search(r"checkpointed step (\d+), exiting with 75", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < max_steps
    assert f"exited 75: requeueing job {job_id}" in log
    assert "restart 0 on" in log and "restart 1 on" in log  # SLURM_RESTART_COUNT, logged by the script
    assert f"resumed from {run_dir}/checkpoints/step-{stop_step:07d} at step {stop_step}" in log
    assert "took over the lock" not in log  # the preempted segment released it when it exited 75
    assert "training finished" in log

    # No step lost or repeated across the requeue.
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, max_steps + 1))
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{max_steps:07d}" and (latest / "COMPLETE").exists()
    assert (run_dir / "checkpoints" / f"step-{stop_step:07d}" / "COMPLETE").exists()
    print(f"\n[slurm] GAN job {job_id}: submit -> first step {first_step:.1f} s; USR1 -> requeued "
          f"{requeued - signalled:.1f} s (stopped at step {stop_step}); release -> done {finished - requeued:.1f} s")


def test_slurm_failure_on_one_node_stops_the_job_and_is_not_requeued(cluster, digit_shards, tmp_path):
    """nodeB's trainer reads only bad shards (NoValidSamples at its first batch): every rank stops
    within 30 s, the failing rank's line is in the job log, the job fails and is not requeued."""
    from tests.test_multinode import bad_shards

    per_node = tmp_path / "per-node"
    per_node.mkdir()
    (per_node / "nodeA").symlink_to(digit_shards)
    bad_shards(per_node / "nodeB")
    run_dir = tmp_path / "fails"
    # each node's trainer resolves data.shards with its own SLURMD_NODENAME
    job_id, started = submit(cluster, "configs/vae_digits.yaml", run_dir, per_node,
                             f"data.shards={per_node}/${{oc.env:SLURMD_NODENAME,nodeA}}", "data.image_size=32",
                             "data.channels=1", "trainer.max_steps=50", "trainer.ckpt_every=50")
    log_path = run_dir / "launch" / f"slurm-{job_id}.out"
    read = lambda: log_path.read_text() if log_path.exists() else ""  # noqa: E731
    wait_for(lambda: "on nodeB failed: NoValidSamples: no valid samples" in read(), 300, "nodeB's rank to fail",
             cluster, run_dir, interval=0.2)
    failed = time.time()
    wait_for(lambda: "not requeued" in read() and cluster.state(job_id) in ("", "COMPLETING"), 120,
             "the job to end", cluster, run_dir, interval=0.2)
    ended = time.time()
    time.sleep(3)  # a requeue would show by now
    job, log = cluster.job(job_id), read()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", (job, log[-4000:])
    assert job["ExitCode"] != "0:0" and not job["ExitCode"].startswith("75:"), job["ExitCode"]
    assert cluster.state(job_id) == ""  # not pending again
    assert "stopping, rank" in log and "requeueing" not in log
    assert not (run_dir / ".lock").exists()  # released by the rank that held it as it stopped
    assert ended - failed < 30, f"the job took {ended - failed:.0f} s to end after a rank failed\n{log[-4000:]}"
    print(f"\n[slurm] job {job_id}: a rank on nodeB failed; the job ended {ended - failed:.1f} s later, "
          f"ExitCode={job['ExitCode']}, Restarts={job['Restarts']}")
