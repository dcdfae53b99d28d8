"""What this machine has (GPUs, CPUs, SLURM tools) and the checks `gentrain launch` runs first.

Every check that fails raises LaunchError: the CLI prints it as one line and exits with 2,
before any process starts. Checks that only risk slowness (more processes than CPU cores on a
CPU-only machine) return warnings instead.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


class LaunchError(Exception):
    """A launch request that cannot work here; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int
    gpu_names: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.gpus:
            names = sorted(set(self.gpu_names))
            return f"{self.gpus} GPU(s) ({', '.join(names)}), {self.cpus} CPU core(s)"
        return f"no GPU, {self.cpus} CPU core(s)"


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def detect() -> Resources:
    """GPUs visible to torch (honours CUDA_VISIBLE_DEVICES) and usable CPU cores."""
    gpus, names = 0, ()
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            names = tuple(torch.cuda.get_device_name(i) for i in range(gpus))
    except Exception:  # a broken CUDA install counts as no GPU; the check below then says so
        gpus = 0
    return Resources(cpus=cpu_count(), gpus=gpus, gpu_names=names)


SLURM_TOOLS = ("sbatch", "scontrol", "srun")


def missing_slurm_tools() -> list[str]:
    return [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]


def check_world(nnodes: int, nproc_per_node: int) -> int:
    if nnodes < 1 or nproc_per_node < 1:
        raise LaunchError(f"--nnodes ({nnodes}) and --nproc-per-node ({nproc_per_node}) must be >= 1")
    return nnodes * nproc_per_node


def check_global_batch(global_batch: int | None, per_process: int, world: int) -> int:
    """The per-process batch to use: data.batch_size, or global_batch / world when one is given."""
    if global_batch is None:
        if per_process < 1:
            raise LaunchError(f"data.batch_size must be >= 1, got {per_process}")
        return per_process
    if global_batch < 1 or global_batch % world:
        raise LaunchError(f"--global-batch-size {global_batch} does not divide over a world of {world} "
                          f"process(es); use a multiple of {world}")
    return global_batch // world


def check_local_devices(res: Resources, nproc_per_node: int, gpus_per_node: int | None) -> list[str]:
    """Checks for processes that start on *this* machine (local torchrun, deepspeed on localhost).

    Returns warnings; raises LaunchError for requests that cannot be met.
    """
    warnings = []
    if gpus_per_node:
        if gpus_per_node > res.gpus:
            raise LaunchError(f"--gpus-per-node {gpus_per_node} asked for, but this machine has {res.describe()}"
                              + (" (check CUDA_VISIBLE_DEVICES)" if os.environ.get("CUDA_VISIBLE_DEVICES") else ""))
        if nproc_per_node > gpus_per_node:
            raise LaunchError(f"--nproc-per-node {nproc_per_node} > --gpus-per-node {gpus_per_node}: "
                              "each process needs its own GPU")
    elif res.gpus and nproc_per_node > res.gpus:
        raise LaunchError(f"--nproc-per-node {nproc_per_node} but only {res.gpus} GPU(s) are visible; "
                          "each process needs its own GPU")
    if not res.gpus and nproc_per_node > res.cpus:
        warnings.append(f"--nproc-per-node {nproc_per_node} on a CPU-only machine with {res.cpus} core(s): "
                        "processes will share cores and run slowly")
    return warnings


def check_cluster_request(nproc_per_node: int, gpus_per_node: int, cpus_per_task: int | None) -> list[str]:
    """Checks for a SLURM request (the resources are on compute nodes, not on this machine)."""
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if gpus_per_node and nproc_per_node > gpus_per_node:
        raise LaunchError(f"--nproc-per-node {nproc_per_node} > --gpus-per-node {gpus_per_node}: "
                          "each process needs its own GPU")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
    warnings = []
    if not gpus_per_node and cpus_per_task is not None and nproc_per_node > cpus_per_task:
        warnings.append(f"--nproc-per-node {nproc_per_node} CPU processes on --cpus-per-task {cpus_per_task} "
                        "core(s) per node: processes will share cores")
    return warnings
