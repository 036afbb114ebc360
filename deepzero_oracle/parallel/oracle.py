"""ParallelOracle: plan a request into chunks of whole blocks, submit them, gather the losses."""

from __future__ import annotations

import math
import os
import uuid

import torch

from deepzero_oracle.errors import BlackBoxError, NonFiniteLossError
from deepzero_oracle.estimators.directions import Directions, direction_matrix
from deepzero_oracle.oracle import Oracle
from deepzero_oracle.parallel.executors import InlineExecutor, dask_client, executor_slots
from deepzero_oracle.parallel.payloads import (Job, Shipper, add_counters, check_shippable, compact,
                                               counting_target, default_transport, run_chunk)

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


class ParallelOracle(Oracle):
    """Answers another oracle's queries in chunks on an executor; same results, exact counts.

    ``coordinate_losses``, ``direction_losses`` and ``losses`` are split into chunks of whole
    blocks, submitted to ``executor`` and reassembled in request order. The budget is checked
    before anything is submitted and queries are counted here only (worker copies call the
    wrapped oracle's uncounted hooks). Other work the wrapped oracle counts (its ``counters()``,
    e.g. solver calls; see the package docstring) is counted by the worker copies and added to
    the wrapped oracle here, so its totals read as if it had run inline.
    Other attributes (``bind``, ``theta``, ``set_theta``,
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
        transport: one of ``TRANSPORTS`` (package docstring); None: by executor.
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
        counter = counting_target(oracle)
        if counter is not None and not callable(getattr(counter, "add_counters", None)):
            raise TypeError(f"{type(counter).__name__} has counters() but no add_counters(counts): its "
                            f"worker copies' counts could not come back; define add_counters beside counters()")
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
        self.stats = {"requests": 0, "tasks": 0, "payloads_shipped": 0, "payload_bytes": 0,
                      "worker_loads": 0}
        self.worker_counters: dict[str, int] = {}  # counted on worker copies, also added to oracle
        self.shipper = Shipper(self.executor, transport or default_transport(self.executor),
                               self.stats)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.min_chunk_seconds = float(min_chunk_seconds)
        self.block = min(int(block), oracle.max_batch or int(block))
        self.workers, self.worker_threads = workers, worker_threads
        self.tasks_per_worker = int(tasks_per_worker)
        self.seconds_per_query: dict[str, float] = {}  # measured, per kind: sizes the chunks
        self.last_chunks: list[tuple[int, int]] = []  # [(start, stop)] of the last request

    @property
    def transport(self) -> str:
        """How payloads reach the workers: one of ``TRANSPORTS``."""
        return self.shipper.transport

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

    def state_dict(self) -> dict:
        """The wrapped oracle's counters with this wrapper's query count: a checkpoint written
        with an executor resumes without one, and the other way round."""
        return {**self.oracle.state_dict(), "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s counters (the queries here, the rest on the wrapped oracle)."""
        self.oracle.load_state_dict(state)
        self.queries = int(state["queries"])

    def evaluate_gradient(self, theta) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped oracle's ``(exact gradient [dim], loss)`` at ``theta [dim]``, computed
        here (``autograd_gradient`` counts it on this wrapper)."""
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
        """``loss(theta + mu * u_j)`` for each row ``u_j`` of ``dirs``; returns ``[Q]``.

        A ``Directions`` recipe travels as itself (a seed and a shape) and workers make the
        rows they need; any other ``dirs`` (a tensor ``[Q, dim]``, or an object with
        ``matrix()``) travel as a matrix, once per worker.
        """
        theta = self._as_vector(theta)
        if not isinstance(dirs, Directions):
            dirs = self._as_vector(direction_matrix(dirs), rows=True)
            return self._run("direction", len(dirs), (theta, dirs), mu=float(mu))
        if dirs.dim != self.dim:
            raise ValueError(f"expected directions of dim {self.dim} (the number of trainable "
                             f"parameters), got a recipe of dim {dirs.dim}")
        return self._run("direction", dirs.q, (theta, dirs), mu=float(mu))

    def seeded_directions(self, q: int, seed: int, *, mask=None, distribution: str = "gaussian",
                          dtype: torch.dtype | None = None) -> Directions:
        """A ``Directions`` recipe for ``q`` random directions ``[q, dim]`` from ``seed``.

        Pass it to ``RGE.estimate(oracle, theta, directions=...)`` (with the same ``q`` and
        ``distribution`` there); ``RGE.directions`` makes the same kind of recipe with a seed
        drawn from its generator.

        Args:
            q: number of directions.
            seed: any integer; the same seed gives the same directions everywhere.
            mask: boolean ``[dim]``; directions are zero outside it.
            distribution: "gaussian" or "sphere" (unit rows).
            dtype: default ``torch.get_default_dtype()``.
        """
        return Directions.masked(seed, q, self.dim, mask, dtype=dtype, distribution=distribution)

    def close(self) -> None:
        """Release shipped payloads (Dask futures, spool files); the next request re-ships.
        The executor stays open: it belongs to the caller."""
        self.shipper.close()

    def __enter__(self) -> "ParallelOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        return (f"ParallelOracle({self.oracle!r}, executor={type(self.executor).__name__}, "
                f"transport={self.transport!r}, block={self.block})")

    # -- machinery ---------------------------------------------------------------------------

    def _run(self, kind: str, count: int, request, *, mu: float = 0.0, rows=None,
             describe=lambda a, b: "") -> torch.Tensor:
        """Budget, plan, ship, submit, gather: the losses ``[count]`` in request order."""
        self.ledger.check(count)  # before anything is pickled or submitted
        if count == 0:
            self.last_chunks = []
            return torch.empty(0)
        chunks = self._plan(kind, count)
        state = self.shipper.state(self.oracle)
        request = None if request is None else self.shipper.ship(request)
        self.stats["requests"] += 1
        dask = dask_client(self.executor) is not None
        live = self.transport == "live"
        futures = []
        for i, (a, b) in enumerate(chunks):
            part = None if rows is None else rows[a:b] if live else compact(rows[a:b])
            job = Job(kind, i, len(chunks), a, b, self.block, mu, part, self.worker_threads,
                      os.getpid())
            extra = {}
            if dask:  # never cache by argument hash, name the chunk
                extra = {"pure": False, "key": f"deepzero-{kind}-{i}-{uuid.uuid4().hex[:12]}"}
            futures.append(self.executor.submit(run_chunk, state, request, job, **extra))
        self.stats["tasks"] += len(futures)
        return self._gather(kind, chunks, futures, count, describe)

    def _gather(self, kind, chunks, futures, count, describe) -> torch.Tensor:
        """The chunks' losses ``[count]``. Every chunk that ran is spent; the first failure (a
        worker error, as ``ChunkError``, or an unusable answer) cancels the chunks not yet
        started and is raised once all others are in."""
        parts, seconds, failure = [], 0.0, None
        for i, ((a, b), future) in enumerate(zip(chunks, futures)):
            try:
                values, took, loads, counted = future.result()
            except BaseException as exc:  # noqa: BLE001 - any worker failure, reported per chunk
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if failure is None:
                    failure = ChunkError(
                        f"{kind} chunk {i + 1}/{len(chunks)} (positions {a}..{b - 1} of this "
                        f"request of {count} {_KINDS[kind]}{describe(a, b)}) failed on "
                        f"{type(self.executor).__name__}: {type(exc).__name__}: {exc}",
                        kind=kind, chunk=i, chunks=len(chunks), start=a, stop=b,
                    )
                    failure.__cause__ = exc
                    _cancel(futures[i + 1:])
                continue
            self.ledger.spend(b - a)  # spent, even if the answer or another chunk fails
            self.stats["worker_loads"] += loads
            self._count(counted)
            seconds += took
            try:
                parts.append(self.check_answer(values, b - a, first=a))
            except (BlackBoxError, NonFiniteLossError) as exc:
                if failure is None:
                    failure = exc
                    _cancel(futures[i + 1:])
        if failure is not None:
            raise failure
        spq = seconds / count
        old = self.seconds_per_query.get(kind)
        self.seconds_per_query[kind] = spq if old is None else 0.5 * (old + spq)
        return torch.cat(parts)

    def _count(self, counted: dict) -> None:
        """Add what a worker copy counted to the wrapped oracle (and to ``worker_counters``)."""
        add_counters(self.oracle, counted)
        for key, value in counted.items():
            self.worker_counters[key] = self.worker_counters.get(key, 0) + int(value)

    def _plan(self, kind: str, count: int) -> list[tuple[int, int]]:
        """Chunk boundaries ``[(start, stop)]``: whole blocks, each worth >= min_chunk_seconds."""
        blocks = -(-count // self.block)
        if self.chunk_size is not None:
            per = -(-self.chunk_size // self.block)
        else:
            # enough tasks to keep every worker busy (and balance uneven costs) ...
            slots = int(self.workers) if self.workers else executor_slots(self.executor)
            per = -(-blocks // (slots * self.tasks_per_worker))
            spq = self.seconds_per_query.get(kind)
            if spq:  # ... but none so small that scheduling overhead dominates
                per = max(per, math.ceil(self.min_chunk_seconds / (spq * self.block)))
        step = per * self.block
        self.last_chunks = [(a, min(count, a + step)) for a in range(0, count, step)]
        return self.last_chunks


def parallelize(oracle: Oracle, executor, **options) -> Oracle:
    """The oracle to train with on ``executor``: ``oracle`` itself when ``executor`` is None or
    an ``InlineExecutor`` (nothing to fan out), else ``ParallelOracle(oracle, executor,
    **options)`` (same losses, exact counts; ``options`` as ``ParallelOracle`` takes them).
    Raises ``NotShippable`` now, before any work, if the oracle cannot travel to the workers."""
    if executor is None or isinstance(executor, InlineExecutor):
        return oracle
    parallel = ParallelOracle(oracle, executor, **options)
    if parallel.transport != "live":
        check_shippable(oracle, executor)
    return parallel


def _cancel(futures) -> None:
    """Cancel the futures not yet started (they need not run)."""
    for future in futures:
        future.cancel()


__all__ = ["ChunkError", "ParallelOracle", "parallelize"]
