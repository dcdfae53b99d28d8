"""Process-group set-up and the few collectives the loop needs.

The trainer never asks how it was started: torchrun, srun and the deepspeed launcher all leave
RANK / WORLD_SIZE / LOCAL_RANK (or SLURM_*) in the environment; a bare `gentrain train` is a
world of one.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env_from_slurm() -> None:
    """srun without torchrun: map SLURM's variables to the ones torch.distributed reads."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


STALE_BUILD_LOCK_S = 600  # DeepSpeed's C++ op builds take 45-100 s here; a lock this old is an orphan


def clear_stale_build_locks() -> list[Path]:
    """Remove torch's extension-build locks left by a process killed mid-build.

    DeepSpeed JIT-builds its shm comm op on every process-group init under a file lock
    (torch.utils.file_baton); a build killed with -9 leaves the lock behind, and every later
    run waits on it forever, silently. A lock older than any real build is removed, with a line.
    torch builds in TORCH_EXTENSIONS_DIR/<op> when that is set (the Makefile sets it), else in
    ~/.cache/torch_extensions/<python>_<device>/<op>: both layouts are searched."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(explicit) if explicit else Path.home() / ".cache" / "torch_extensions"
    removed = []
    for lock in root.glob("*/lock" if explicit else "*/*/lock") if root.is_dir() else ():
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                lock.unlink()
                removed.append(lock)
                print(f"[gentrain] removed a stale extension-build lock {lock} (left by a build that was killed)",
                      flush=True)
        except OSError:
            pass  # another process removed it first
    return removed


def init_distributed() -> DistInfo:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA."""
    import deepspeed  # deferred: importing deepspeed is slow and prints accelerator banners

    _fill_env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        clear_stale_build_locks()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars over all ranks (one collective for the whole dict)."""
    if not values or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank: how ranks agree to stop at a step boundary."""
    if dist.get_world_size() == 1:
        return flag
    buf = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
