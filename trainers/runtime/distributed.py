"""Process-group set-up and the few collectives the loop needs.

The trainer never asks how it was started: torchrun, srun and the deepspeed launcher all leave
RANK / WORLD_SIZE / LOCAL_RANK (or SLURM_*) in the environment; a bare `gentrain train` is a
world of one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
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


# Where DeepSpeed JIT-builds its C++ ops unless TORCH_EXTENSIONS_DIR says otherwise (the Makefile,
# tests and benches use the same folder): gentrain's own, so only gentrain processes build in it.
EXTENSIONS_DIR = Path.home() / ".cache" / "gentrain" / "torch_extensions"
BUILD_GUARD = "gentrain-build.flock"


@contextlib.contextmanager
def extension_build_guard():
    """Hold gentrain's lock on the extension-build folder while DeepSpeed builds or loads its ops,
    and remove torch's build locks that a dead process left there.

    DeepSpeed loads its shm comm op at every process-group init, under torch's build lock
    (torch.utils.file_baton): a plain file that every later loader waits on, forever and silently,
    if its holder was killed (SIGKILL, or a SIGTERM that arrives before gentrain's handler is
    installed, as a preemption during start-up does). The kernel drops a flock when its holder
    dies, so whoever holds this one knows any torch lock in the folder belongs to a dead process."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / BUILD_GUARD, "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # a rank beside us building: wait for it (one build at a time)
        except OSError as exn:  # a filesystem without locks: build as DeepSpeed would, unguarded
            print(f"[gentrain] cannot lock {root / BUILD_GUARD} ({exn}); stale build locks are not cleared",
                  flush=True)
            yield
            return
        try:
            for lock in root.glob("*/lock"):
                lock.unlink(missing_ok=True)
                print(f"[gentrain] removed {lock}: an extension build lock left by a process that was killed",
                      flush=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def preload_extension_ops() -> None:
    """Load DeepSpeed's shm comm op (CPU runs) under extension_build_guard.

    deepspeed.init_distributed loads it too, but then joins the process group in the same call: under
    a lock, rank 0 would wait for rank 1 to join while rank 1 waits for the lock. DeepSpeed keeps a
    loaded op for the life of the process (OpBuilder._loaded_ops), so its own load finds this one and
    never takes torch's build lock."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # no such op on this accelerator, or DeepSpeed cannot build it here: nothing to guard
    with extension_build_guard():
        builder.load(verbose=False)


def init_distributed() -> DistInfo:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA."""
    import deepspeed  # deferred: importing deepspeed is slow and prints accelerator banners

    _fill_env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        preload_extension_ops()
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
