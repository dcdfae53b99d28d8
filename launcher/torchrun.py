"""Build torchrun command lines: what `gentrain launch` runs on this machine."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class TorchrunSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    train_args: list[str] = field(default_factory=list)


def torchrun_command(spec: TorchrunSpec, python: str = sys.executable) -> list[str]:
    """The command that starts `gentrain train` in nproc_per_node processes on this node."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}",
           f"--nnodes={spec.nnodes}", f"--max-restarts={spec.max_restarts}"]
    if spec.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}"]
    elif spec.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--node-rank={spec.node_rank}", f"--master-addr={spec.master_addr}",
                f"--master-port={spec.master_port}"]
    return cmd + ["-m", "launcher.cli", "train", *spec.train_args]
