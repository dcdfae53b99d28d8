"""Runs that survive: kill -9 and resume bit-exactly, non-finite steps skipped and rolled back."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.faults import kill_whole_job, process_tree, wait_all_gone
from tests.conftest import ROOT, run_gentrain
from trainers.runtime.checkpoint import checkpoint_tensors, differing_tensors

pytestmark = pytest.mark.slow

COMMON = ("data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=64", "trainer.log_every=2",
          "trainer.sample_every=5", "trainer.ckpt_every=3", "trainer.progress=false", "trainer.max_steps=14")


def launch_args(preset, run_dir, shards, *extra):
    return ["launch", "--nproc-per-node", 2, preset, f"run.dir={run_dir}", f"data.shards={shards}", *COMMON, *extra]


def start_background(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_delay(reference: Path) -> float:
    """Seconds to wait after a run's first checkpoint (step 3) before killing it: a random moment
    inside the uninterrupted `reference` run's own window from then to its end (mid-step, mid-save,
    ...), whatever the speed of the machine; a fixed 0-1 or 0-3 s often landed after a fast machine
    had finished the run, leaving nothing to kill."""
    times = {r["step"]: r["time"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    return random.uniform(0.0, 0.6 * max(times[14] - times[4], 0.2))


def latest_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.parametrize("preset", ["configs/vae_digits.yaml", "configs/gan_digits.yaml"])
def test_kill_9_at_a_random_moment_then_resume_is_bitwise_identical(tmp_path, digit_shards, preset):
    reference = tmp_path / "uninterrupted"
    run_gentrain(*launch_args(preset, reference, digit_shards))

    interrupted = tmp_path / "interrupted"
    proc = start_background(launch_args(preset, interrupted, digit_shards))
    latest = interrupted / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline:  # kill only once a checkpoint exists
        time.sleep(0.05)
    time.sleep(kill_delay(reference))
    # Every process of the job at once, each by pid (a machine crash): not the launcher's process
    # group, which misses torchrun's workers (sessions of their own); survivors would finish the run.
    killed = kill_whole_job(proc.pid)
    proc.wait()
    assert len(killed) >= 4, killed  # launch, torchrun, 2 trainers (+ loader workers, W&B's service)
    survivors = wait_all_gone(killed, 10, mentioning=f"run.dir={interrupted}")
    assert not survivors, f"still alive after kill -9 of the whole job: {survivors}"
    killed_at = latest.read_text().strip()

    resumed = run_gentrain(*launch_args(preset, interrupted, digit_shards))
    assert "resumed from" in resumed.stdout, f"did not resume (killed after {killed_at})"

    assert latest_checkpoint(interrupted).name == latest_checkpoint(reference).name == "step-0000014"
    compared = checkpoint_tensors(latest_checkpoint(reference))
    assert any("optim_states" in name for name in compared) and any("weights/" in name for name in compared)
    differing = differing_tensors(latest_checkpoint(reference), latest_checkpoint(interrupted))
    assert not differing, f"killed after {killed_at}: {len(differing)} tensors differ, e.g. {differing[:3]}"
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    # Each logged step once: what the killed process logged after its last checkpoint was moved out.
    assert steps == list(range(2, 15, 2)), steps


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def test_killing_the_launchers_process_group_ends_every_trainer(tmp_path, digit_shards):
    """kill -9 of `gentrain launch`'s process group (torchrun's workers are not in it): the trainers
    die with their launcher at once, their loader workers within seconds, and nothing more is written."""
    run_dir = tmp_path / "orphans"
    proc = start_background(launch_args("configs/gan_digits.yaml", run_dir, digit_shards,
                                        "trainer.max_steps=400", "trainer.ckpt_every=2"))
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.2)
    job = process_tree(proc.pid)
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in job}
    trainers = [pid for pid, cmd in cmdlines.items() if b"launcher.cli train" in cmd and b"torchrun" not in cmd]
    assert len(trainers) >= 4, cmdlines  # 2 trainers and a loader worker each
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    survivors = wait_all_gone(job, 10, mentioning=f"run.dir={run_dir}")
    gone_after = time.monotonic() - killed
    assert not survivors, f"alive 10 s after their launcher was killed: {survivors}"
    written = checkpoints(run_dir)
    time.sleep(3)  # survivors would go on checkpointing every 2 steps
    assert checkpoints(run_dir) == written and "step-0000400" not in written
    print(f"\n[orphans] every process of the job gone {gone_after:.1f} s after the launcher's group was killed")


def test_a_second_job_on_a_live_run_directory_exits_2_and_touches_nothing(tmp_path, digit_shards):
    """Two real `gentrain train` on one run directory; then the lock of the first, killed with -9,
    does not block the resume."""
    run_dir = tmp_path / "shared"
    args = ["train", "configs/vae_digits.yaml", f"run.dir={run_dir}", f"data.shards={digit_shards}",
            "data.batch_size=16", "trainer.ckpt_every=2", "trainer.progress=false"]
    first = start_background([*args, "trainer.max_steps=100000"])
    try:
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.time() + 300
        while not latest.exists() and time.time() < deadline:
            assert first.poll() is None, "the first job ended early"
            time.sleep(0.2)
        config, config_mtime = (run_dir / "config.yaml").read_text(), (run_dir / "config.yaml").stat().st_mtime_ns

        started = time.monotonic()
        second = run_gentrain(*args, "trainer.max_steps=5", "data.batch_size=8", check=False, timeout=120)
        took = time.monotonic() - started
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"gentrain: error: run directory {run_dir} is in use by another job (host ")
        assert f"pid {first.pid}, started " in lines[0]
        # not rewritten with the second job's config (batch size 8)
        assert (run_dir / "config.yaml").read_text() == config
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_mtime
        # `gentrain launch` refuses before starting anything
        launch = run_gentrain("launch", *args[1:], check=False, timeout=120)
        assert launch.returncode == 2 and "is in use by another job" in launch.stderr.strip().splitlines()[-1]
        assert "[gentrain] launch:" not in launch.stderr
    finally:
        killed = kill_whole_job(first.pid)
        first.wait()
    assert not wait_all_gone(killed, 10, mentioning=f"run.dir={run_dir}")
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid  # left behind by kill -9

    stopped_at = latest_checkpoint(run_dir).name  # complete ones only: kill -9 may have caught a .partial write
    resumed = run_gentrain(*args, f"trainer.max_steps={int(stopped_at.split('-')[1]) + 2}")
    assert "took over the lock of a job that is gone" in resumed.stdout and "resumed from" in resumed.stdout
    assert not (run_dir / ".lock").exists()  # released at the end
    print(f"\n[lock] second job refused in {took:.1f} s")


def test_non_finite_steps_are_skipped_counted_and_rolled_back(tmp_path, digit_shards):
    run_dir = tmp_path / "nan"
    proc = run_gentrain(*launch_args("configs/vae_digits.yaml", run_dir, digit_shards,
                                     "trainer.max_nonfinite_in_row=3", "trainer.max_steps=12", "trainer.ckpt_every=4"),
                        env={"GENTRAIN_FAULT_NONFINITE": "5:4"})
    # Steps 5, 6, 7 are non-finite -> roll back to step 4; the 4th poisoned step is the new step 5.
    assert "3 non-finite steps in a row: rolling back to" in proc.stdout
    assert "resumed from" in proc.stdout and "step-0000004 at step 4" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("nonfinite_skipped", 0) for r in records) == 4
    assert all(isinstance(v, (int, float)) and v == v for r in records for v in r.values())  # no NaN logged
    weights = load_file(run_dir / "checkpoints" / "step-0000012" / "weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_at_another_world_size_keeps_counters(tmp_path, digit_shards):
    run_dir = tmp_path / "elastic"
    args = lambda nproc, steps: ["launch", "--nproc-per-node", nproc, "configs/gan_digits.yaml",  # noqa: E731
                                 f"run.dir={run_dir}", f"data.shards={digit_shards}", "data.batch_size=16",
                                 "trainer.log_every=2", "trainer.ckpt_every=4", "trainer.progress=false",
                                 f"trainer.max_steps={steps}"]
    run_gentrain(*args(2, 4))
    shrink = run_gentrain(*args(1, 8))
    grow = run_gentrain(*args(2, 12))
    for out, before, now in [(shrink, 2, 1), (grow, 1, 2)]:
        assert f"written by {before} process(es), this run has {now}" in out.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    # images seen: 4 steps x 32, then 4 x 16, then 4 x 32
    assert [r["images_seen"] for r in records] == [64, 128, 160, 192, 256, 320]
    d_losses = [r["d_loss"] for r in records]
    assert all(0.1 < d < 3.0 for d in d_losses), d_losses  # the curve continues, no blow-up at a resize


def test_training_on_corrupt_shards_skips_and_counts_every_bad_sample(tmp_path):
    """The stream tests' planted corruption, trained on: 3 passes, every bad sample counted 3 times."""
    from tests.test_stream import PLANTED, build_corrupt_shards

    (tmp_path / "shards").mkdir()
    shards, valid = build_corrupt_shards(tmp_path / "shards")
    (shards / "shard-000003.tar").write_bytes(bytes(10240))  # an empty shard: just end-of-archive blocks
    run_dir = tmp_path / "run"
    assert len(valid) == 21  # batch 7, no shuffle window: exactly 3 passes in 9 steps
    run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={run_dir}", f"data.shards={shards}",
                 "data.image_size=16", "data.batch_size=7", "data.shuffle_buffer=1", "trainer.max_steps=9",
                 "trainer.log_every=9", "trainer.progress=false", "model.base_channels=8")
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {k[len("data/skipped_"):]: v for k, v in last.items() if k.startswith("data/skipped_")} == \
        {reason: 3 * n for reason, n in PLANTED.items()}
    assert last["loss"] == last["loss"]  # finite


