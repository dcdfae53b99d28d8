"""Batches from DataLoader workers through reused shared-memory slabs instead of torch's tensor pickling.

torch sends every tensor a worker yields by copying it into a fresh shared-memory segment and
passing its file descriptor over a socket (a thread and an HMAC handshake per tensor). Measured
here (64x64 JPEG, batch 64, ``python -m bench.reader_limits``): ~2.6 ms per batch sent, against
~4 ms to decode the batch, so a worker delivered ~0.6 of the in-process rate; a worker yielding
a small dict instead costs ~0.45 ms per message.

So each worker decodes its batches straight into a few slabs of shared memory that it reuses,
sends each slab's tensor once, and from then on only the slab's number (labels go as a list):
0.43 ms per batch sent, and 1 worker at ~0.86 of the in-process rate. The main process copies
the batch out of the slab (into pinned memory when the loader pins) and hands the slab back over
a pipe. At most ``prefetch_factor`` batches of a worker are in flight, plus the one it fills and
the next one it has started, so ``prefetch_factor + 3`` slabs mean a worker never waits for one
in normal operation; if it does, it blocks on the pipe, checking that its parent is alive.
A batch of pairs takes one slab for its targets and one for its inputs (two pools of slabs).
"""
from __future__ import annotations

import math
import multiprocessing
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info


class _SlabHandle:
    """A slab's tensor in a message; a class of its own so that DataLoader's pin_memory thread,
    which pins (copies) every tensor it finds, leaves the shared slab alone."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __getstate__(self):
        return self.tensor

    def __setstate__(self, tensor):
        self.tensor = tensor


class SlabTransport:
    """Created by ``make_loader`` before the workers start (they inherit the pipes); used by
    each worker's batcher (:meth:`allocate`, :meth:`reference`) and by the main process's
    iterator (:meth:`resolve`)."""

    def __init__(self, num_workers: int, slabs_per_worker: int, pin_memory: bool):
        self.slabs_per_worker = slabs_per_worker
        self.pin_memory = pin_memory
        # Per worker: (worker end, main end). One-way pipes carrying freed slab numbers.
        self.pipes = [multiprocessing.Pipe(duplex=False) for _ in range(num_workers)]
        self._worker: _WorkerSlabs | None = None
        self._received: dict[tuple[int, int], torch.Tensor] = {}

    # -- worker side

    def worker_slabs(self) -> "_WorkerSlabs | None":
        """This worker's slabs; None in the main process (num_workers=0 never gets here)."""
        info = get_worker_info()
        if info is None:
            return None
        if self._worker is None or self._worker.pid != os.getpid():
            self._worker = _WorkerSlabs(info.id, self.slabs_per_worker, self.pipes[info.id][0])
        else:
            self._worker.restart()
        return self._worker

    # -- main side

    def resolve(self, batch: Any) -> Any:
        """A batch as the stream yielded it: each slab's array copied out (and the slab handed
        back to its worker); any other batch unchanged."""
        if not isinstance(batch, dict) or "__slab__" not in batch:
            return batch
        for worker, number, handle, key, count, channels_last in batch.pop("__slab__"):
            if handle is not None:
                self._received[worker, number] = handle.tensor
            view = self._received[worker, number][:count]
            out = torch.empty(view.shape, dtype=view.dtype, pin_memory=self.pin_memory)
            out.copy_(view)
            self.pipes[worker][1].send(number)  # after the copy: the worker may overwrite it now
            batch[key] = out.permute(0, 3, 1, 2) if channels_last else out
        batch["label"] = torch.tensor(batch["label"], dtype=torch.int64)
        return batch


