"""Run an oracle's query batches on any executor: inline, threads, processes, a Dask cluster.

Queries are independent, so one request (C coordinate losses, Q direction losses, P thetas)
splits into chunks that can run anywhere offering ``submit(fn, *args, **kwargs) -> Future``:
``InlineExecutor`` (the default), ``concurrent.futures.ThreadPoolExecutor`` /
``ProcessPoolExecutor``, or ``dask.distributed`` (a ``Client`` or its
``get_executor(pure=False)``; Dask is imported by nobody here, it is recognised by type name).

What travels
------------
Payloads, each deserialised once per worker (thread or process) and shipped once per worker
(except with the "bytes" transport below), identified by a content hash (token):

- the *state*: the wrapped oracle, pickled (a bound ``ModuleOracle`` with its learner, data
  batch, loss and black box; a ``CallableOracle`` with its function). About the size of the data
  batch plus the learner. Re-shipped only when its bytes change (a new ``bind``, a BatchNorm
  running-statistics update), so in training: once per step.
- the *request*: theta ``[dim]`` plus the sorted coordinates ``[C]`` (CGE), or theta plus the
  directions ``[Q, dim]``, or, for directions made by ``seeded_directions``, theta plus their
  recipe (seed, q, the mask's coordinates). Once per theta: CGE's plus and minus requests
  share it, since mu travels in the task.

Per task (~0.5 KB pickled): a ``_Job`` (kind, chunk number, ``start``/``stop`` positions in
the sorted request, mu, block; ~175 bytes) and two handles naming the state and the request
(~175 bytes each); for ``losses(thetas)`` also that chunk's rows ``[stop - start, dim]``
(they *are* the request; each row travels once). Never a perturbed theta.
Per result: the chunk's losses ``[stop - start]``, its run time and how many payloads it loaded.

How a handle reaches a worker (``transport``, picked from the executor):

- ``"live"`` (``InlineExecutor``): the objects themselves, same thread, nothing pickled.
- ``"scatter"`` (Dask): each payload is ``client.scatter(..., broadcast=True)`` once; tasks
  carry the Dask future, which the worker resolves to its local replica.
- ``"spool"`` (``ProcessPoolExecutor``, same machine): each payload is written once to a private
  temporary file (mode 0600); tasks carry ``(token, path)``, a worker reads it on a cache miss.
- ``"bytes"`` (anything else, e.g. a thread pool): the payload bytes ride along with each task
  (free in a thread pool: a reference, no copy); still deserialised once per worker thread.

Workers keep the last few payloads in a thread-local cache keyed by a content hash (token), so
a worker deserialises the state once per step and its copy of a ``ModuleOracle`` keeps its base
forward (feature reuse) across all chunks of the step. Payloads are pickled (cloudpickle when
installed): this is fan-out of our own objects to our own workers, never data from outside.

Determinism: a request is sorted (coordinates) and cut into fixed *blocks* of ``block`` queries;
each block is one call of the wrapped oracle's evaluation hook, and a task is a run of whole
blocks. So every loss is computed by the same block composition whatever the executor and
whatever the chunking, and the result is bitwise identical across them (given the same torch
build; the tests check inline vs threads vs spawn/forkserver processes vs Dask, whose workers run
torch with one thread while the parent uses two).
"""

from __future__ import annotations

import collections
import contextlib
import concurrent.futures as cf
import copy
import dataclasses
import hashlib
import math
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from typing import Any

import torch

from deepzero_oracle.blackbox.local import BlackBoxError, as_tensor
from deepzero_oracle.errors import NonFiniteLossError, QueryBudgetExceeded
from deepzero_oracle.estimators.base import mask_coordinates
from deepzero_oracle.oracle import Oracle, QueryLedger

try:  # cloudpickle ships lambdas and closures by value; plain pickle is the fallback
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - cloudpickle comes with dask
    _pickler = pickle

TRANSPORTS = ("live", "scatter", "spool", "bytes")
_KINDS = {"coordinate": "coordinates", "direction": "directions", "rows": "thetas"}


