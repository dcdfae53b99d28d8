"""Nothing orphaned, nothing hangs, one job per run directory: the pieces, with real processes.

- a trainer started by a launcher dies with it (parent-death signal), even in a session of its own;
- one rank's exception stops every rank (the abort flag in the job's store), with its message;
- RUN_DIR/.lock: a live job's lock refuses with one line; a dead job's (pid gone on this host, or a
  lease not renewed) is taken over; a job whose lock was taken over is told.

Fast: no training. The end-to-end tests are in test_resilience.py, test_multinode.py, test_slurm.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from trainers.runtime.abort import pid_alive
from trainers.runtime.distributed import free_port
from trainers.runtime.run_lock import RunLock, RunLocked, check_free, read_lock, this_process

ARMED_CHILD = """
import os, sys, time
from trainers.runtime.abort import die_with_parent
print("armed" if die_with_parent() else "not armed", os.getpid(), flush=True)
time.sleep(60)
"""

LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)  # as torchrun does
print(child.pid, flush=True)
time.sleep(60)
"""


def wait_gone(pid: int, timeout: float) -> float:
    started = time.monotonic()
    while pid_alive(pid):
        assert time.monotonic() - started < timeout, f"process {pid} still alive after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_trainer_dies_with_its_launcher_even_in_a_session_of_its_own():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, ARMED_CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "RANK": "0"}, start_new_session=True)
    try:
        child = int(launcher.stdout.readline())
        assert launcher.stdout.readline().split() == ["armed", str(child)]  # the child's own line
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: the child is not in it
        launcher.wait()
        took = wait_gone(child, 5)
    finally:
        launcher.kill()
    print(f"\n[abort] child gone {took:.2f} s after its launcher")


