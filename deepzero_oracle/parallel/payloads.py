"""What travels to the workers and how: payload handles for each transport, the task record,
and the worker side (payload cache, load gate, the entry points ``run_chunk`` and ``run_task``,
worker-side counters).

Payloads are pickled (cloudpickle when installed): this is fan-out of our own objects to our
own workers, never data from outside.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import copy
import dataclasses
import hashlib
import os
import pickle
import shutil
import tempfile
import threading
import time
import weakref
from typing import Any

import torch

from deepzero_oracle.blackbox.local import as_tensor
from deepzero_oracle.errors import NotShippable
from deepzero_oracle.estimators.directions import Directions
from deepzero_oracle.oracle import Oracle, QueryLedger
from deepzero_oracle.parallel.executors import InlineExecutor, dask_client

try:  # cloudpickle ships lambdas and closures by value; plain pickle is the fallback
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - cloudpickle comes with dask
    _pickler = pickle

TRANSPORTS = ("live", "scatter", "spool", "bytes")
CACHE_SIZE = 4  # payloads kept per worker (and shipped ones held): this step's and the last


def default_transport(executor) -> str:
    """The transport that suits ``executor``: "live" inline, "scatter" on Dask, "spool" for a
    process pool (same machine), else "bytes"."""
    if isinstance(executor, InlineExecutor):
        return "live"
    if dask_client(executor) is not None:
        return "scatter"
    if isinstance(executor, cf.ProcessPoolExecutor):
        return "spool"
    return "bytes"


# -- handles: how a task names a payload ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Live:
    """The payload itself (same process, same thread: the InlineExecutor)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A pickled payload and its content token (bytes transport, and what Dask scatters)."""

    token: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class _Spool:
    """A pickled payload in a file on this machine, named by its content token."""

    token: str
    path: str


@dataclasses.dataclass(frozen=True)
class Job:
    """One task: positions ``[start, stop)`` of the sorted request, evaluated in blocks.

    Attributes:
        kind: "coordinate", "direction" or "rows".
        chunk, chunks: this task's 0-based chunk number and how many the request has.
        start, stop: positions in the request; block: queries per evaluation-hook call.
        mu: the step of coordinate and direction requests.
        rows: only for kind "rows": the thetas ``[stop - start, dim]`` themselves.
        threads: torch threads to use in a worker process (None: leave as is).
        parent_pid: the submitting process (``threads`` applies in other processes only).
    """

    kind: str
    chunk: int
    chunks: int
    start: int
    stop: int
    block: int
    mu: float = 0.0
    rows: torch.Tensor | None = None
    threads: int | None = None
    parent_pid: int = 0


# -- parent side: shipping ------------------------------------------------------------------------


class Shipper:
    """Ships payloads to an executor's workers by one transport; hands out the handles tasks
    carry. A payload already shipped (same content token) is named again, not re-sent; the
    last ``CACHE_SIZE`` stay shipped.

    Args:
        executor: where the tasks run.
        transport: one of ``TRANSPORTS`` ("scatter" needs a Dask client behind ``executor``).
        stats: a dict whose "payloads_shipped" and "payload_bytes" entries are counted up here.
    """

    def __init__(self, executor, transport: str, stats: dict):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport == "scatter" and dask_client(executor) is None:
            raise ValueError("transport 'scatter' needs a dask.distributed Client or its "
                             "ClientExecutor")
        self.executor, self.transport, self.stats = executor, transport, stats
        self._shipped: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._spool_dir: list = [None]  # in a list: shared with the finalizer
        self._closer = weakref.finalize(self, _cleanup, self._shipped, self._spool_dir)

    def state(self, oracle: Oracle):
        """A handle for the oracle the workers evaluate: the object itself when live, else a
        pickled copy with a fresh counter (the original's count stays with the parent)."""
        if self.transport == "live":
            return _Live(oracle)
        return self.ship(_shippable(oracle))

    def ship(self, payload):
        """A handle naming ``payload`` (a tuple's tensors compacted), shipped first if workers
        lack it. Raises TypeError, before anything is sent, if it does not pickle."""
        if self.transport == "live":
            return _Live(payload)
        if isinstance(payload, tuple):  # a pickled view carries its whole storage
            payload = tuple(compact(part) for part in payload)
        data = shippable_bytes(payload, self.executor)
        token = hashlib.blake2b(data, digest_size=16).hexdigest()
        if token in self._shipped:  # already with the workers: send the name only
            self._shipped.move_to_end(token)
            return self._shipped[token]
        blob = _Blob(token, data)
        if self.transport == "bytes":
            handle = blob
        elif self.transport == "spool":
            if self._spool_dir[0] is None:  # private: mkdtemp makes it mode 0700
                self._spool_dir[0] = tempfile.mkdtemp(prefix="deepzero-parallel-")
            path = os.path.join(self._spool_dir[0], token)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
            handle = _Spool(token, path)
        else:  # scatter: one replica per Dask worker, held while this future lives
            handle = dask_client(self.executor).scatter(blob, broadcast=True, hash=False)
        self.stats["payloads_shipped"] += 1
        self.stats["payload_bytes"] += len(data)
        self._shipped[token] = handle
        while len(self._shipped) > CACHE_SIZE:
            _retire(*self._shipped.popitem(last=False))
        return handle

    def close(self) -> None:
        """Release shipped payloads (Dask futures, spool files); the next one is re-shipped."""
        self._closer()
        self._closer = weakref.finalize(self, _cleanup, self._shipped, self._spool_dir)


def shippable_bytes(payload, executor=None) -> bytes:
    """``payload`` pickled for ``executor``'s workers (cloudpickle when installed, so lambdas and
    closures travel by value; ``pickle.loads`` reads it back). Raises ``NotShippable`` (a
    TypeError), saying what to do, if it does not pickle."""
    try:
        return _pickler.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        where = "an executor" if executor is None else type(executor).__name__
        raise NotShippable(
            f"cannot ship {type(payload).__name__} to the workers of {where} "
            f"because it does not pickle ({exc}); make it picklable (module-level functions, no "
            f"open connections: e.g. an in-process black box instead of a remote one) or use the "
            f"InlineExecutor (nothing is pickled)"
        ) from exc


def check_shippable(payload, executor=None) -> None:
    """Raise ``NotShippable`` now, before any work, if ``payload`` cannot travel to ``executor``'s
    workers (nothing to check for the ``InlineExecutor``: nothing travels; None checks anyway)."""
    if not isinstance(executor, InlineExecutor):
        shippable_bytes(payload, executor)


def compact(value: Any) -> Any:
    """``value``, or for a tensor view (a row slice, theta inside a batch) a copy that pickles
    to its own size: pickling a view writes its whole underlying storage."""
    if isinstance(value, torch.Tensor) and (
        value.untyped_storage().nbytes() > value.numel() * value.element_size()
        or not value.is_contiguous()
    ):
        return value.clone(memory_format=torch.contiguous_format)
    return value


def counting_target(oracle):
    """The object that counts ``oracle``'s work besides queries: the oracle itself if it has
    ``counters()``, else its ``blackbox`` if that has ``counters()``, else None."""
    for obj in (oracle, getattr(oracle, "blackbox", None)):
        if obj is not None and callable(getattr(obj, "counters", None)):
            return obj
    return None


def read_counters(oracle) -> dict[str, int]:
    """The running totals ``counting_target(oracle).counters()`` (``{}`` if nothing counts)."""
    target = counting_target(oracle)
    return {} if target is None else {str(k): int(v) for k, v in target.counters().items()}


def add_counters(oracle, counts: dict[str, int]) -> None:
    """Add ``counts`` (work done by worker copies) to ``counting_target(oracle)`` through its
    ``add_counters``; a no-op when nothing was counted. Raises TypeError if workers counted
    work that ``oracle`` cannot take."""
    counts = {k: int(v) for k, v in counts.items() if v}
    if not counts:
        return
    target = counting_target(oracle)
    if target is None or not callable(getattr(target, "add_counters", None)):
        raise TypeError(f"workers counted {sorted(counts)} on copies of {type(oracle).__name__}, "
                        f"which has no add_counters(counts) to take them: define it beside counters()")
    target.add_counters(counts)


def _shippable(oracle: Oracle) -> Oracle:
    """A shallow copy of the oracle fit to pickle, with a fresh counter (the original's stays
    with the parent). Per-theta caches drop themselves when pickled (a ModuleOracle's fast path
    rebuilds its features on the worker)."""
    clone = copy.copy(oracle)
    clone.ledger = QueryLedger()
    return clone


def _retire(token, handle) -> None:
    if isinstance(handle, _Spool):
        try:
            os.unlink(handle.path)
        except OSError:
            pass
    elif hasattr(handle, "release"):  # a Dask future: drop the replicas
        try:
            handle.release()
        except Exception:  # noqa: BLE001 - the client may already be closed
            pass


def _cleanup(shipped, spool_dir) -> None:
    while shipped:
        _retire(*shipped.popitem())
    if spool_dir[0] is not None:
        shutil.rmtree(spool_dir[0], ignore_errors=True)
        spool_dir[0] = None


# -- worker side ---------------------------------------------------------------------------------

_WORKER = threading.local()


class _Gate:
    """Loads exclusive, evaluations shared, within one process (writer-preferring).

    Unpickling a torch.fx ``GraphModule`` (inside a ModuleOracle's fast path) re-traces it, and
    tracing patches ``nn.Module.__call__`` for the whole process: a module run by another thread
    meanwhile lands in the tracer ("module is not installed as a submodule"). Thread pools and
    multi-threaded Dask workers therefore never load while another chunk evaluates.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._active = self._waiting = 0
        self._loading = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not (self._loading or self._waiting))
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not (self._loading or self._active))
            self._waiting -= 1
            self._loading = True
        try:
            yield
        finally:
            with self._cond:
                self._loading = False
                self._cond.notify_all()


_GATE = _Gate()


def _resolve(handle):
    """The payload a handle names, deserialised at most once per worker thread and token."""
    if isinstance(handle, _Live):
        return handle.value
    cache = _WORKER.__dict__.setdefault("cache", collections.OrderedDict())
    if handle.token in cache:
        cache.move_to_end(handle.token)
        return cache[handle.token]
    if isinstance(handle, _Spool):
        with open(handle.path, "rb") as f:
            data = f.read()
    else:
        data = handle.data
    with _GATE.exclusive():
        value = pickle.loads(data)  # our own payload, written by the parent process
    cache[handle.token] = value
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    _WORKER.loads = getattr(_WORKER, "loads", 0) + 1
    return value


def run_chunk(state, request, job: Job):
    """Worker entry point: ``(losses [stop - start], seconds, payloads loaded, counted)``.

    ``state`` names the oracle, ``request`` (None for kind "rows") ``(theta, coords)`` or
    ``(theta, dirs)``, dirs being a ``Directions`` recipe (rows made here) or a tensor. Calls
    the oracle's evaluation hooks (``evaluate_coordinates`` ...) once per block: they neither
    count queries nor check the budget, so worker copies never double count. ``counted`` is
    how much the worker copy's ``counters()`` grew in this chunk (``{}`` for a live state: the
    parent's own oracle counted it already).
    """
    began, loads_before = time.perf_counter(), getattr(_WORKER, "loads", 0)
    if job.threads and os.getpid() != job.parent_pid and torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    counted_before = None
    try:
        oracle = _resolve(state)
        if not isinstance(state, _Live):
            counted_before = read_counters(oracle)
        req = _resolve(request) if request is not None else None
        out = []
        with torch.no_grad(), _GATE.shared():
            for a in range(job.start, job.stop, job.block):
                b = min(job.stop, a + job.block)
                if job.kind == "coordinate":
                    theta, coords = req
                    values = oracle.evaluate_coordinates(theta, coords[a:b], job.mu)
                elif job.kind == "direction":
                    theta, dirs = req
                    rows = dirs.rows(a, b) if isinstance(dirs, Directions) else dirs[a:b]
                    values = oracle.evaluate_directions(theta, rows, job.mu)
                else:
                    values = oracle.evaluate_losses(job.rows[a - job.start : b - job.start])
                out.append(as_tensor(values).reshape(-1))
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11; the parent names the chunk regardless
            exc.add_note(f"in {job.kind} chunk {job.chunk + 1}/{job.chunks} "
                         f"(positions {job.start}..{job.stop - 1}) on pid {os.getpid()}")
        raise
    loads = getattr(_WORKER, "loads", 0) - loads_before
    counted = {}
    if counted_before is not None:
        counted = {k: v - counted_before.get(k, 0) for k, v in read_counters(oracle).items()}
    return torch.cat(out), time.perf_counter() - began, loads, counted


def run_task(fn, shared, args):
    """Worker entry point of ``map_ordered``: ``fn(*shared values, *args)``, each shared value
    resolved from its handle (deserialised at most once per worker thread)."""
    values = [_resolve(handle) for handle in shared]
    return fn(*values, *args)


__all__ = ["CACHE_SIZE", "Job", "Shipper", "TRANSPORTS", "add_counters", "check_shippable", "compact",
           "counting_target", "default_transport", "read_counters", "run_chunk", "run_task",
           "shippable_bytes"]
