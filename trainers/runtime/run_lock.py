"""One run directory, one job: rank 0 holds RUN_DIR/.lock while its job runs.

The lock is a small JSON file naming its job: host, pid (with the process's start time, boot id and
pid namespace, so a reused pid is not mistaken for it), when it started, the SLURM job or torchrun
run id, and `renewed`: a daemon thread rewrites it every lease/4 seconds. It is created atomically
(written to a temporary file, then hard-linked to `.lock`, which fails when `.lock` exists, so
nobody ever reads a half-written lock) and removed when the job ends: done, exit 75 (preempted)
or failed.

A lock left by a job that died (kill -9, a crashed node) does not block the next job. It is dead:
- on the same host (same hostname, boot and pid namespace): as soon as its pid is gone (or is now
  another process);
- seen from another host: once it has not been renewed for its lease, LEASE_S = 60 s by default
  (`GENTRAIN_LOCK_LEASE_S` sets it for the job that writes the lock). The age is measured with the
  two hosts' wall clocks: keep them in step (NTP), a few seconds apart at most.

A job that finds its own lock taken over (it could not renew it for a whole lease, or the file was
removed) stops: two jobs must never write one run.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Callable

LOCK_NAME = ".lock"
LEASE_S = 60.0
LEASE_ENV = "GENTRAIN_LOCK_LEASE_S"


class RunLocked(Exception):
    """The run directory is used by a live job; str() is the one line to show."""

    def __init__(self, run_dir: str | Path, holder: dict, why: str):
        self.run_dir, self.holder, self.why = Path(run_dir), holder, why
        super().__init__(f"run directory {run_dir} is in use by another job ({describe(holder)}; {why}): "
                         f"stop that job first, or wait for it to end")


def lease_seconds() -> float:
    try:
        return max(0.5, float(os.environ.get(LEASE_ENV, LEASE_S)))
    except ValueError:
        return LEASE_S


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


# ---- who am I, and is that process alive -------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot, /proc/PID/stat field 22); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def job_id() -> str | None:
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun run {os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def this_process(lease_s: float) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_ticks(os.getpid()),
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "job": job_id(),
            "rdzv_id": os.environ.get("TORCHELASTIC_RUN_ID"), "started": now, "renewed": now,
            "lease_s": lease_s, "token": uuid.uuid4().hex}


def _same_machine(info: dict) -> bool:
    return (info.get("host") == socket.gethostname() and info.get("boot_id") == _boot_id()
            and info.get("pid_ns") == _pid_namespace())


def describe(info: dict) -> str:
    started = datetime.fromtimestamp(float(info.get("started", 0))).isoformat(sep=" ", timespec="seconds")
    job = f", {info['job']}" if info.get("job") else ""
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {started}{job}"


def holder_state(info: dict, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) for the job that wrote `info`."""
    now = time.time() if now is None else now
    age = now - float(info.get("renewed", 0))
    lease = float(info.get("lease_s", LEASE_S))
    if _same_machine(info):
        pid = int(info.get("pid", -1))
        start = process_start_ticks(pid) if pid > 0 else None
        if start is None or (info.get("pid_start") is not None and start != info["pid_start"]):
            return False, f"its process {pid} on this host is gone"
        return True, "its process is running on this host"
    if age > lease:
        return False, f"its lease was last renewed {age:.0f} s ago (lease {lease:.0f} s)"
    return True, f"lease renewed {max(age, 0):.0f} s ago, taken over only if not renewed for {lease:.0f} s"


def read_lock(run_dir: str | Path) -> dict | None:
    """The lock's contents; None when there is none. A damaged lock reads as a dead one."""
    path = lock_path(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError
        return info
    except ValueError:
        return {"host": "?", "pid": -1, "renewed": 0, "lease_s": 0, "token": None, "damaged": True}


def check_free(run_dir: str | Path, same_rdzv_id: str | None = None) -> None:
    """Raise RunLocked when a live job holds the run directory (what `gentrain launch` checks).

    same_rdzv_id: a multi-node launch joining the job that holds the lock (same --rdzv-id) passes;
    that job's rank 0 checks again and is the one that decides.
    """
    info = read_lock(run_dir)
    if info is None:
        return
    if same_rdzv_id and info.get("rdzv_id") == same_rdzv_id:
        return
    alive, why = holder_state(info)
    if alive:
        raise RunLocked(run_dir, info, why)


# ---- the lock a job holds ----------------------------------------------------------------------
class RunLock:
    """RUN_DIR/.lock for this process: acquire() or RunLocked; renewed until release().

    on_lost(message) is called (from the renewing thread) if the lock is found taken over.
    """

    def __init__(self, run_dir: str | Path, lease_s: float | None = None,
                 on_lost: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.on_lost = on_lost
        self.info: dict | None = None
        self.took_over: dict | None = None  # the dead job's lock this one replaced, if any
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # a renewal never rewrites the lock after release() removed it
        self._thread: threading.Thread | None = None

    # atomic creation: a complete temporary file, hard-linked to .lock (fails if it exists)
    def _temp(self, info: dict) -> Path:
        tmp = self.run_dir / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self, info: dict) -> bool:
        tmp = self._temp(info)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, dead: dict) -> None:
        """Move a dead job's lock aside, unless it changed since it was judged dead."""
        aside = self.run_dir / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.dead"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if not dead.get("damaged") and (moved or {}).get("token") != dead.get("token"):
            try:  # someone else's fresh lock: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            self.took_over = dead
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = this_process(self.lease_s)
        for _ in range(10):
            if self._create(info):
                self.info = info
                self._thread = threading.Thread(target=self._renew_loop, name="gentrain-run-lock", daemon=True)
                self._thread.start()
                return self
            held = read_lock(self.run_dir)
            if held is None:
                continue  # released between our attempt and the read
            alive, why = holder_state(held)
            if alive:
                raise RunLocked(self.run_dir, held, why)
            self._break(held)
        raise RunLocked(self.run_dir, read_lock(self.run_dir) or {}, "other jobs keep taking it")

    def _renew_loop(self) -> None:
        interval = max(0.2, self.lease_s / 4)
        while not self._stop.wait(interval):
            with self._mutex:
                if self._stop.is_set() or self.info is None:
                    return
                lost = self._renew()
            if lost:
                if self.on_lost is not None:
                    self.on_lost(lost)
                else:
                    print(f"[gentrain] warning: {lost}", file=sys.stderr, flush=True)
                return

    def _renew(self) -> str | None:
        """Rewrite `renewed`; the message to give if the lock is no longer this job's."""
        try:
            current = read_lock(self.run_dir)
            if current is None or current.get("token") != self.info["token"]:
                who = describe(current) if current else "the lock file was removed"
                return f"lost the lock on run directory {self.run_dir} ({who})"
            self.info = {**self.info, "renewed": time.time()}
            os.replace(self._temp(self.info), self.path)
        except OSError:
            pass  # a slow or flaky filesystem: try again at the next renewal
        return None

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still this job's."""
        self._stop.set()
        with self._mutex:
            if self.info is None:
                return
            current = read_lock(self.run_dir)
            if current is not None and current.get("token") == self.info["token"]:
                self.path.unlink(missing_ok=True)
            self.info = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.info is None else self

    def __exit__(self, *exc) -> None:
        self.release()
