"""torchrun command lines, and a thin torchrun that keeps the trainer's requeue exit code.

`gentrain launch` (local, multi-node) and each node of a SLURM job run
`python -m launcher.torchrun ARGS`: exactly torchrun's arguments and behaviour (it calls
torch.distributed.run), with two differences that matter for preemption:

- torchrun exits 1 whenever a worker fails; this one exits 75 (REQUEUE_EXIT_CODE) when the
  workers exited 75, i.e. checkpointed after a preemption signal, so SLURM scripts can requeue,
  and 2 when they refused to start (bad usage, e.g. the run directory is another live job's).
- its workers (gentrain train) die with it: they arm a parent-death signal at start, because
  torchrun starts them in sessions of their own, out of reach of a signal to its process group.
- torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers but SIGUSR1 kills it; this
  one passes SIGUSR1 on to its worker processes (the trainer then checkpoints at the next step
  boundary and exits 75).
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

from trainers.runtime.abort import LAUNCHER_PID_ENV, child_pids, die_with_parent
from trainers.runtime.signals import REQUEUE_EXIT_CODE

DEFAULT_MASTER_PORT = 29500
EXIT_USAGE = 2


@dataclass
class TorchrunSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    local_addr: str | None = None
    train_args: list[str] = field(default_factory=list)


def torchrun_args(spec: TorchrunSpec) -> list[str]:
    """torchrun's own flags for this spec (without the program)."""
    args = [f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}", f"--max-restarts={spec.max_restarts}"]
    if spec.rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}"]
        if spec.rdzv_id:
            args.append(f"--rdzv-id={spec.rdzv_id}")
    elif spec.nnodes == 1:
        args += ["--standalone"]
    else:
        args += [f"--node-rank={spec.node_rank}", f"--master-addr={spec.master_addr}",
                 f"--master-port={spec.master_port}"]
    if spec.local_addr:
        args.append(f"--local-addr={spec.local_addr}")
    return args


def torchrun_command(spec: TorchrunSpec, python: str = sys.executable) -> list[str]:
    """The command that starts `gentrain train` in nproc_per_node processes on this node."""
    return [python, "-m", "launcher.torchrun", *torchrun_args(spec), "-m", "launcher.cli", "train", *spec.train_args]


# ---- the wrapper ----------------------------------------------------------------------------
def _forward_usr1(signum, _frame) -> None:
    children = child_pids()  # torchrun's workers
    print(f"[gentrain] torchrun wrapper: SIGUSR1 -> {len(children)} worker(s) {children}", file=sys.stderr, flush=True)
    for pid in children:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


_WORKERS: list = []  # every worker Popen torchrun started in this process


def _record_workers() -> None:
    """Keep a handle on each worker process, to read its exit code whatever torchrun raises.

    On another node, torchrun may fail with a rendezvous error instead of ChildFailedError when the
    rendezvous host's torchrun exits first (its store goes away while this node's workers are
    still exiting): the workers' own exit codes still say whether they checkpointed.
    """
    from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import SubprocessHandler

    original = SubprocessHandler._popen
    if getattr(original, "_gentrain", False):
        return

    def _popen(self, *args, **kwargs):
        proc = original(self, *args, **kwargs)
        _WORKERS.append(proc)
        return proc

    _popen._gentrain = True
    SubprocessHandler._popen = _popen


def _worker_exit_codes(timeout: float = 30.0) -> list[int]:
    import time

    deadline = time.monotonic() + timeout
    codes = []
    for proc in _WORKERS:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.returncode is not None:
            codes.append(proc.returncode)
    return sorted(set(codes))


def _write_pid_file() -> None:
    """Under SLURM, GENTRAIN_PID_DIR/node-$SLURM_NODEID.pid: where the batch script sends SIGUSR1."""
    pid_dir = os.environ.get("GENTRAIN_PID_DIR")
    if pid_dir and "SLURM_NODEID" in os.environ:
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"node-{os.environ['SLURM_NODEID']}.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")


def _requeue_or_fail(codes: list[int], what: str) -> int:
    """75 when the workers checkpointed after a preemption signal; 2 when they refused to start (bad
    usage: e.g. the run directory is another live job's; signals from torchrun stopping the rest
    aside); else 1."""
    if REQUEUE_EXIT_CODE in codes and all(c in (0, REQUEUE_EXIT_CODE) or c < 0 for c in codes):
        print(f"[gentrain] workers exited {codes}: checkpointed after a preemption signal, "
              f"exiting {REQUEUE_EXIT_CODE} (requeue me)", file=sys.stderr, flush=True)
        return REQUEUE_EXIT_CODE
    print(f"[gentrain] {what}; worker exit code(s) {codes}", file=sys.stderr, flush=True)
    own = {c for c in codes if c > 0}
    return EXIT_USAGE if own == {EXIT_USAGE} else 1


def _write_exit_file(code: int) -> None:
    """Under SLURM, GENTRAIN_PID_DIR/node-$SLURM_NODEID.exit: the batch script requeues only if every
    node says 75 (srun reports the highest code of its tasks, and 75 > 1)."""
    pid_dir = os.environ.get("GENTRAIN_PID_DIR")
    if pid_dir and "SLURM_NODEID" in os.environ:
        try:
            with open(os.path.join(pid_dir, f"node-{os.environ['SLURM_NODEID']}.exit"), "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent()  # under srun: go if slurmstepd goes (`gentrain launch` arms this for its own child)
    signal.signal(signal.SIGUSR1, _forward_usr1)
    _record_workers()
    _write_pid_file()
    # The workers check that this process (their launcher) is still there when they arm their
    # parent-death signal (trainers.runtime.abort.die_with_parent).
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    code = _run(run, args, ChildFailedError, SignalException)
    _write_exit_file(code)
    return code


def _run(run, args, ChildFailedError, SignalException) -> int:
    try:
        run(args)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()} | set(_worker_exit_codes(0)))
        return _requeue_or_fail(codes, "workers failed")
    except SignalException as err:
        print(f"[gentrain] torchrun stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except Exception as err:  # noqa: BLE001 - e.g. the rendezvous store went away as the job ended
        return _requeue_or_fail(_worker_exit_codes(), f"torchrun failed: {type(err).__name__}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
