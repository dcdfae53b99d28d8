"""SLURM: render a readable sbatch script, save it in the run directory, submit it.

The script asks for N nodes with one task each; every task is one torchrun (our wrapper,
launcher/torchrun.py) starting --nproc-per-node trainers, and the torchruns meet through c10d
rendezvous on the first node of the allocation. Preemption:

  SLURM sends SIGUSR1 to the batch shell GRACE seconds before the time limit (--signal=B:USR1@GRACE)
  -> the script's trap passes SIGUSR1 to srun, srun to each node's torchrun wrapper, the wrapper
     to its trainers -> all ranks agree at the next step boundary, checkpoint, exit 75
  -> the script sees 75 (from every node) and runs `scontrol requeue $SLURM_JOB_ID`; the requeued
     job starts the same command, which resumes from runs/NAME/checkpoints/latest.

Failures are not requeued: an exception on any rank stops every rank within seconds (the failing
rank's one line, `[gentrain] rank R on HOST failed: ...`, is in the job log), the script exits with
a non-zero code other than 75 and the job ends FAILED.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainers.runtime.signals import REQUEUE_EXIT_CODE


@dataclass
class SlurmSpec:
    job_name: str
    run_dir: str
    workdir: str
    nnodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_grace: int = 120
    rdzv_port: int | None = None  # default: 20000 + job id % 20000, so two jobs on one node do not collide
    max_restarts: int = 0
    python: str = sys.executable
    train_args: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    command_line: str = ""


def script_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launch" / "sbatch.sh"


def _abs(run_dir: str, workdir: str) -> str:
    path = Path(run_dir)
    return str(path if path.is_absolute() else Path(workdir) / path)


def render_sbatch(spec: SlurmSpec) -> str:
    """The batch script, as text: #SBATCH header, then a short bash body, commented."""
    run_dir = _abs(spec.run_dir, spec.workdir)
    q = shlex.quote
    header = [f"--job-name={spec.job_name}", f"--nodes={spec.nnodes}", "--ntasks-per-node=1"]
    if spec.gpus_per_node:
        header.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        header.append(f"--cpus-per-task={spec.cpus_per_task}")
    for flag, value in (("time", spec.time), ("partition", spec.partition), ("account", spec.account),
                        ("qos", spec.qos)):
        if value:
            header.append(f"--{flag}={value}")
    header += [f"--output={run_dir}/launch/slurm-%j.out",
               "--open-mode=append",                       # a requeued job appends to the same log
               f"--signal=B:USR1@{spec.signal_grace}",     # USR1 to this script GRACE s before the limit
               "--requeue",
               f"--chdir={spec.workdir}",
               *spec.extra_sbatch]
    comments = {
        "--ntasks-per-node=1": "one torchrun per node; it starts the trainers",
        "--open-mode=append": "a requeued job appends to the same log",
        f"--signal=B:USR1@{spec.signal_grace}": f"SIGUSR1 to this script {spec.signal_grace} s before the time limit",
        "--requeue": "may be requeued after preemption",
    }
    lines = ["#!/bin/bash"]
    for h in header:  # comments on lines of their own: sbatch reads everything after `#SBATCH` as options
        lines += ([f"# {comments[h]}"] if h in comments else []) + [f"#SBATCH {h}"]
    nproc = spec.nproc_per_node
    threads = max(1, (spec.cpus_per_task or nproc) // nproc)
    port = str(spec.rdzv_port) if spec.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    train = " ".join(q(a) for a in spec.train_args)
    lines += [
        "#",
        f"# Rendered by: {spec.command_line}" if spec.command_line else "# Rendered by gentrain launch --backend slurm",
        f"# on {datetime.now().isoformat(timespec='seconds')}. Submit it again with: sbatch {run_dir}/launch/sbatch.sh",
        f"# Trainers exit {REQUEUE_EXIT_CODE} after checkpointing on a preemption signal; the job is then requeued",
        "# and resumes from the run's latest checkpoint.",
        "set -uo pipefail",
        f"cd {q(spec.workdir)}",
        f"export OMP_NUM_THREADS={threads}",
        *[f"export {k}={q(v)}" for k, v in sorted(spec.env.items())],
        f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}",
        'log() { echo "[gentrain-slurm $(date +%H:%M:%S)] $*"; }',
        'log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} (${SLURM_JOB_NUM_NODES} node(s))"',
        "",
        "# c10d rendezvous on the first node of the allocation (its NodeAddr: NodeName unless the admin set one)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(scontrol show node "$head_node" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
        f"rdzv_port={port}",
        f"export GENTRAIN_PID_DIR={q(run_dir + '/launch')}/pids-$SLURM_JOB_ID  # each node's torchrun writes its pid here",
        'rm -f "$GENTRAIN_PID_DIR"/node-*.exit  # exit codes of an earlier segment of this (requeued) job',
        'log "rendezvous ${head_addr}:${rdzv_port} (${head_node})"',
        "",
        "# --wait=60: once one node's torchrun has exited, the others get 60 s before SLURM kills them (after a",
        "# preemption signal every node exits 75 within a second; a crashed node does not leave the rest hanging)",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=60 \\",
        f"  {q(spec.python)} -m launcher.torchrun --nnodes=\"$SLURM_JOB_NUM_NODES\" --nproc-per-node={nproc} \\",
        f"  --rdzv-backend=c10d --rdzv-endpoint=\"${{head_addr}}:${{rdzv_port}}\" --rdzv-id=\"$SLURM_JOB_ID\" "
        f"--max-restarts={spec.max_restarts} \\",
        f"  -m launcher.cli train {train} &",
        "srun_pid=$!",
        "",
        "# SLURM signals only this shell (B:USR1): pass it on to each node's torchrun wrapper (by the pid",
        "# it wrote), which relays it to its trainers; they checkpoint at the next step and exit 75. A",
        "# signal to the whole step (kill -USR1 $srun_pid, the fallback) would also hit DataLoader workers.",
        'forward() {',
        '  log "got SIG$1: asking the trainers to checkpoint and stop"',
        '  srun --overlap --ntasks-per-node=1 --nodes="$SLURM_JOB_NUM_NODES" \\',
        '    bash -c \'kill -USR1 "$(cat "$GENTRAIN_PID_DIR/node-$SLURM_NODEID.pid")"\' || kill -USR1 "$srun_pid"',
        '}',

        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "# a trapped signal interrupts `wait`; keep waiting until srun has really exited",
        'rc=0; wait "$srun_pid" || rc=$?',
        'while kill -0 "$srun_pid" 2>/dev/null; do rc=0; wait "$srun_pid" || rc=$?; done',
        "",
        "# srun reports the highest exit code of its tasks: requeue only if every node's torchrun said 75",
        "# (each writes its code to GENTRAIN_PID_DIR/node-N.exit); a failure on any rank is not requeued.",
        'others=$(cat "$GENTRAIN_PID_DIR"/node-*.exit 2>/dev/null | grep -vx "$REQUEUE_EXIT_CODE" | sort -u | xargs)',
        'if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] && [ -z "$others" ]; then',
        '  log "trainers checkpointed and exited $rc: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "elif [ \"$rc\" -eq 0 ]; then",
        '  log "training finished"',
        "else",
        '  [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] && rc=1  # some node failed: a failure, not a preemption',
        '  log "training failed with exit code $rc (other node exit codes: ${others:-none}); not requeued"',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def write_script(spec: SlurmSpec) -> Path:
    path = script_path(_abs(spec.run_dir, spec.workdir))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sbatch(spec))
    path.chmod(0o755)
    return path


def sbatch_command(path: str | Path) -> list[str]:
    return ["sbatch", "--parsable", str(path)]


def submit(path: str | Path) -> str:
    """Submit with sbatch; return the job id (sbatch --parsable prints `ID` or `ID;cluster`)."""
    proc = subprocess.run(sbatch_command(path), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"sbatch failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    match = re.match(r"\s*(\d+)", proc.stdout)
    if not match:
        raise RuntimeError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return match.group(1)


def allocation_hosts() -> list[str]:
    """Hostnames of the current SLURM allocation (for the deepspeed hostfile)."""
    import os

    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()