def test_shards_with_no_valid_sample_stop_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    from tests.test_stream import write_tar

    write_tar(bad / "shard-000000.tar", [("a", [("png", b"not a png")]), ("b", [("cls", b"1")])])
    proc = run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={tmp_path / 'run'}", f"data.shards={bad}",
                        "trainer.max_steps=3", "data.num_workers=0", "trainer.progress=false", check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gentrain: error: no valid samples in shards")


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, digit_shards):
    run_dir = tmp_path / "damaged"
    args = ["train", "configs/vae_digits.yaml", f"run.dir={run_dir}", f"data.shards={digit_shards}",
            "data.batch_size=16", "trainer.ckpt_every=3", "trainer.keep_checkpoints=3", "trainer.progress=false"]
    run_gentrain(*args, "trainer.max_steps=6")
    weights = run_dir / "checkpoints" / "step-0000006" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # bit rot / a half-copied file
    proc = run_gentrain(*args, "trainer.max_steps=8")
    assert "skipping checkpoint step-0000006: weights.safetensors does not match" in proc.stdout
    assert "resumed from" in proc.stdout and "step-0000003 at step 3" in proc.stdout


def test_a_run_started_before_the_directorys_newest_step_sets_the_later_work_aside(tmp_path, digit_shards):
    """resume=never (or resume=PATH to an older checkpoint) in a directory whose earlier run got
    further: its checkpoints, ordered by step, used to outrank the new run's, so pruning deleted
    the new run's checkpoints as soon as they were written and the judge read the old weights.
    The later checkpoints and grids now move, untouched, to RUN/abandoned-<time>/."""
    run_dir = tmp_path / "reused"
    args = ["train", "configs/vae_digits.yaml", f"run.dir={run_dir}", f"data.shards={digit_shards}",
            "data.batch_size=16", "trainer.ckpt_every=3", "trainer.sample_every=3", "trainer.progress=false"]
    run_gentrain(*args, "trainer.max_steps=9")
    assert checkpoints(run_dir) == ["step-0000006", "step-0000009"]  # keep_checkpoints 2
    old = run_dir / "checkpoints" / "step-0000009"
    old_digest = (old / "COMPLETE").read_text()

    proc = run_gentrain(*args, "trainer.max_steps=4", "trainer.resume=never", "run.seed=1")
    assert "sample grid(s) of steps after 0 (the step this run starts from) moved to" in proc.stdout
    assert checkpoints(run_dir) == ["step-0000003", "step-0000004"] and latest_checkpoint(run_dir).name == "step-0000004"
    (aside,) = run_dir.glob("abandoned-*")
    assert sorted(p.name for p in (aside / "checkpoints").glob("step-*")) == ["step-0000006", "step-0000009"]
    assert (aside / "checkpoints" / "step-0000009" / "COMPLETE").read_text() == old_digest  # moved, not rewritten
    assert max(int(p.stem[-7:]) for p in (run_dir / "samples").glob("*.png")) <= 4
    assert {int(p.stem[-7:]) for p in (aside / "samples").glob("*.png")} == {3, 6, 9}

    # resume=PATH to an older checkpoint abandons the later one the same way
    time.sleep(1.1)  # the folder is named by the second
    run_gentrain(*args, "trainer.max_steps=5", f"trainer.resume={run_dir / 'checkpoints' / 'step-0000003'}")
    assert checkpoints(run_dir) == ["step-0000003", "step-0000005"]
    assert len(list(run_dir.glob("abandoned-*"))) == 2
