"""The model host: everything the server does with a request once it is decoded, for every
endpoint, with no transport in it (no grpc, no protobuf, no HTTP).

:class:`ModelHost` finds the model by name and version, validates the decoded input tensors
against it, runs the black box under the concurrency limit and its bounded queue
(:class:`CallQueue`), picks and size-checks the outputs, answers metadata and statistics, and
feeds the telemetry (:class:`~deepzero_oracle.server.metrics.Telemetry`). The endpoints only
translate: :mod:`deepzero_oracle.server.servicer` (protobuf <-> host) and
:mod:`deepzero_oracle.server.rest` (JSON or binary tensors <-> host). Every failure is a
:class:`~deepzero_oracle.wire.errors.WireError` carrying the status to answer.

A *caller* is what the host asks about the client waiting for an answer: anything with
``time_remaining()`` (seconds left before its deadline; None: no deadline) and ``is_active()``
(still waiting); a gRPC call's context is one. REST requests pass None (no deadline).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from deepzero_oracle.server.metrics import Telemetry, note_model, note_rows
from deepzero_oracle.server.specs import MODEL_VERSION, CallError, ServedModel
from deepzero_oracle.wire.constants import NO_DEADLINE_SECONDS
from deepzero_oracle.wire.errors import WireError

# Room for the protobuf envelope around raw tensor bytes when checking answer sizes (clients
# keep 64 KiB of room on their side, so an answer as large as its request always fits).
_ENVELOPE_BYTES = 4096


# How often a request waiting for a black-box slot checks that its caller is still there.
_QUEUE_POLL_SECONDS = 0.2


class CallQueue:
    """The black box's slots and the bounded queue in front of them, shared by gRPC and REST.

    At most ``max_concurrency`` calls run at once; at most ``max_pending`` are admitted in all
    (running + waiting). A call that finds every slot busy waits, first come first served,
    until a slot frees, its deadline passes (DEADLINE_EXCEEDED) or its caller goes away
    (CANCELLED); a call that finds ``max_pending`` admitted is refused at once
    (RESOURCE_EXHAUSTED, HTTP 429). After :meth:`close` new calls are refused (UNAVAILABLE)
    and waiting ones get until the end of the grace period.

    ``in_flight`` (calls running) and ``queued`` (calls waiting) are plain ints to read (e.g.
    for metrics); they change under the queue's lock.
    """

    def __init__(self, max_concurrency: int, max_pending: int):
        if not 1 <= max_concurrency <= max_pending:
            raise ValueError(f"need 1 <= max_concurrency <= max_pending, got max_concurrency={max_concurrency}, "
                             f"max_pending={max_pending} (max_pending counts the running calls too)")
        self.max_concurrency, self.max_pending = max_concurrency, max_pending
        self.in_flight = 0
        self.queued = 0
        self._changed = threading.Condition()
        self._closed_until: float | None = None  # monotonic end of the grace period, once closed

    def acquire(self, deadline: float | None = None, alive=None) -> None:
        """Take a slot, waiting in line if needed.

        Args:
            deadline: ``time.monotonic()`` value to give up at (None: no deadline).
            alive: a callable that says whether the caller still waits for the answer (a gRPC
                context's ``is_active``); None: always.
        Raises:
            WireError: UNAVAILABLE (closed), RESOURCE_EXHAUSTED (full), DEADLINE_EXCEEDED or
                CANCELLED (while waiting).
        """
        with self._changed:
            if self._closed_until is not None:
                raise WireError("the server is stopping; send the request again to another replica or "
                                "once it is back", "UNAVAILABLE")
            if self.queued == 0 and self.in_flight < self.max_concurrency:
                self.in_flight += 1
                return
            if self.in_flight + self.queued >= self.max_pending:
                raise WireError(f"the server is full: {self.in_flight} black-box call(s) running and "
                                f"{self.queued} waiting (--max-pending {self.max_pending}); retry later, "
                                "or raise --max-pending (queue) or --max-concurrency (slots)",
                                "RESOURCE_EXHAUSTED", http=429)
            self.queued += 1
            try:
                while self.in_flight >= self.max_concurrency:
                    wait = _QUEUE_POLL_SECONDS
                    now = time.monotonic()
                    for end, failure in ((deadline, _deadline_error), (self._closed_until, _stopped_error)):
                        if end is not None:
                            if now >= end:
                                self._changed.notify()  # a slot this waiter was woken for goes to the next
                                raise failure(self.max_concurrency)
                            wait = min(wait, end - now)
                    if alive is not None and not alive():
                        self._changed.notify()
                        raise WireError("the client went away while waiting for a black-box slot", "CANCELLED")
                    self._changed.wait(wait)
                self.in_flight += 1
            finally:
                self.queued -= 1

    def release(self) -> None:
        """Give a slot back (wakes the first waiter)."""
        with self._changed:
            self.in_flight -= 1
            self._changed.notify()

    def close(self, grace: float) -> None:
        """Refuse new calls from now on; calls already waiting give up after ``grace`` s."""
        with self._changed:
            if self._closed_until is None:
                self._closed_until = time.monotonic() + max(0.0, grace)
            self._changed.notify_all()


def _deadline_error(slots: int) -> WireError:
    return WireError(f"the deadline passed while waiting for one of {slots} black-box slot(s); give "
                     "the call a longer deadline, or retry when the server is less busy", "DEADLINE_EXCEEDED")


def _stopped_error(slots: int) -> WireError:
    return WireError("the server stopped before a black-box slot was free; send the request again to "
                     "another replica or once it is back", "UNAVAILABLE")


def deadline_of(caller) -> float | None:
    """The ``time.monotonic()`` deadline of a caller (see the module docstring; None: REST, no
    deadline, or one so far off (over :data:`NO_DEADLINE_SECONDS`) that it means none; a gRPC
    client without a deadline shows a remaining time of ~1e19 s, which no lock or clock accepts)."""
    if caller is None:
        return None
    remaining = caller.time_remaining()
    if remaining is None or not remaining <= NO_DEADLINE_SECONDS:  # None, huge or NaN: none
        return None
    return time.monotonic() + max(0.0, remaining)


def server_version() -> str:
    """This package's version ("unknown" if it cannot be read)."""
    try:
        from deepzero_oracle import __version__
        return __version__
    except Exception:  # a half-written package __init__ must not stop the server
        return "unknown"


class ModelHost:
    """The served models and the one inference path of every endpoint.

    Every method raises WireError (with the status to answer), never a transport's error.

    Args:
        models: the served models by wire name.
        max_message_bytes: largest answer it may send (larger ones get RESOURCE_EXHAUSTED).
        max_concurrency: black-box calls running at once, across all endpoints.
        max_pending: black-box calls admitted at once (running + waiting for a slot); more are
            refused with RESOURCE_EXHAUSTED (HTTP 429). See :class:`CallQueue`.
        worker: ``(index, count)`` when this process is one of ``count`` sharing a port
            (``serve --workers N``); the gRPC ServerReady names it, so clients can spread their
            connections over the workers.
        metrics: also keep Prometheus metrics in ``telemetry`` (needs the ``metrics`` extra);
            the model statistics are always kept.
    """

    def __init__(self, models: dict[str, ServedModel], *, max_message_bytes: int, max_concurrency: int,
                 max_pending: int = 64, worker: tuple[int, int] | None = None, metrics: bool = False):
        self.models = models
        self.worker = worker
        self.max_message_bytes = max_message_bytes
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.calls = CallQueue(max_concurrency, max_pending)
        self.ready = True
        # Per-model statistics, Prometheus metrics and the drain state (see .metrics).
        self.telemetry = Telemetry(models, prometheus=metrics, version=MODEL_VERSION, load=self.calls)

    @property
    def in_flight(self) -> int:
        """Black-box calls running now."""
        return self.calls.in_flight

    @property
    def queued(self) -> int:
        """Black-box calls waiting for a slot now."""
        return self.calls.queued

    def stop_admitting(self, grace: float) -> None:
        """Server stopping: new calls get UNAVAILABLE; waiting ones give up after ``grace`` s."""
        self.calls.close(grace)

    # -- models, metadata, statistics ----------------------------------------------------
    def model(self, name: str, version: str = "") -> ServedModel:
        """The model for a request's name/version ("" = the only model); NOT_FOUND otherwise."""
        if not name:
            if len(self.models) == 1:
                name = next(iter(self.models))
            else:
                raise WireError(f"model_name is required; this server serves {sorted(self.models)}",
                                "NOT_FOUND")
        model = self.models.get(name)
        if model is None:
            raise WireError(f"unknown model {name!r}; this server serves {sorted(self.models)}",
                            "NOT_FOUND")
        if version not in ("", MODEL_VERSION):
            raise WireError(f"model {name!r} has no version {version!r}; it has [{MODEL_VERSION!r}]",
                            "NOT_FOUND")
        note_model(name)  # labels the request being counted, if any
        return model

    def model_ready(self, name: str, version: str = "") -> bool:
        """Ready if the server is and it serves that model name and version (False, not an
        error, for an unknown one)."""
        return self.ready and name in self.models and version in ("", MODEL_VERSION)

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """The statistics extension's entries (:meth:`Telemetry.statistics`): every model for an
        empty name; NOT_FOUND for an unknown model or version."""
        if name:
            self.model(name, version)  # NOT_FOUND with the usual message
        try:
            return self.telemetry.statistics(name, version)
        except KeyError:
            raise WireError(f"no model has version {version!r}; they have [{MODEL_VERSION!r}]",
                            "NOT_FOUND") from None

    def limits(self) -> dict:
        """What a client may ask of this server: ``max_message_bytes``, ``max_concurrency``,
        ``server_version``."""
        return {"max_message_bytes": self.max_message_bytes, "max_concurrency": self.max_concurrency,
                "server_version": server_version()}

    def server_info(self) -> dict:
        """``{"name", "version"}`` of this server (each endpoint adds its extensions)."""
        return {"name": "deepzero-oracle", "version": server_version()}

    # -- inference -------------------------------------------------------------------------
    def validate(self, model: ServedModel, names: list[str], arrays: list[np.ndarray]):
        """Decoded request tensors (any endpoint) -> ``(names, arrays)`` in call order, checked
        against the model (count, names, rows, declared datatypes and shapes)."""
        for name in names:
            if not name:
                raise WireError("an input tensor has no name")
        return model.order_inputs(names, arrays)

    def infer(self, model: ServedModel, names: list[str], arrays: list[np.ndarray], requested=(),
              caller=None) -> list[tuple[str, np.ndarray]]:
        """Validated inputs ``[N, ...]`` -> the requested outputs as ``(name, array [N, ...])``.

        The one inference path of every endpoint: NaN/Inf inputs are INVALID_ARGUMENT, the call
        runs under the concurrency limit (``caller``: see the module docstring; None for
        REST), and answers over the message limit are RESOURCE_EXHAUSTED.
        """
        bad, where = model.nonfinite(names, arrays)
        if bad is not None:
            rows = np.flatnonzero(bad)
            raise WireError(f"input {where!r} has NaN or Inf in {len(rows)} row(s) (first: row "
                            f"{rows[0]}); the server rejects non-finite inputs")
        try:
            outs = self.run(model, arrays, caller)
        except CallError as e:
            raise WireError(str(e), e.code) from e
        pairs = self.select_outputs(model, outs, requested)
        note_rows(len(arrays[0]))
        return pairs

    def run(self, model: ServedModel, arrays, caller=None) -> list[np.ndarray]:
        """Call the model in a black-box slot (:class:`CallQueue`): wait in line for one while
        all are busy, until the caller's deadline if it has one (None: no deadline, as for
        REST); refused at once when the queue is full.

        Raises:
            WireError: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE, CANCELLED (no slot).
            CallError: the black box itself failed.
        """
        deadline = deadline_of(caller)
        if deadline is not None and deadline <= time.monotonic():
            raise WireError("deadline passed before the black box could run", "DEADLINE_EXCEEDED")
        with self.telemetry.waiting():
            self.calls.acquire(deadline, caller.is_active if caller is not None else None)
        try:
            with self.telemetry.executing(model.name):
                return model.call(arrays)
        finally:
            self.calls.release()

    def select_outputs(self, model: ServedModel, outs: list[np.ndarray],
                       requested=()) -> list[tuple[str, np.ndarray]]:
        """``(name, array)`` pairs of the ``requested`` output names (all if empty), size-checked."""
        names = model.output_names(len(outs))
        if requested:
            unknown = [w for w in requested if w not in names]
            if unknown:
                raise WireError(f"unknown output(s) {unknown}; model {model.name!r} has {names}")
            pairs = [(n, outs[names.index(n)]) for n in requested]
        else:
            pairs = list(zip(names, outs))
        size = sum(o.nbytes for _, o in pairs)
        if size + _ENVELOPE_BYTES > self.max_message_bytes:
            raise WireError(f"the answer has {size / 2**20:.1f} MiB, over the server's "
                            f"{self.max_message_bytes / 2**20:.0f} MiB message limit; send fewer "
                            "rows per call or raise --max-message-mb", "RESOURCE_EXHAUSTED")
        return pairs

    # -- many queries in one call ------------------------------------------------------------
    def plan_queries(self, model: ServedModel, names: list[str], arrays: list[np.ndarray],
                     query_rows=()) -> QueryPlan:
        """Validated inputs ``[n, ...]`` holding several queries stacked (``query_rows`` rows
        each; empty: one row each) -> a :class:`QueryPlan`, with the queries holding NaN/Inf
        marked failed. Nothing runs yet.

        Raises:
            WireError: ``query_rows`` entries out of 1..n or not summing to n.
        """
        n = arrays[0].shape[0]
        if len(query_rows):
            # Each entry in 1..n first, so the sum cannot wrap around int64 into looking right.
            if len(query_rows) > n or any(not 0 < r <= n for r in query_rows):
                raise WireError(f"query_rows must be positive, each at most the batch size {n}, and sum "
                                f"to it; got {len(query_rows)} entries, not all in 1..{n}")
            rows = np.asarray(query_rows, dtype=np.int64)
            if int(rows.sum()) != n:
                raise WireError(f"query_rows must be positive and sum to the batch size {n}; got "
                                f"{len(rows)} entries summing to {int(rows.sum())}")
        else:
            rows = np.ones(n, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
        errors: dict[int, tuple[str, str]] = {}
        bad_rows, where = model.nonfinite(names, arrays)
        if bad_rows is not None:
            bad_q = np.add.reduceat(bad_rows.astype(np.int64), starts) > 0
            for i in np.flatnonzero(bad_q):
                errors[int(i)] = ("INVALID_ARGUMENT", f"query {i}: input {where!r} has NaN or Inf")
        return QueryPlan(model, arrays, rows, starts, errors)

    def run_queries(self, plan: QueryPlan, requested=(), caller=None) -> list[tuple[str, np.ndarray]] | None:
        """Run the valid queries of a plan: one black-box call for all of them, or, if that
        fails, one per query, so one query the black box chokes on does not fail the others.
        Failures are added to ``plan.errors``.

        Returns:
            The answers of the queries that succeeded, stacked in query order, as ``(name,
            array [rows, ...])`` pairs of the ``requested`` outputs; None if every query failed.
        """
        model, arrays, rows, starts, errors = plan.model, plan.arrays, plan.rows, plan.starts, plan.errors
        nq = len(rows)
        good = np.array([i not in errors for i in range(nq)]) if errors else np.ones(nq, bool)
        stacked, outs_per_query = None, None
        if good.any():
            sel = arrays if good.all() else [a[np.repeat(good, rows)] for a in arrays]
            try:
                stacked = self.run(model, sel, caller)
            except CallError as e:
                if good.sum() == 1:
                    errors[int(np.flatnonzero(good)[0])] = (e.code, str(e))
                else:
                    outs_per_query = []
                    for i in np.flatnonzero(good):
                        part = [a[starts[i]:starts[i] + rows[i]] for a in arrays]
                        try:
                            outs_per_query.append(self.run(model, part, caller))
                        except CallError as ei:
                            errors[int(i)] = (ei.code, f"query {i}: {ei}")
        if outs_per_query:
            try:
                stacked = [np.concatenate(parts) for parts in zip(*outs_per_query)]
            except ValueError as e:
                raise WireError(f"black box {model.name!r} answered queries with inconsistent "
                                f"shapes: {e}", "INTERNAL") from e
        pairs = self.select_outputs(model, stacked, requested) if stacked is not None else None
        note_rows(int(rows.sum()) - sum(int(rows[i]) for i in errors))
        return pairs


@dataclass
class QueryPlan:
    """Several queries stacked in one batch, decoded and validated, waiting for the black box.

    Attributes:
        model: the model they query.
        arrays: the inputs in call order, ``[n, ...]`` each (all queries stacked).
        rows: rows of each query ``[Q]``; ``starts`` their first rows ``[Q]``.
        errors: ``{query index: (status name, message)}`` of the queries that failed.
    """

    model: ServedModel
    arrays: list
    rows: np.ndarray
    starts: np.ndarray
    errors: dict = field(default_factory=dict)


__all__ = ["CallQueue", "ModelHost", "QueryPlan", "deadline_of", "server_version"]
