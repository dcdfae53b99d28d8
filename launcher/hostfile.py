"""The `deepspeed` launcher backend: an MPI-style hostfile and the deepspeed command line.

The hostfile (`runs/NAME/launch/hostfile`) has one line per host, `HOST slots=K` where K is the
number of processes (GPUs) on that host. Hosts come from --hosts (`a,b` or `a:8,b:4`) or, inside
a SLURM allocation, from SLURM_JOB_NODELIST. The deepspeed launcher starts the processes on the
other hosts over pdsh/ssh (passwordless ssh needed), or runs locally when the only host is this
one; each process runs `python -m launcher.cli train CONFIG ...` and reads RANK/WORLD_SIZE from
the environment the launcher sets.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from launcher.resources import LaunchError

LOCAL_HOSTS = {"localhost", "127.0.0.1"}


def parse_hosts(text: str, default_slots: int) -> list[tuple[str, int]]:
    """`a,b` or `a:8,b:4` -> [(host, slots)]."""
    hosts = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, slots = item.partition(":")
        try:
            count = int(slots) if slots else default_slots
        except ValueError:
            raise LaunchError(f"bad --hosts entry '{item}': use HOST or HOST:SLOTS") from None
        if not name or count < 1:
            raise LaunchError(f"bad --hosts entry '{item}': use HOST or HOST:SLOTS with SLOTS >= 1")
        hosts.append((name, count))
    if not hosts:
        raise LaunchError("--hosts is empty")
    names = [h for h, _ in hosts]
    if len(set(names)) != len(names):
        raise LaunchError(f"--hosts lists a host twice: {text}")
    return hosts


def render_hostfile(hosts: list[tuple[str, int]]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts)


def write_hostfile(run_dir: str | Path, hosts: list[tuple[str, int]]) -> Path:
    path = Path(run_dir) / "launch" / "hostfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_hostfile(hosts))
    return path


def deepspeed_executable(python: str = sys.executable) -> str:
    beside = Path(python).parent / "deepspeed"
    return str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")


def deepspeed_command(hostfile: str | Path, hosts: list[tuple[str, int]], master_addr: str | None, master_port: int,
                      train_args: list[str], python: str = sys.executable, launcher: str | None = None,
                      no_ssh_node_rank: int | None = None) -> list[str]:
    """`deepspeed --hostfile H --master_addr A --master_port P --module launcher.cli train ...`.

    --no_local_rank: our trainer reads LOCAL_RANK from the environment and takes no --local_rank
    argument. --master_addr defaults to the first host (deepspeed would otherwise ssh to it and ask
    `hostname -I`). no_ssh_node_rank: run only this host's processes, as node R, without ssh
    (deepspeed's --no_ssh --node_rank R; start the same command on every host, like torchrun).
    """
    cmd = [deepspeed_executable(python), f"--hostfile={hostfile}", f"--num_nodes={len(hosts)}",
           f"--master_addr={master_addr or hosts[0][0]}", f"--master_port={master_port}"]
    if launcher:
        cmd.append(f"--launcher={launcher}")
    if no_ssh_node_rank is not None:
        cmd += ["--no_ssh", f"--node_rank={no_ssh_node_rank}"]
    return cmd + ["--no_local_rank", "--module", "launcher.cli", "train", *train_args]


def only_this_machine(hosts: list[tuple[str, int]]) -> bool:
    import socket

    return all(h in LOCAL_HOSTS or h == socket.gethostname() for h, _ in hosts)