def test_a_trainer_whose_launcher_is_already_gone_exits():
    dead = subprocess.Popen(["true"])
    dead.wait()
    proc = subprocess.run([sys.executable, "-c", ARMED_CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RANK": "0", "GENTRAIN_LAUNCHER_PID": str(dead.pid)})
    assert proc.returncode == 1 and "launcher that started this trainer is gone" in proc.stderr


def test_a_plain_train_in_a_shell_is_not_tied_to_it():
    proc = subprocess.run([sys.executable, "-c", ARMED_CHILD.replace("time.sleep(60)", "")], cwd=ROOT, timeout=60,
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")})
    assert proc.stdout.startswith("not armed")


# ---- one rank fails, every rank stops -------------------------------------------------------------
RANK_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from trainers.runtime.abort import JobGuard
dist.init_process_group("gloo")
rank = dist.get_rank()
guard = JobGuard(rank, dist.get_world_size(), dist.distributed_c10d._get_default_store())
guard.cleanups.append(lambda: print(f"cleanup on rank {rank}", flush=True))
with guard:
    if rank == 1:
        time.sleep(1.0)
        print(f"failing at {time.time()}", flush=True)
        raise RuntimeError("planted failure\\nsecond line")
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: without the guard this waits for gloo's timeout
print("not reached", flush=True)
"""


def test_one_rank_failing_stops_every_rank_with_its_message(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    ended = time.time()
    (out0, err0), (out1, err1) = outs
    assert procs[1].returncode == 1, err1
    assert procs[0].returncode == 1, (out0, err0)
    host = socket.gethostname()
    assert f"[gentrain] rank 1 on {host} failed: RuntimeError: planted failure\n" in out1
    assert "Traceback" in err1 and "planted failure" in err1  # an unexpected error keeps its traceback
    assert f"[gentrain] rank 0: stopping, rank 1 on {host} failed: RuntimeError: planted failure\n" in out0
    assert "cleanup on rank 0" in out0 and "cleanup on rank 1" in out1 and "not reached" not in out0
    failed_at = float(next(line for line in out1.splitlines() if line.startswith("failing at")).split()[-1])
    assert ended - failed_at < 10, f"the job took {ended - failed_at:.1f} s to stop"
    print(f"\n[abort] both ranks gone {ended - failed_at:.1f} s after rank 1 failed")


# ---- a finished rank exits cleanly ------------------------------------------------------------------
STORE_SERVER = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, True, timeout=timedelta(seconds=30),
                      wait_for_workers=False)
print("up", flush=True)
time.sleep(60)
"""
# The watcher is inside a store call (the GIL released, in C++) when this rank leaves its guard: the
# server is stopped, so the call cannot return until the test continues the server, 0.5 s later. A
# guard that does not wait for its watcher is by then in interpreter shutdown (held there by a
# module-teardown __del__ that sleeps without the GIL); a daemon thread that takes the GIL back then
# is ended by pthread_exit inside pybind11's noexcept frame: std::terminate, SIGABRT, "terminate
# called without an active exception": a run that had finished and checkpointed, reported as failed
# by its launcher (seen once in CI).
FINISHED_RANK = """
import os, signal, sys, time
from datetime import timedelta
import torch.distributed as dist
import trainers.runtime.abort as abort
abort.POLL_S = 0.05
server = int(sys.argv[2])
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, False, timeout=timedelta(seconds=30))
class SlowTeardown:
    def __del__(self, sleep=time.sleep):
        sleep(2.0)
teardown = SlowTeardown()
with abort.JobGuard(0, 2, store, host="h"):
    time.sleep(0.5)  # the watcher polls
    os.kill(server, signal.SIGSTOP)
    time.sleep(0.5)  # ... and is now blocked in store.check
    print("leaving the guard", flush=True)
print("finished", flush=True)
"""


def test_a_finished_rank_exits_0_although_its_watcher_was_inside_a_store_call():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", STORE_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "up\n"
        rank = subprocess.Popen([sys.executable, "-c", FINISHED_RANK, str(port), str(server.pid)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert rank.stdout.readline() == "leaving the guard\n"
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGCONT)  # the watcher's store call returns now
        out, err = rank.communicate(timeout=60)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()
    assert out == "finished\n"
    assert rank.returncode == 0, err


# ---- one run directory, one job -------------------------------------------------------------------
def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {**this_process(60), **fields}
    (run_dir / ".lock").write_text(json.dumps(info))
    return info


def test_a_live_lock_refuses_with_one_line_naming_the_job(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(RunLocked) as caught:
            RunLock(run_dir).acquire()
        line = str(caught.value)
        assert "\n" not in line and f"pid {os.getpid()}" in line and "host " in line and "started 20" in line
        with pytest.raises(RunLocked):
            check_free(run_dir)
    assert read_lock(run_dir) is None  # released
    check_free(run_dir)


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid=dead.pid)
    check_free(run_dir)
    lock = RunLock(run_dir).acquire()
    assert lock.took_over["pid"] == dead.pid and read_lock(run_dir)["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_the_job(tmp_path):
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid_start=1)  # this process's pid, but another start time
    RunLock(run_dir).acquire().release()


def test_another_hosts_lock_holds_until_its_lease_expires(tmp_path):
    run_dir = tmp_path / "run"
    info = write_lock(run_dir, host="elsewhere", lease_s=30)
    with pytest.raises(RunLocked, match="host elsewhere.*lease renewed 0 s ago"):
        RunLock(run_dir).acquire()
    write_lock(run_dir, host="elsewhere", lease_s=30, renewed=info["renewed"] - 31)
    lock = RunLock(run_dir).acquire()
    assert lock.took_over["host"] == "elsewhere"
    lock.release()


def test_a_damaged_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("{not json")
    RunLock(run_dir).acquire().release()
    assert not any(p.name.startswith(".lock") for p in run_dir.iterdir())  # no temp files left


def test_the_lease_is_renewed_and_a_lost_lock_is_reported(tmp_path):
    run_dir = tmp_path / "run"
    lost = []
    lock = RunLock(run_dir, lease_s=0.8, on_lost=lost.append).acquire()
    first = read_lock(run_dir)["renewed"]
    time.sleep(0.7)
    assert read_lock(run_dir)["renewed"] > first
    write_lock(run_dir, host="elsewhere")  # someone took it over
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "host elsewhere" in lost[0]
    lock.release()
    assert read_lock(run_dir)["host"] == "elsewhere"  # not ours: left alone


# ---- exit codes: only a preemption requeues -------------------------------------------------------
@pytest.mark.parametrize("codes,expected", [
    ([75], 75), ([-15, 75], 75), ([1, 75], 1),   # a failed rank beside a checkpointed one: a failure
    ([2], 2), ([-15, 2], 2), ([1, 2], 1), ([1], 1), ([-9], 1),
])
def test_the_torchrun_wrapper_says_75_only_for_a_clean_preemption(codes, expected):
    from launcher.torchrun import _requeue_or_fail

    assert _requeue_or_fail(codes, "workers failed") == expected


FAKE_SRUN = """#!/bin/bash
# one torchrun per node: each writes its exit code, srun reports the highest
i=0; top=0
for code in $FAKE_CODES; do
  mkdir -p "$GENTRAIN_PID_DIR"; echo "$code" > "$GENTRAIN_PID_DIR/node-$i.exit"
  [ "$code" -gt "$top" ] && top=$code; i=$((i + 1))
done
exit $top
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo nodeA; echo nodeB ;;
  "show node") echo "NodeName=$3 NodeAddr=127.0.0.1" ;;
  requeue*) echo requeue >> "$REQUEUED" ;;
esac
"""


@pytest.mark.parametrize("codes,requeued,rc", [("75 75", True, 75), ("75 1", False, 1), ("1 2", False, 2),
                                               ("0 0", False, 0)])
def test_the_sbatch_script_requeues_only_when_every_node_checkpointed(tmp_path, codes, requeued, rc):
    from launcher.slurm import SlurmSpec, render_sbatch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "sbatch.sh"
    script.write_text(render_sbatch(SlurmSpec(job_name="t", run_dir=str(tmp_path / "run"), workdir=str(tmp_path),
                                              nnodes=2)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "x",
           "SLURM_JOB_NUM_NODES": "2", "FAKE_CODES": codes, "REQUEUED": str(tmp_path / "requeued")}
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert (tmp_path / "requeued").exists() == requeued, proc.stdout
    if rc not in (0, 75):
        assert "not requeued" in proc.stdout


def test_a_build_lock_left_by_a_killed_process_is_cleared_and_a_live_ones_is_waited_for(tmp_path):
    """DeepSpeed loads its shm op under torch's plain-file build lock at every process-group init;
    a process killed while holding it left the file, and every later run waited on it forever.
    Here A holds the build guard with torch's lock in place (mid-build); B, started beside it,
    must wait and not touch A's lock; A is SIGKILLed; B then clears the orphan and goes on."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    holder = ("import time, pathlib\n"
              "from trainers.runtime.distributed import extension_build_guard\n"
              "with extension_build_guard():\n"
              f"    lock = pathlib.Path({str(tmp_path)!r}) / 'deepspeed_shm_comm' / 'lock'\n"
              "    lock.parent.mkdir(parents=True, exist_ok=True); lock.touch()  # as torch's FileBaton does\n"
              "    print('building', flush=True); time.sleep(120)\n")
    waiter = ("from trainers.runtime.distributed import extension_build_guard\n"
              "print('importing done', flush=True)\n"
              "with extension_build_guard():\n"
              "    print('entered', flush=True)\n")
    a = subprocess.Popen([sys.executable, "-c", holder], env=env, stdout=subprocess.PIPE, text=True)
    b = None
    try:
        assert a.stdout.readline().strip() == "building"
        lock = tmp_path / "deepspeed_shm_comm" / "lock"
        b = subprocess.Popen([sys.executable, "-c", waiter], env=env, stdout=subprocess.PIPE, text=True)
        assert b.stdout.readline().strip() == "importing done"
        with pytest.raises(subprocess.TimeoutExpired):
            b.wait(timeout=3)  # waits on A
        assert lock.exists()  # a live build's lock is left alone
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        with pytest.raises(ProcessLookupError):
            os.kill(a.pid, 0)  # A is gone, its lock file is not
        out, _ = b.communicate(timeout=60)
        assert b.returncode == 0 and out.splitlines()[-1] == "entered"
        assert f"removed {lock}" in out and not lock.exists()
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
