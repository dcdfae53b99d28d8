"""Nothing orphaned, nothing hangs: a trainer dies with its launcher, and one rank's failure stops all.

die_with_parent(): at trainer start, when a launcher (torchrun's agent, srun's step daemon, the
deepspeed launcher) started this process, ask Linux to SIGKILL it when that parent dies
(prctl(PR_SET_PDEATHSIG)), and exit at once if the parent is already gone. torchrun starts its
workers in sessions of their own, so killing the launcher's process group does not reach them:
without this they would be re-parented to init and keep training. Loader workers watch their own
parent (torch's DataLoader watchdog; our slab transport) and follow within seconds.

JobGuard: one rank's exception ends the whole job, whatever the backend. The failing rank prints
`[gentrain] rank R on HOST failed: <one line>` and posts that line to the job's torch.distributed
store (the TCPStore every rank already talks to: torchrun's agent store, or rank 0's); every rank
runs a daemon thread that looks for it once a second over its own connection (a collective that
hangs on a dead peer cannot block it) and, when it appears, prints
`[gentrain] rank R: stopping, rank X on HOST failed: <line>` and leaves with os._exit(1). The
failing rank waits (at most a few seconds) until every other rank has seen the flag, so the message
reaches rank 0's output before any launcher starts tearing the job down. A rank that cannot reach
the store for STORE_LOST_S seconds (the host that held it is gone) stops the same way.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable

POLL_S = 1.0            # how often every rank looks for the abort flag
ACK_WAIT_S = 5.0        # how long a failing rank waits for the others to see it
STORE_LOST_S = 15.0     # a store unreachable this long means the job is gone
STORE_CALL_TIMEOUT_S = 5.0  # the timeout set on the watcher's and a failing rank's own store connections
FAILED_EXIT_CODE = 1    # ranks stopped because another rank failed
LAUNCHER_PID_ENV = "GENTRAIN_LAUNCHER_PID"  # set by launcher.torchrun for its workers
PR_SET_PDEATHSIG = 1

# Errors that already say everything in one line (cli.main prints them as `gentrain: error:`,
# exit 2); any other exception gets its traceback printed first.
ONE_LINE_ERRORS = ("ConfigError", "UsageError", "NoValidSamples", "FileNotFoundError", "RunLocked")


# ---- die with the launcher ---------------------------------------------------------------------
def started_by_launcher(env=os.environ) -> bool:
    return any(k in env for k in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_PROCID"))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def parent_gone() -> bool:
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if os.getppid() == 1:
        return True
    return bool(launcher and launcher.isdigit() and os.getppid() != int(launcher) and not pid_alive(int(launcher)))


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """SIGKILL this process when its parent dies (Linux); exit now if it already has.

    Only for processes a launcher started (a plain `gentrain train` in a shell is left alone: it
    may be nohup'd). Returns True if the death signal was set.
    """
    if not sys.platform.startswith("linux") or not started_by_launcher():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_gone():  # the parent died before the death signal was armed
        print(f"[gentrain] rank {os.environ.get('RANK', '?')}: the launcher that started this trainer is gone: "
              "exiting", file=sys.stderr, flush=True)
        os._exit(FAILED_EXIT_CODE)
    return True


def preexec_die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A subprocess preexec_fn: the child (a launcher we start) gets `sig` when we die."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(FAILED_EXIT_CODE)

    return arm


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc (comm may hold spaces: split after the last ')')."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    return [child for child, parent in parent_pids().items() if parent == pid]


def kill_loader_workers() -> None:
    """SIGKILL this process's children that run this same Python (DataLoader workers), before os._exit."""
    try:
        mine = os.path.realpath(f"/proc/{os.getpid()}/exe")
        for pid in child_pids():
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == mine:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
    except OSError:
        pass


# ---- one rank fails, all stop ------------------------------------------------------------------
def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split()) if str(err) else ""
    name = type(err).__name__
    return f"{name}: {text}" if text else name


def _tcp_store(store):
    while store is not None and not hasattr(store, "port") and hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


