import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to W&B's servers, and reuse DeepSpeed's compiled comm op between runs.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gentrain" / "torch_extensions"))
# `make test` runs two pytest-xdist workers on two cores: each worker, and every trainer it starts,
# takes one OpenMP thread (two 2-thread processes on 2 cores spin-wait each other 10-24x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_gentrain(*args, cwd=None, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    """Run the real `gentrain` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"gentrain {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as 32x32 PNG shards (1,797 samples, 8 shards)."""
    out = tmp_path_factory.mktemp("digits")
    run_gentrain("shards", "build", "digits", "--out", out, "--shard-size", 256, "--quiet")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and steady on a machine shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank(monkeypatch):
    """A world of one in this process; its RANK/MASTER_PORT do not leak into later `gentrain` children."""
    from trainers.runtime.distributed import free_port, init_distributed

    port = free_port()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, os.environ.get(key, value) if key != "MASTER_PORT" else value)
    return init_distributed()
