"""map_ordered: independent tasks on any executor, results in submission order, bounded work in flight."""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator

from deepzero_oracle.parallel.executors import InlineExecutor, dask_client, executor_slots
from deepzero_oracle.parallel.payloads import Shipper, compact, default_transport, run_task


def map_ordered(fn: Callable, items: Iterable[tuple], executor=None, *, shared: tuple = (),
                window: int | None = None) -> Iterator[Any]:
    """Yield ``fn(*shared, *item)`` for each argument tuple ``item`` of ``items``, in order, run on ``executor``.

    Inline (``executor`` None or an ``InlineExecutor``) each call runs here when its result is
    asked for. Elsewhere at most ``window`` tasks are in flight (submitted, not yet yielded), so
    a long or endless ``items`` never floods the executor; closing the generator (``close()``,
    ``break`` out of a ``for``) cancels the tasks not yet started and releases the shared values.

    Args:
        fn: a module-level function (it travels by reference to process and Dask workers).
        items: tuples of positional arguments, one task each (as ``itertools.starmap``). Tensor
            arguments are compacted: a row of a larger tensor travels as its own size.
        executor: anything with ``submit(fn, *args) -> Future`` (``open_executor``); None: here.
        shared: arguments common to every task (e.g. a model), shipped once per worker by the
            executor's transport (``TRANSPORTS``) rather than with each task; deserialised at
            most once per worker thread.
        window: tasks in flight; None: twice the executor's slots (``executor_slots``).
    Raises:
        NotShippable: on the first ``next()``, before any task runs, if a shared value does not
            pickle (never inline).
        Exception: a task's exception, raised when its result is reached (tasks after it are
            cancelled).
    """
    if executor is None or isinstance(executor, InlineExecutor):
        for item in items:
            yield fn(*shared, *item)
        return
    window = 2 * executor_slots(executor) if window is None else int(window)
    if window < 1:
        raise ValueError(f"window must be at least 1 task in flight, got {window}")
    shipper = Shipper(executor, default_transport(executor), {"payloads_shipped": 0, "payload_bytes": 0})
    extra = {"pure": False} if dask_client(executor) is not None else {}
    pending: collections.deque = collections.deque()
    try:
        handles = tuple(shipper.ship(value) for value in shared)  # NotShippable before any task
        todo = iter(items)
        while True:
            while len(pending) < window and (item := next(todo, None)) is not None:
                args = tuple(compact(arg) for arg in item)
                pending.append(executor.submit(run_task, fn, handles, args, **extra))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        shipper.close()


__all__ = ["map_ordered"]
