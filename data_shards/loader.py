"""The DataLoader around a ShardStream: worker processes, their batches through shared-memory
slabs (data_shards.slabs), their signals and their exit."""

from __future__ import annotations

import atexit
import weakref
from typing import Any

import torch
from torch.utils.data import DataLoader

from data_shards.options import StreamOptions
from data_shards.slabs import SlabTransport
from data_shards.stream import ShardStream

PREFETCH_FACTOR = 2


def make_loader(urls: Any, options: StreamOptions | int | None = None, **fields: Any) -> DataLoader:
    """A DataLoader over a :class:`ShardStream` (which batches itself, hence batch_size=None),
    with ``options.num_workers`` worker processes.

    ``options`` is a :class:`StreamOptions`, the batch size, or None; ``fields`` are StreamOptions
    fields replacing its own: ``make_loader(urls, 64, num_workers=2, seed=3)``.
    """
    dataset = ShardStream(urls, options, **fields)
    num_workers = dataset.options.num_workers
    pin_memory = torch.cuda.is_available()  # pinning only helps host-to-GPU copies
    worker_options = {"persistent_workers": True, "prefetch_factor": PREFETCH_FACTOR,
                      "worker_init_fn": _ignore_stop_signals} if num_workers > 0 else {}
    if num_workers > 0:
        dataset.transport = SlabTransport(num_workers, PREFETCH_FACTOR + 3, pin_memory)
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **worker_options)


def batch_to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 images (0..255) to floats in [-1, 1]."""
    return images.to(dtype).div_(127.5).sub_(1.0)


# Live iterators of our loaders and their worker processes, which must stop before interpreter
# exit (see _stop_workers). A worker outlives its iterator when the iterator's shutdown failed.
_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_WORKERS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_LAST = False


class _Loader(DataLoader):
    """A DataLoader that remembers its iterators (see _stop_workers) and, with workers, puts
    back the batches they sent through shared-memory slabs (data_shards.slabs)."""

    def __iter__(self):
        iterator = super().__iter__()
        transport = getattr(self.dataset, "transport", None)
        return _Resolving(iterator, transport) if transport is not None and self.num_workers > 0 else iterator

    def _get_iterator(self):
        global _EXIT_HOOK_LAST
        iterator = super()._get_iterator()
        _ITERATORS.add(iterator)
        _WORKERS.update(getattr(iterator, "_workers", ()))
        if not _EXIT_HOOK_LAST:
            # atexit runs hooks last-registered first. Registering again now, after torch and
            # multiprocessing have registered theirs (they have: workers exist), puts this hook
            # before multiprocessing's join and before torch's exit flag, which turns
            # _shutdown_workers into a no-op, whatever order the modules were imported in.
            atexit.unregister(_stop_workers)
            atexit.register(_stop_workers)
            _EXIT_HOOK_LAST = True
        return iterator


class _Resolving:
    """The DataLoader iterator with each slab batch copied out of its slab (SlabTransport.resolve)."""

    def __init__(self, iterator, transport: SlabTransport):
        self._iterator, self._transport = iterator, transport

    def __iter__(self):
        return self

    def __next__(self):
        return self._transport.resolve(next(self._iterator))

    def __getattr__(self, name):  # _workers, _shutdown_workers, ...: the DataLoader iterator's
        return getattr(self._iterator, name)


def _stop_workers() -> None:
    """Stop the workers of iterators still alive at exit. multiprocessing's own exit hook
    terminate()s daemonic children with SIGTERM, which our workers ignore, and then joins them
    forever. Each iterator is shut down the normal way; a worker still alive after that (its
    iterator's shutdown failed, was skipped, or the iterator is gone) is killed: it only reads shards."""
    for iterator in list(_ITERATORS):
        try:
            iterator._shutdown_workers()
        except Exception:  # noqa: BLE001 - one broken iterator must not leave the others' workers running
            pass
    for worker in list(_WORKERS):
        try:
            worker.join(timeout=1.0)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5.0)
        except (AssertionError, ValueError, OSError):  # not started, already closed, or gone
            pass


atexit.register(_stop_workers)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: SLURM signals every process of a job step, and a
    worker killed by it would crash the trainer before it can checkpoint. The trainer decides
    when to stop; the DataLoader then shuts its workers down itself."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