class _WorkerSlabs:
    """One worker's slabs: arrays handed to the batcher, numbered, reused once released.

    Slabs come in pools, one per (shape, dtype) asked for: the batch's images, and for pairs
    their inputs too. At most ``_MAX_POOLS`` pools, each of ``capacity`` slabs, all of them
    within the shared-memory budget; any other array is a plain one, sent the usual way.
    """

    def __init__(self, worker: int, capacity: int, released):
        self.worker, self.capacity, self.released = worker, capacity, released
        self.pid, self.parent = os.getpid(), os.getppid()
        self.tensors: list[torch.Tensor] = []
        self.arrays: list[np.ndarray] = []
        self.pool_of: list[tuple] = []  # the (shape, dtype) of each slab
        self.free: dict[tuple, list[int] | None] = {}  # per pool, its free slabs; None: no pool (budget)
        self.sent: set[int] = set()  # slabs whose tensor the main process already has
        self.budget: int | None = None  # bytes left for new pools, from the first allocation on

    def allocate(self, shape: tuple, dtype) -> np.ndarray:
        """A free slab of ``shape``: a new slab while its pool has fewer than the capacity, else
        one the main process released (waiting for it if need be)."""
        pool = (tuple(shape), np.dtype(dtype))
        free = self.free.get(pool, _NO_POOL)
        if free is _NO_POOL:
            free = self._new_pool(pool)
        if free is None:
            return np.empty(shape, dtype=dtype)  # sent the usual way (torch's transport)
        self._collect()
        if not free and self.pool_of.count(pool) < self.capacity:
            dt = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * dt.itemsize)
            tensor = torch.empty(0, dtype=dt).set_(storage, 0, shape)
            free.append(len(self.arrays))
            self.tensors.append(tensor)
            self.arrays.append(tensor.numpy())
            self.pool_of.append(pool)
        while not free:
            self._wait()
        return self.arrays[free.pop()]

    def _new_pool(self, pool: tuple) -> list[int] | None:
        if self.budget is None:
            self.budget = _shm_budget()
        shape, dtype = pool
        size = self.capacity * dtype.itemsize * math.prod(shape)
        if len(self.free) >= _MAX_POOLS or size > self.budget:
            self.free[pool] = None
        else:
            self.budget -= size
            self.free[pool] = []
        return self.free[pool]

    def reference(self, array: np.ndarray, key: str, count: int, channels_last: bool) -> tuple | None:
        """The message entry that stands for ``array[:count]`` if ``array`` is one of these
        slabs (its tensor included the first time), else None."""
        number = self._number(array)
        if number is None:
            return None
        handle = None
        if number not in self.sent:
            self.sent.add(number)
            handle = _SlabHandle(self.tensors[number])
        return self.worker, number, handle, key, count, channels_last

    def give_back(self, array: np.ndarray) -> None:
        """Return a slab that will not be sent (its contents went out some other way)."""
        number = self._number(array)
        if number is not None:
            self._release(number)

    def _number(self, array: np.ndarray) -> int | None:
        """The number of the slab ``array`` is (the very object handed out), or None."""
        return next((number for number, slab in enumerate(self.arrays) if slab is array), None)

    def _release(self, number: int) -> None:
        self.free[self.pool_of[number]].append(number)

    def restart(self) -> None:
        """A new iteration of the stream in this worker (a persistent worker's next epoch): the
        DataLoader has dropped whatever batches were still in flight, so every slab is free, and
        a dropped batch may have carried a slab's first (only) tensor: each is sent again."""
        self._collect()
        for free in self.free.values():
            if free is not None:
                free.clear()
        for number in range(len(self.arrays)):
            self._release(number)
        self.sent.clear()

    def _collect(self) -> None:
        while self.released.poll():
            self._release(self.released.recv())

    def _wait(self) -> None:
        if self.released.poll(1.0):
            self._release(self.released.recv())
        elif os.getppid() != self.parent:  # the main process is gone: nothing will ever come back
            raise SystemExit(0)


_NO_POOL = object()
_MAX_POOLS = 2  # a batch's images, and a pair batch's inputs


def _shm_budget(path: str = "/dev/shm") -> int:
    """Bytes one worker's slabs may hold: a quarter of the free shared memory when the slabs
    start. They stay allocated for the whole run (torch's transport holds only the batches in
    flight), and a full tmpfs shows up as SIGBUS, not as an error: in a container with a small
    /dev/shm (Docker's default is 64 MB) big batches keep to torch's transport instead."""
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm (not Linux): torch's shared memory lives elsewhere
        return 1 << 62
    return st.f_bavail * st.f_frsize // 4
