"""`gentrain launch`: what each backend would run (--dry-run), the rendered sbatch script and hostfile,
and the checks that stop a launch with exit code 2 and one line. Fast, no root, no cluster.

The last tests (marked slow) run for real: the torchrun wrapper's exit code and SIGUSR1 relay, and
a VAE trained through the `deepspeed` launcher.
"""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from launcher.cli import main
from launcher.hostfile import parse_hosts, render_hostfile
from launcher.resources import LaunchError, Resources, check_global_batch, check_local_devices
from tests.conftest import ROOT, run_gentrain
from trainers.runtime.distributed import free_port

VAE = "configs/vae_digits.yaml"


def launch(capsys, *args):
    code = main(["launch", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gentrain: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- local and multi-node torchrun --------------------------------------------------------
def test_local_dry_run_prints_the_torchrun_command(capsys, tmp_path):
    code, out, err = launch(capsys, "--dry-run", "--nproc-per-node", 2, VAE, f"run.dir={tmp_path}/r", "data.batch_size=16")
    assert code == 0
    cmd = shlex.split(out.splitlines()[0])
    assert cmd[:3] == [sys.executable, "-m", "launcher.torchrun"]
    assert {"--nnodes=1", "--nproc-per-node=2", "--standalone", "--max-restarts=0"} <= set(cmd)
    assert cmd[-6:] == ["-m", "launcher.cli", "train", VAE, f"run.dir={tmp_path}/r", "data.batch_size=16"]
    assert "world size 2" in out and "32 per step" in out
    assert not (tmp_path / "r").exists()  # a dry run creates nothing


def test_multinode_rendezvous_and_static_dry_runs(capsys):
    code, out, _ = launch(capsys, "--dry-run", "--nnodes", 2, "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "exp1",
                          "--max-restarts", 3, VAE)
    cmd = shlex.split(out.splitlines()[0])
    assert code == 0
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=exp1",
            "--max-restarts=3"} <= set(cmd) and "--standalone" not in cmd
    code, out, _ = launch(capsys, "--dry-run", "--nnodes", 2, "--node-rank", 1, "--master-addr", "10.0.0.1",
                          "--master-port", 29555, VAE)
    cmd = shlex.split(out.splitlines()[0])
    assert code == 0 and {"--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29555"} <= set(cmd)


def test_multinode_needs_a_rendezvous(capsys):
    code, _, err = launch(capsys, "--dry-run", "--nnodes", 2, VAE)
    assert_one_line_error(code, err, "--rdzv-endpoint")
    code, _, err = launch(capsys, "--dry-run", "--nnodes", 2, "--node-rank", 2, "--master-addr", "h", VAE)
    assert_one_line_error(code, err, "--node-rank 2")


# ---- checks -------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs")
def test_gpus_that_are_not_there_exit_2(capsys):
    code, _, err = launch(capsys, "--dry-run", "--gpus-per-node", 1, VAE)
    assert_one_line_error(code, err, "--gpus-per-node 1", "no GPU")


def test_device_checks_without_processes():
    gpu_box = Resources(cpus=64, gpus=8, gpu_names=("H100",) * 8)
    assert check_local_devices(gpu_box, 8, 8) == []
    with pytest.raises(LaunchError, match="only 8 GPU"):
        check_local_devices(gpu_box, 16, None)
    with pytest.raises(LaunchError, match="each process needs its own GPU"):
        check_local_devices(gpu_box, 4, 2)
    with pytest.raises(LaunchError, match="asked for"):
        check_local_devices(Resources(cpus=4, gpus=2), 1, 4)
    warnings = check_local_devices(Resources(cpus=2, gpus=0), 4, None)
    assert len(warnings) == 1 and "CPU-only" in warnings[0]
    assert check_global_batch(256, 64, 32) == 8
    with pytest.raises(LaunchError, match="does not divide"):
        check_global_batch(100, 64, 32)


def test_more_processes_than_cores_is_a_warning(capsys):
    code, out, err = launch(capsys, "--dry-run", "--nproc-per-node", (os.cpu_count() or 1) + 1, VAE)
    if torch.cuda.is_available():
        pytest.skip("GPU machine: this is an error there")
    assert code == 0 and "gentrain: warning:" in err and "CPU-only" in err


def test_global_batch_must_divide_over_the_world(capsys):
    code, _, err = launch(capsys, "--dry-run", "--nproc-per-node", 2, "--global-batch-size", 33, VAE)
    assert_one_line_error(code, err, "33", "world of 2")
    code, out, _ = launch(capsys, "--dry-run", "--nproc-per-node", 2, "--global-batch-size", 64, VAE)
    assert code == 0 and shlex.split(out.splitlines()[0])[-1] == "data.batch_size=32"
    code, _, err = launch(capsys, "--dry-run", "--global-batch-size", 64, VAE, "data.batch_size=8")
    assert_one_line_error(code, err, "not both")


def test_bad_world_and_bad_config_exit_2(capsys):
    code, _, err = launch(capsys, "--dry-run", "--nproc-per-node", 0, VAE)
    assert_one_line_error(code, err, "must be >= 1")
    code, _, err = launch(capsys, "--dry-run", "--backend", "slurm", VAE, "trainer.nope=1")
    assert_one_line_error(code, err, "trainer.nope")


# ---- slurm --------------------------------------------------------------------------------
SLURM_ARGS = ("--backend", "slurm", "--nnodes", 4, "--gpus-per-node", 8, "--cpus-per-task", 64, "--time", "24:00:00",
              "--partition", "gpu", "--account", "proj", "--qos", "high", "--signal-grace", 90)


def test_slurm_dry_run_renders_the_batch_script(capsys, tmp_path):
    run_dir = tmp_path / "gan"
    code, out, err = launch(capsys, "--dry-run", *SLURM_ARGS, "configs/gan_digits.yaml", f"run.dir={run_dir}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"# {run_dir}/launch/sbatch.sh" and lines[1] == "#!/bin/bash"
    for sbatch in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--time=24:00:00",
                   "--partition=gpu", "--account=proj", "--qos=high", f"--output={run_dir}/launch/slurm-%j.out",
                   "--signal=B:USR1@90", "--requeue", "--open-mode=append", "--job-name=gan_digits"):
        assert f"#SBATCH {sbatch}" in lines, sbatch
    script = out
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "trap 'forward USR1' USR1" in script and "trap 'forward TERM' TERM" in script
    assert 'kill -USR1 "$srun_pid"' in script
    assert "srun --ntasks-per-node=1" in script and "-m launcher.torchrun" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="${head_addr}:${rdzv_port}"' in script
    assert "--nproc-per-node=8" in script and f"train configs/gan_digits.yaml run.dir={run_dir} &" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "REQUEUE_EXIT_CODE=75" in script
    assert "SLURM_RESTART_COUNT" in script and "export OMP_NUM_THREADS=8" in script
    assert lines[-2] == f"# submit: sbatch --parsable {run_dir}/launch/sbatch.sh"
    assert "world size 32" in lines[-1]
    assert not run_dir.exists()
    body = out.split("\n", 1)[1].rsplit("# submit:", 1)[0]
    assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0  # valid bash


def test_slurm_no_submit_writes_the_script(capsys, tmp_path):
    run_dir = tmp_path / "vae"
    code, out, _ = launch(capsys, "--backend", "slurm", "--no-submit", "--nnodes", 2, VAE, f"run.dir={run_dir}")
    path = run_dir / "launch" / "sbatch.sh"
    assert code == 0 and f"wrote {path}" in out
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert "#SBATCH --nodes=2" in text and "--nproc-per-node=1" in text and "--gpus-per-node" not in text


def test_slurm_checks(capsys, monkeypatch, tmp_path):
    code, _, err = launch(capsys, "--dry-run", "--backend", "slurm", "--gpus-per-node", 2, "--nproc-per-node", 4, VAE)
    assert_one_line_error(code, err, "each process needs its own GPU")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, _, err = launch(capsys, "--backend", "slurm", VAE, f"run.dir={tmp_path}/r")
    assert_one_line_error(code, err, "sbatch", "--dry-run")
    assert not (tmp_path / "r").exists()


# ---- deepspeed ----------------------------------------------------------------------------
def test_hostfile():
    hosts = parse_hosts("node1:8, node2", 4)
    assert hosts == [("node1", 8), ("node2", 4)]
    assert render_hostfile(hosts) == "node1 slots=8\nnode2 slots=4\n"
    for bad in ("a:x", "a:0", "a,a", ","):
        with pytest.raises(LaunchError):
            parse_hosts(bad, 1)


def test_deepspeed_dry_run_uses_the_real_launcher_flags(capsys, tmp_path):
    run_dir = tmp_path / "ds"
    code, out, err = launch(capsys, "--dry-run", "--backend", "deepspeed", "--hosts", "node1:8,node2:8",
                            "--master-port", 29600, VAE, f"run.dir={run_dir}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [f"# {run_dir}/launch/hostfile:", "#   node1 slots=8", "#   node2 slots=8"]
    cmd = shlex.split(lines[3])
    assert cmd[0].endswith("deepspeed")
    assert {f"--hostfile={run_dir}/launch/hostfile", "--num_nodes=2", "--master_addr=node1", "--master_port=29600",
            "--no_local_rank", "--module"} <= set(cmd)
    assert "world size 16" in lines[4]
    assert not run_dir.exists()
    # The flags are the ones deepspeed's own runner accepts.
    from deepspeed.launcher.runner import parse_args

    ds = parse_args(cmd[1:])
    assert ds.hostfile == f"{run_dir}/launch/hostfile" and ds.master_addr == "node1" and ds.master_port == 29600
    assert ds.module and ds.no_local_rank and ds.user_script == "launcher.cli"
    assert ds.user_args == ["train", VAE, f"run.dir={run_dir}"]


def test_deepspeed_bad_hosts_exit_2(capsys):
    code, _, err = launch(capsys, "--dry-run", "--backend", "deepspeed", "--hosts", "a:x", VAE)
    assert_one_line_error(code, err, "a:x")


# ---- real processes -------------------------------------------------------------------------
WORKER = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(sys.argv[1] + f".{os.environ['RANK']}", "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
sys.exit(75 if got else 3)
"""


@pytest.mark.slow
def test_torchrun_wrapper_relays_usr1_and_keeps_exit_75(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc-per-node=2",
                             str(script), str(ready)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while not (ready.with_suffix(".0").exists() and ready.with_suffix(".1").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # plain torchrun would die of it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "SIGUSR1 -> 2 worker(s)" in out and "exiting 75 (requeue me)" in out


@pytest.mark.slow
def test_deepspeed_backend_trains_on_localhost(tmp_path, digit_shards):
    run_dir = tmp_path / "ds-vae"
    started = time.time()
    proc = run_gentrain("launch", "--backend", "deepspeed", "--hosts", "localhost:2", "--master-port", free_port(),
                        VAE, f"run.dir={run_dir}", f"data.shards={digit_shards}", "data.batch_size=16",
                        "trainer.max_steps=4", "trainer.log_every=1", "trainer.sample_every=4", "trainer.ckpt_every=4",
                        "trainer.progress=false")
    assert (run_dir / "launch" / "hostfile").read_text() == "localhost slots=2\n"
    assert "2 process(es)" in proc.stdout and "done: 4 steps" in proc.stdout
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-0000004" and (latest / "trainer-rank00001.pt").exists()
    import json

    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    print(f"\n[deepspeed] launch -> first step {first['time'] - started:.1f} s")