class JobGuard:
    """Every rank: watch for another rank's failure; on this rank's failure, stop the job.

        guard = JobGuard(dist_info)
        with guard:            # a failure inside: message, abort flag, os._exit
            ...train...

    cleanups run (in order) before a guarded os._exit, e.g. releasing the run lock.
    In a world of one there is nobody to tell: exceptions pass through untouched.
    """

    def __init__(self, rank: int, world_size: int, store=None, host: str | None = None,
                 attempt: str | None = None, out=None):
        self.rank, self.world_size = rank, world_size
        # SLURM's node name where there is one (several slurmd may share a machine)
        self.host = host or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        attempt = attempt if attempt is not None else os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.key = f"gentrain/abort/{attempt}"
        self.ack_key = f"gentrain/abort-seen/{attempt}"
        self.cleanups: list[Callable[[], None]] = []
        self.out = out
        self._store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exiting = threading.Lock()

    @classmethod
    def for_default_group(cls, dist_info) -> "JobGuard":
        """A guard on the default process group's store (call after init_process_group)."""
        store = None
        if dist_info.world_size > 1:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        return cls(dist_info.rank, dist_info.world_size, store)

    # -- output
    def say(self, line: str) -> None:
        print(f"[gentrain] {line}", file=self.out or sys.stdout, flush=True)

    # -- the watcher
    def start(self) -> "JobGuard":
        if self.world_size > 1 and self._store is not None and self._thread is None:
            own = self._store.clone()  # its own connection: the main thread may be blocked in the store
            own.set_timeout(timedelta(seconds=STORE_CALL_TIMEOUT_S))
            self._thread = threading.Thread(target=self._watch, args=(own,), name="gentrain-abort-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the watcher and wait until it has left its store call.

        A daemon thread that is inside a store call (the GIL released, in C++) when the interpreter
        shuts down is ended by pthread_exit as it takes the GIL back, inside pybind11's noexcept
        frame: std::terminate, so a rank that had finished and checkpointed died with SIGABRT and
        its launcher reported the run as failed."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S + STORE_CALL_TIMEOUT_S + 1.0)

    def _watch(self, store) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(POLL_S):
            try:
                posted = store.check([self.key])
                last_ok = time.monotonic()
            except Exception:  # noqa: BLE001 - the store's host is gone or unreachable
                if time.monotonic() - last_ok > STORE_LOST_S and not self._stop.is_set():
                    tcp = _tcp_store(self._store)
                    where = f" at {tcp.host}:{tcp.port}" if tcp is not None and hasattr(tcp, "host") else ""
                    self._exit(f"rank {self.rank}: stopping, lost the job's store{where} for "
                               f"{STORE_LOST_S:.0f} s (its host or launcher is gone)", FAILED_EXIT_CODE)
                continue
            if posted and not self._stop.is_set():
                message = self._read(store)
                try:
                    store.add(self.ack_key, 1)
                except Exception:  # noqa: BLE001
                    pass
                self._exit(f"rank {self.rank}: stopping, {message}", FAILED_EXIT_CODE)

    def _read(self, store) -> str:
        try:
            return store.get(self.key).decode(errors="replace")
        except Exception:  # noqa: BLE001
            return "another rank failed"

    def _exit(self, line: str, code: int) -> None:
        """Say `line`, run the cleanups, end the process now (no collective, no atexit can hang it)."""
        with self._exiting:  # the watcher and the main thread never both get here
            self._stop.set()
            self.say(line)
            for cleanup in self.cleanups:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001
                    pass
            kill_loader_workers()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _post(self, line: str) -> tuple[str, object]:
        """Post `line` as the job's abort flag unless one is there: (the flag now set, the store)."""
        try:
            store = self._store.clone()
            store.set_timeout(timedelta(seconds=STORE_CALL_TIMEOUT_S))
            return store.compare_set(self.key, "", line).decode(errors="replace"), store
        except Exception:  # noqa: BLE001 - the store is gone: the other ranks will notice that too
            return line, None

    def _wait_until_seen(self, store) -> None:
        """Wait (at most ACK_WAIT_S) until every other rank has seen the flag."""
        deadline = time.monotonic() + ACK_WAIT_S
        while store is not None and time.monotonic() < deadline:
            try:
                if store.add(self.ack_key, 0) >= self.world_size - 1:
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(0.1)

    def _stop_all(self, line: str, secondary: str, code: int) -> None:
        first, store = self._post(line)
        if first != line:  # another rank failed first (ours is most likely a consequence): report its cause
            self.say(secondary)
            self._exit(f"rank {self.rank}: stopping, {first}", code)
        self.say(line)
        self._wait_until_seen(store)
        self._exit(f"rank {self.rank}: stopping the job", code)

    def stop_job(self, reason: str, code: int = FAILED_EXIT_CODE) -> None:
        """Stop every rank because of `reason` (e.g. from a helper thread that found the job cannot go on)."""
        self._stop.set()
        line = f"rank {self.rank} on {self.host} failed: {reason}"
        if self.world_size > 1 and self._store is not None:
            self._stop_all(line, f"rank {self.rank} on {self.host}: {reason}", code)
        self._exit(line, code)

    # -- this rank failed
    def fail(self, err: BaseException, code: int) -> None:
        """This rank raised `err`: tell every rank, wait until they saw it, exit with `code`."""
        if self.world_size <= 1 or self._store is None:
            return
        self._stop.set()  # from here on this thread decides
        if type(err).__name__ not in ONE_LINE_ERRORS:
            traceback.print_exception(err, file=sys.stderr)
        self._stop_all(f"rank {self.rank} on {self.host} failed: {one_line(err)}",
                       f"rank {self.rank} on {self.host}: {one_line(err)}", code)

    def __enter__(self) -> "JobGuard":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop()
        if exc is not None and not isinstance(exc, SystemExit):
            self.fail(exc, exit_code_for(exc))
        return False


def exit_code_for(err: BaseException) -> int:
    """2 for the errors `gentrain` reports as bad usage or data, else 1."""
    return 2 if type(err).__name__ in ONE_LINE_ERRORS else 1
