"""A disk that fills up while a checkpoint is written, for real, on a small tmpfs (needs root, as CI
has): the previous checkpoint stays the latest and verifies, the partial one is removed, training
goes on and the next checkpoint tries again; a final checkpoint that cannot be written ends the run
with one line and a non-zero exit."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_gentrain
from trainers.runtime.checkpoint import latest_complete, verify

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")]

ARGS = ("data.batch_size=16", "model.base_channels=8", "trainer.ckpt_every=4", "trainer.keep_checkpoints=1",
        "trainer.sample_every=1000", "trainer.log_every=4", "trainer.progress=false", "wandb.mode=disabled")


@pytest.fixture
def small_fs(tmp_path, digit_shards):
    """(mount point, size X of one checkpoint in bytes) for a tmpfs of 2.5 X: with a filler file of X
    it holds one checkpoint and not a second; without it, two."""
    probe = tmp_path / "probe"
    run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={probe}", f"data.shards={digit_shards}",
                 "trainer.max_steps=4", *ARGS)
    one = sum(f.stat().st_size for f in (probe / "checkpoints" / "step-0000004").rglob("*") if f.is_file())
    mount = tmp_path / "fs"
    mount.mkdir()
    size_kb = int(one * 2.5 / 1024) + 256  # + room for metrics.jsonl, config.yaml, the lock
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], check=True)
    try:
        yield mount, one
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_last_good_checkpoint_and_retries(small_fs, digit_shards):
    mount, one = small_fs
    filler = mount / "filler"
    filler.write_bytes(b"\0" * one)  # the disk is full before step 8's checkpoint fits...
    run = mount / "run"
    cmd = [sys.executable, "-m", "launcher.cli", "train", "configs/vae_digits.yaml", f"run.dir={run}",
           f"data.shards={digit_shards}", "trainer.max_steps=12", *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, freed = [], False
    for line in proc.stdout:
        lines.append(line)
        if "checkpoint NOT written" in line and not freed:
            assert "step 8" in line and "No space left on device" in line and "step-0000004" in line
            assert latest_complete(run / "checkpoints").name == "step-0000004"
            assert not list((run / "checkpoints").glob("*.partial"))  # the partial one is gone
            assert verify(run / "checkpoints" / "step-0000004") is None
            filler.unlink()  # ...and space comes back before step 12's
            freed = True
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    assert freed, "".join(lines[-30:])
    latest = latest_complete(run / "checkpoints")
    assert latest.name == "step-0000012" and verify(latest) is None


def test_a_final_checkpoint_that_cannot_be_written_ends_the_run_with_one_line(small_fs, digit_shards):
    mount, one = small_fs
    (mount / "filler").write_bytes(b"\0" * one)
    run = mount / "run"
    proc = run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={run}", f"data.shards={digit_shards}",
                        "trainer.max_steps=8", *ARGS, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 75), out[-3000:]
    assert "the final checkpoint could not be written" in out and "MiB free on the checkpoint filesystem" in out
    latest = latest_complete(run / "checkpoints")
    assert latest.name == "step-0000004" and verify(latest) is None
    assert not list((run / "checkpoints").glob("*.partial"))
