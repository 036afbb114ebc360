"""Executors: the inline default, and what we read off the others (Dask is recognised by type
name and never imported here, so it stays optional)."""

from __future__ import annotations

import concurrent.futures as cf
import os


class InlineExecutor(cf.Executor):
    """Runs each call at ``submit`` time in the calling thread; returns a completed Future.

    The default executor of ``ParallelOracle``: no threads, no pickling, exceptions are kept in
    the Future (as with any executor) rather than raised by ``submit``.
    """

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """``fn(*args, **kwargs)`` now; returns a done ``Future`` with its result or exception."""
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - delivered through the Future like any executor
            future.set_exception(exc)
        return future


def dask_client(executor):
    """The dask.distributed Client behind ``executor``, or None (without importing Dask)."""
    module = type(executor).__module__ or ""
    if not module.startswith("distributed"):
        return None
    if type(executor).__name__ == "Client":
        return executor
    return getattr(executor, "_client", None)  # ClientExecutor keeps its client here


def executor_slots(executor) -> int:
    """How many tasks ``executor`` runs at once: 1 inline, Dask's total worker threads, a
    pool's ``_max_workers``, else ``os.cpu_count()``."""
    if isinstance(executor, InlineExecutor):
        return 1
    client = dask_client(executor)
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return int(getattr(executor, "_max_workers", 0) or os.cpu_count() or 1)


__all__ = ["InlineExecutor", "dask_client", "executor_slots"]