class ChunkError(RuntimeError):
    """A chunk of a request failed on the executor. ``__cause__`` is the worker's exception.

    Attributes:
        kind: "coordinate", "direction" or "rows".
        chunk: 0-based chunk number; ``chunks`` is how many the request had.
        start, stop: the chunk's positions ``[start, stop)`` in the (sorted) request.
    """

    def __init__(self, message, *, kind, chunk, chunks, start, stop):
        super().__init__(message)
        self.kind, self.chunk, self.chunks, self.start, self.stop = kind, chunk, chunks, start, stop


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


# -- payloads and worker side -------------------------------------------------------------------


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
class DirectionRecipe:
    """How to regenerate directions ``[q, dim]`` anywhere, bitwise: rows come in blocks of
    ``rows_per_seed``, block k drawn from its own generator seeded by ``(seed, k)``, so any row
    range can be made without the rows before it.

    Attributes:
        seed: the user's seed.
        q, dim: shape of the directions.
        dtype: torch dtype name (e.g. "float32").
        distribution: "gaussian" (``N(0, I)`` on the kept coordinates) or "sphere" (unit rows).
        coords: kept coordinates ``[d]`` (None: all), as in ``RGE.directions`` with a mask.
        rows_per_seed: rows per generator.
    """

    seed: int
    q: int
    dim: int
    dtype: str
    distribution: str = "gaussian"
    coords: torch.Tensor | None = None
    rows_per_seed: int = 16

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Directions ``[stop - start, dim]`` for rows ``[start, stop)``."""
        R = self.rows_per_seed
        first, last = start // R, -(-stop // R)
        parts = [self._block(k) for k in range(first, last)]
        block = torch.cat(parts) if parts else torch.empty(0, self.dim, dtype=self._dtype)
        return block[start - first * R : stop - first * R]

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def _block(self, k: int) -> torch.Tensor:
        n = min(self.rows_per_seed, self.q - k * self.rows_per_seed)
        # splitmix-style mixing: distinct, well-spread generator seeds per (seed, block)
        mixed = (self.seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 1) % 2**63
        g = torch.Generator().manual_seed(mixed)
        width = self.dim if self.coords is None else len(self.coords)
        u = torch.randn(n, width, generator=g, dtype=self._dtype)
        if self.distribution == "sphere":
            u = u / u.norm(dim=1, keepdim=True)
        if self.coords is None:
            return u
        out = torch.zeros(n, self.dim, dtype=self._dtype)
        out[:, self.coords] = u
        return out


@dataclasses.dataclass(frozen=True)
class _Job:
    """One task: positions ``[start, stop)`` of the sorted request, evaluated in blocks."""

    kind: str
    chunk: int
    chunks: int
    start: int
    stop: int
    block: int
    mu: float = 0.0
    rows: torch.Tensor | None = None  # only for kind "rows": thetas [stop - start, dim]
    threads: int | None = None  # torch threads to use in a worker process (None: leave)
    parent_pid: int = 0


_WORKER = threading.local()
_WORKER_CACHE_SIZE = 4  # state + request of this step and the previous one


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
    while len(cache) > _WORKER_CACHE_SIZE:
        cache.popitem(last=False)
    _WORKER.loads = getattr(_WORKER, "loads", 0) + 1
    return value


def _run_chunk(state, request, job: _Job):
    """Worker entry point: ``(losses [stop - start], seconds, payloads loaded)``.

    Calls the wrapped oracle's evaluation hooks (``evaluate_coordinates`` ...) once per block:
    they neither count queries nor check the budget, so worker copies never double count.
    """
    began, loads_before = time.perf_counter(), getattr(_WORKER, "loads", 0)
    if job.threads and os.getpid() != job.parent_pid and torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    try:
        oracle = _resolve(state)
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
                    rows = dirs.rows(a, b) if isinstance(dirs, DirectionRecipe) else dirs[a:b]
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
    return torch.cat(out), time.perf_counter() - began, loads


# -- the wrapper --------------------------------------------------------------------------------


class ParallelOracle(Oracle):
    """Answers another oracle's queries in chunks on an executor; same results, exact counts.

    ``coordinate_losses``, ``direction_losses`` and ``losses`` are split into chunks of whole
    blocks, submitted to ``executor`` and reassembled in request order. The budget is checked
    before anything is submitted and queries are counted here only (worker copies call the
    wrapped oracle's uncounted hooks). Other attributes (``bind``, ``theta``, ``set_theta``,
    ``learner``, ``parameters``, ``end_step``...) pass through to the wrapped oracle,
    so a ``ParallelOracle`` around a ``ModuleOracle`` can go to ``Trainer`` as is. Not thread
    safe: one request at a time.

    Args:
        oracle: the oracle to run (e.g. a bound ``ModuleOracle`` or a ``CallableOracle``). For any
            executor but the inline one it must pickle (cloudpickle if installed).
        executor: anything with ``submit(fn, *args, **kwargs) -> Future``; None: ``InlineExecutor``.
            A Dask ``Client`` or ``ClientExecutor`` is always submitted to with ``pure=False``.
        chunk_size: queries per task (rounded up to whole blocks). None: about
            ``tasks_per_worker`` tasks per worker slot, but no task under ``min_chunk_seconds``
            by the run time measured on earlier requests of the same kind (the first request
            of a kind, unmeasured, is just spread evenly).
        min_chunk_seconds: the smallest worthwhile task (scheduling overhead is ~ms).
        block: queries per call of the wrapped oracle, fixed so that results do not depend on
            chunking (capped by the oracle's ``max_batch``).
        workers: parallel slots of the executor; None: read from it (``_max_workers``, Dask
            threads), else ``os.cpu_count()``.
        transport: "live", "scatter", "spool" or "bytes" (module docstring); None: by executor.
        worker_threads: ``torch.set_num_threads`` in worker *processes* (e.g. 1 for a process
            pool with one worker per core); None leaves them alone.
        budget: query budget; None inherits the wrapped oracle's. The count starts from the
            wrapped oracle's and continues here only (the wrapped oracle's counter stays put).
        tasks_per_worker: how many tasks per worker slot to aim for (load balance vs overhead).
    """

    def __init__(self, oracle: Oracle, executor=None, *, chunk_size: int | None = None,
                 min_chunk_seconds: float = 0.05, block: int = 32, workers: int | None = None,
                 transport: str | None = None, worker_threads: int | None = None,
                 budget: int | None = None, tasks_per_worker: int = 4):
        if not isinstance(oracle, Oracle):
            raise TypeError(f"ParallelOracle wraps an Oracle, got {type(oracle).__name__}")
        if executor is not None and not callable(getattr(executor, "submit", None)):
            raise TypeError(f"executor needs a submit(fn, *args) method, "
                            f"got {type(executor).__name__}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
        if int(block) < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        super().__init__(oracle.dim, budget=oracle.budget if budget is None else budget,
                         max_batch=None)
        self.queries = oracle.queries  # the count continues here; the wrapped one stays put
        self.oracle = oracle
        self.executor = InlineExecutor() if executor is None else executor
        self.transport = transport or _default_transport(self.executor)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "scatter" and _dask_client(self.executor) is None:
            raise ValueError("transport 'scatter' needs a dask.distributed Client or its "
                             "ClientExecutor")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.min_chunk_seconds = float(min_chunk_seconds)
        self.block = min(int(block), oracle.max_batch or int(block))
        self.workers, self.worker_threads = workers, worker_threads
        self.tasks_per_worker = int(tasks_per_worker)
        self.seconds_per_query: dict[str, float] = {}  # measured, per kind: sizes the chunks
        self.stats = {"requests": 0, "tasks": 0, "payloads_shipped": 0, "payload_bytes": 0,
                      "worker_loads": 0}
        self.last_chunks: list[tuple[int, int]] = []  # [(start, stop)] of the last request
        self._shipped: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._spool_dir: list = [None]  # in a list: shared with the finalizer
        self._recipes: dict[int, tuple] = {}
        self._closer = weakref.finalize(self, _cleanup, self._shipped, self._spool_dir)

    # -- pass-through ----------------------------------------------------------------------------

    def __getattr__(self, name):
        # only reached for attributes the wrapper lacks; guard private names and early lookups
        if name.startswith("_") or "oracle" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["oracle"], name)

    def bind(self, *batch) -> "ParallelOracle":
        """Bind a data batch (e.g. ``x [B, ...], y [B, ...]``) on the wrapped oracle; returns
        this wrapper (so ``oracle = oracle.bind(x, y)`` keeps the parallel one)."""
        self.oracle.bind(*batch)
        return self

    def end_step(self) -> None:
        """The wrapped oracle's end-of-step update (e.g. BatchNorm running statistics)."""
        self.oracle.end_step()

    def evaluate_gradient(self, theta) -> torch.Tensor:
        """The wrapped oracle's exact gradient ``[dim]`` at ``theta [dim]``, computed here."""
        return self.oracle.evaluate_gradient(theta)

    # -- queries -----------------------------------------------------------------------------

    def losses(self, thetas) -> torch.Tensor:
        """Loss at each row of ``thetas [P, dim]``; returns ``[P]``. Costs P queries; each task
        carries its own rows (every row travels once)."""
        thetas = self._as_vector(thetas, rows=True)
        return self._run("rows", len(thetas), None, rows=thetas)

    def coordinate_losses(self, theta, coords, mu: float) -> torch.Tensor:
        """``loss(theta + mu * e_i)`` for each ``i`` in ``coords [C]``; returns ``[C]`` in the
        order asked. Workers get theta and the sorted coordinates once, tasks a position range."""
        theta, coords = self._as_vector(theta), self._as_coords(coords)
        # sorted, a chunk is a contiguous run of coordinates: one or two parameter tensors,
        # which the ModuleOracle fast path evaluates best; results are put back in order
        order = torch.argsort(coords, stable=True)
        ranked = coords[order].contiguous()
        values = self._run(
            "coordinate", len(ranked), (theta, ranked), mu=float(mu),
            describe=lambda a, b: f"; coordinates {int(ranked[a])}..{int(ranked[b - 1])}",
        )
        out = torch.empty_like(values)
        out[order] = values
        return out

    def direction_losses(self, theta, dirs, mu: float) -> torch.Tensor:
        """``loss(theta + mu * u_j)`` for each row ``u_j`` of ``dirs [Q, dim]``; returns ``[Q]``.

        Directions from ``seeded_directions`` (the same, unmodified tensor) travel as their
        recipe and are regenerated by the workers; any other ``dirs`` travel once per worker.
        """
        recipe = self._recipe_of(dirs)
        theta = self._as_vector(theta)
        dirs = self._as_vector(dirs, rows=True)
        payload = (theta, dirs if recipe is None else recipe)
        return self._run("direction", len(dirs), payload, mu=float(mu))

    def seeded_directions(self, q: int, seed: int, *, mask=None, distribution: str = "gaussian",
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """Random directions ``[q, dim]`` that workers can regenerate from a seed.

        Pass them to ``RGE.estimate(oracle, theta, directions=...)`` (with the same ``q`` and
        ``distribution`` there): ``direction_losses`` then ships ``(seed, q, mask)`` instead of
        a ``[q, dim]`` matrix. Same law as ``RGE.directions``, not the same draws.

        Args:
            q: number of directions.
            seed: any integer; the same seed gives the same directions everywhere.
            mask: boolean ``[dim]``; directions are zero outside it.
            distribution: "gaussian" or "sphere" (unit rows).
            dtype: default ``torch.get_default_dtype()``.
        """
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"distribution must be 'gaussian' or 'sphere', got {distribution!r}")
        coords = None if mask is None else mask_coordinates(mask, self.dim)
        dtype = dtype or torch.get_default_dtype()
        recipe = DirectionRecipe(int(seed), int(q), self.dim, str(dtype).removeprefix("torch."),
                                 distribution, coords)
        dirs = recipe.rows(0, recipe.q)
        key = id(dirs)
        self._recipes[key] = (weakref.ref(dirs, lambda _, k=key, r=self._recipes: r.pop(k, None)),
                              dirs._version, recipe)
        return dirs

    def close(self) -> None:
        """Release shipped payloads (Dask futures, spool files); the next request re-ships.
        The executor stays open: it belongs to the caller."""
        self._closer()
        self._closer = weakref.finalize(self, _cleanup, self._shipped, self._spool_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"ParallelOracle({self.oracle!r}, executor={type(self.executor).__name__}, "
                f"transport={self.transport!r}, block={self.block})")

    # -- machinery ---------------------------------------------------------------------------

    def _check_budget(self, count: int) -> None:
        if self.budget is not None and self.queries + count > self.budget:
            raise QueryBudgetExceeded(
                f"this request needs {count} queries but only {self.budget - self.queries} of the "
                f"budget of {self.budget} remain ({self.queries} used); raise the oracle's budget "
                f"or ask for fewer coordinates/directions"
            )

    def _recipe_of(self, dirs) -> DirectionRecipe | None:
        entry = self._recipes.get(id(dirs))
        if entry is not None and entry[0]() is dirs and dirs._version == entry[1]:
            return entry[2]
        return None

    def _run(self, kind: str, count: int, request, *, mu: float = 0.0, rows=None,
             describe=lambda a, b: "") -> torch.Tensor:
        """Budget, plan, ship, submit, gather: the losses ``[count]`` in request order."""
        self._check_budget(count)  # before anything is pickled or submitted
        if count == 0:
            self.last_chunks = []
            return torch.empty(0)
        chunks = self._plan(kind, count)
        live = self.transport == "live"
        if not live:  # a pickled view carries its whole storage: ship only what is meant
            request = None if request is None else tuple(_compact(t) for t in request)
        state_h = self._handle(self.oracle, transient=True)
        request_h = None if request is None else self._handle(request)
        self.stats["requests"] += 1
        client = _dask_client(self.executor)
        threads, pid = self.worker_threads, os.getpid()
        futures = []
        for i, (a, b) in enumerate(chunks):
            part = None if rows is None else rows[a:b] if live else _compact(rows[a:b])
            job = _Job(kind, i, len(chunks), a, b, self.block, mu, part, threads, pid)
            extra = {}
            if client is not None:  # Dask: never cache by argument hash, name the chunk
                extra = {"pure": False, "key": f"deepzero-{kind}-{i}-{uuid.uuid4().hex[:12]}"}
            futures.append(self.executor.submit(_run_chunk, state_h, request_h, job, **extra))
        self.stats["tasks"] += len(futures)
        return self._gather(kind, chunks, futures, count, describe)

    def _gather(self, kind, chunks, futures, count, describe):
        parts, seconds, failure = [], 0.0, None
        for i, ((a, b), future) in enumerate(zip(chunks, futures)):
            try:
                values, took, loads = future.result()
            except BaseException as exc:  # noqa: BLE001 - any worker failure, reported per chunk
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if failure is None:
                    failure = (i, a, b, exc)
                    for later in futures[i + 1:]:
                        later.cancel()  # not-yet-started chunks need not run
                continue
            values = torch.as_tensor(values).reshape(-1)
            if values.numel() != b - a:
                raise BlackBoxError(f"{type(self.oracle).__name__} returned {values.numel()} "
                                    f"losses for the {b - a} queries of chunk "
                                    f"{i + 1}/{len(chunks)}")
            self.queries += b - a  # spent, even if another chunk fails
            self.stats["worker_loads"] += loads
            seconds += took
            parts.append(values)
        if failure is not None:
            i, a, b, exc = failure
            raise ChunkError(
                f"{kind} chunk {i + 1}/{len(chunks)} (positions {a}..{b - 1} of this request of "
                f"{count} {_KINDS[kind]}{describe(a, b)}) failed on "
                f"{type(self.executor).__name__}: {type(exc).__name__}: {exc}",
                kind=kind, chunk=i, chunks=len(chunks), start=a, stop=b,
            ) from exc
        out = torch.cat(parts)
        spq = seconds / count
        old = self.seconds_per_query.get(kind)
        self.seconds_per_query[kind] = spq if old is None else 0.5 * (old + spq)
        bad = ~torch.isfinite(out)
        if bad.any():
            first = int(bad.nonzero()[0])
            raise NonFiniteLossError(
                f"{int(bad.sum())} of {out.numel()} losses were NaN or Inf (first at query {first} "
                f"of this request). The loss or the black box behind it produced non-finite "
                f"values: check the black box's outputs, or lower mu / the learning rate"
            )
        return out

    def _plan(self, kind: str, count: int) -> list[tuple[int, int]]:
        """Chunk boundaries ``[(start, stop)]``: whole blocks, each worth >= min_chunk_seconds."""
        blocks = -(-count // self.block)
        if self.chunk_size is not None:
            per = -(-self.chunk_size // self.block)
        else:
            # enough tasks to keep every worker busy (and balance uneven costs) ...
            per = -(-blocks // (self._worker_slots() * self.tasks_per_worker))
            spq = self.seconds_per_query.get(kind)
            if spq:  # ... but none so small that scheduling overhead dominates
                per = max(per, math.ceil(self.min_chunk_seconds / (spq * self.block)))
        step = per * self.block
        self.last_chunks = [(a, min(count, a + step)) for a in range(0, count, step)]
        return self.last_chunks

    def _worker_slots(self) -> int:
        if self.workers:
            return int(self.workers)
        if isinstance(self.executor, InlineExecutor):
            return 1
        client = _dask_client(self.executor)
        if client is not None:
            return max(1, sum(client.nthreads().values()))
        return int(getattr(self.executor, "_max_workers", 0) or os.cpu_count() or 1)

    def _handle(self, payload, transient: bool = False):
        """A handle naming ``payload`` for the tasks, shipping it first if workers lack it."""
        if self.transport == "live":
            return _Live(payload)
        if transient:
            payload = _shippable(payload)
        try:
            data = _pickler.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"cannot ship {type(payload).__name__} to the workers of "
                f"{type(self.executor).__name__} because it does not pickle ({exc}); make the "
                f"oracle picklable (module-level functions, no open connections) or use the "
                f"InlineExecutor (nothing is pickled)"
            ) from exc
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
            handle = _dask_client(self.executor).scatter(blob, broadcast=True, hash=False)
        self.stats["payloads_shipped"] += 1
        self.stats["payload_bytes"] += len(data)
        self._shipped[token] = handle
        while len(self._shipped) > _WORKER_CACHE_SIZE:
            _retire(*self._shipped.popitem(last=False))
        return handle


def _shippable(oracle: Oracle) -> Oracle:
    """A shallow copy of the oracle fit to pickle: counters reset, per-theta caches dropped
    (a ModuleOracle's base-forward cache is large and keyed by graph nodes; workers rebuild it)."""
    clone = copy.copy(oracle)
    clone.ledger = QueryLedger()  # a fresh counter: the original's stays with the parent
    if getattr(clone, "_cache", None) is not None:
        clone._cache = None
    return clone


def _compact(value):
    """A tensor that pickles to its own size: views (a row slice, theta inside a batch) are
    copied, since pickling a view writes its whole underlying storage."""
    if isinstance(value, torch.Tensor) and (
        value.untyped_storage().nbytes() > value.numel() * value.element_size()
        or not value.is_contiguous()
    ):
        return value.clone(memory_format=torch.contiguous_format)
    return value


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


def _dask_client(executor):
    """The dask.distributed Client behind ``executor``, or None (without importing Dask)."""
    module = type(executor).__module__ or ""
    if not module.startswith("distributed"):
        return None
    if type(executor).__name__ == "Client":
        return executor
    return getattr(executor, "_client", None)  # ClientExecutor keeps its client here


def _default_transport(executor) -> str:
    if isinstance(executor, InlineExecutor):
        return "live"
    if _dask_client(executor) is not None:
        return "scatter"
    if isinstance(executor, cf.ProcessPoolExecutor):
        return "spool"
    return "bytes"


__all__ = ["ChunkError", "DirectionRecipe", "InlineExecutor", "ParallelOracle", "TRANSPORTS"]
