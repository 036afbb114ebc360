"""What a server counts: KServe v2 model statistics (always) and Prometheus metrics (optional).

One :class:`Telemetry` per server. Every inference request, over either protocol, is counted
once with its outcome: the gRPC handlers (``ModelInfer``, ``QueryBatch``, each ``QueryStream``
message) and the REST infer route open a :class:`Call` with :meth:`Telemetry.begin` and close
it with :meth:`Telemetry.end` and the status code name; in between, the model host's one
inference path notes which model it resolved (:func:`note_model`) and times each black-box call
(:meth:`Telemetry.waiting`, :meth:`Telemetry.executing`). The open call travels in a context
variable, so the path needs no extra argument (Starlette's threadpool copies the context).

The same counts answer the KServe v2 statistics extension (:meth:`Telemetry.statistics`, in
Triton's layout) and, with ``prometheus_client`` (the ``metrics`` extra), a
:class:`~prometheus_client.CollectorRegistry` of the server's own (never the global one, so
several servers in one process keep apart):

    deepzero_oracle_requests_total{model, protocol, status}   inference requests by outcome
    deepzero_oracle_rows_total{model, protocol}                rows answered
    deepzero_oracle_request_duration_seconds{model, protocol}  request latency (histogram)
    deepzero_oracle_queue_duration_seconds{model}              wait for a black-box slot (histogram)
    deepzero_oracle_blackbox_duration_seconds{model}           one black-box call (histogram)
    deepzero_oracle_inflight_requests{protocol}                requests being handled
    deepzero_oracle_queued_calls                               black-box calls waiting for a slot
    deepzero_oracle_running_calls                              black-box calls running

``status`` is the gRPC status code name for both protocols (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAVAILABLE, ...); ``model`` is a served model's name, or ``""`` when the
request named no served model (so a client cannot grow the label set). The telemetry also
holds the drain state: once :meth:`Telemetry.start_drain` runs, new calls are refused
(UNAVAILABLE) and :meth:`Telemetry.wait_idle` waits for the admitted ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass, field

from deepzero_oracle.extras import require

#: Latency buckets in seconds: 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROTOCOLS = ("grpc", "rest")
#: The answer to a request that arrives while the server drains.
DRAINING_MESSAGE = ("the server is shutting down (draining); retry, on another replica if there is "
                    "one")

_current: contextvars.ContextVar["Call | None"] = contextvars.ContextVar("deepzero_oracle_call", default=None)


def require_metrics_extra():
    """``prometheus_client``, or MissingExtra (an ImportError) naming the ``metrics`` extra."""
    return require("metrics", "prometheus_client", feature="Prometheus metrics (--metrics-port, GET /metrics)")


def metrics_available() -> bool:
    """Whether ``prometheus_client`` imports."""
    try:
        require_metrics_extra()
    except ImportError:
        return False
    return True


@dataclass
class Call:
    """One inference request being handled (``protocol``: "grpc" or "rest")."""

    protocol: str
    start_ns: int
    model: str = ""
    rows: int = 0
    refused: bool = False  # arrived while draining: answer UNAVAILABLE
    queue_ns: int = 0
    infer_ns: int = 0
    executions: int = 0
    first_queue_ns: int | None = None  # when it first asked for a black-box slot
    last_infer_end_ns: int | None = None
    token: contextvars.Token | None = field(default=None, repr=False)


def current_call() -> Call | None:
    """The inference request this thread (or task) is handling, if any."""
    return _current.get()


def note_model(name: str) -> None:
    """The request being handled resolved to the served model ``name``."""
    call = _current.get()
    if call is not None:
        call.model = name


def note_rows(rows: int) -> None:
    """The request being handled was answered with ``rows`` rows."""
    call = _current.get()
    if call is not None:
        call.rows = int(rows)


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self):
        self.count, self.ns = 0, 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


class _ModelCounts:
    """Triton's per-model statistics: requests (success/fail), rows, executions, phase times."""

    PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self):
        self.inference_count = 0   # rows of successful requests
        self.execution_count = 0   # black-box calls
        self.last_inference = 0    # ms since the epoch
        for phase in self.PHASES:
            setattr(self, phase, _Duration())

    def as_dict(self, name: str, version: str) -> dict:
        return {"name": name, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {p: getattr(self, p).as_dict() for p in self.PHASES}}


class Telemetry:
    """A server's counts, model statistics, Prometheus metrics and drain state.

    Args:
        models: the served model names.
        prometheus: also keep Prometheus metrics (needs ``prometheus_client``).
        version: the models' version string for the statistics answers.
        load: an object whose ``in_flight`` and ``queued`` attributes say how many black-box
            calls run and wait for a slot now (the model host's call queue), for the gauges.
    """

    def __init__(self, models, *, prometheus: bool, version: str = "1", load=None):
        self.version = version
        self._load = load
        self._lock = threading.Condition()
        self._counts = {name: _ModelCounts() for name in models}
        self._inflight = 0
        self._draining = False
        self.registry = None
        if prometheus:
            self._init_prometheus(list(models))

    # -- Prometheus --------------------------------------------------------------------------
    def _init_prometheus(self, models: list[str]) -> None:
        prom = require_metrics_extra()
        self.registry = reg = prom.CollectorRegistry(auto_describe=True)
        self._children: dict = {}
        self._requests = prom.Counter("deepzero_oracle_requests", "Inference requests by model, protocol "
                                      "and status code name", ("model", "protocol", "status"), registry=reg)
        self._rows = prom.Counter("deepzero_oracle_rows", "Rows answered by successful inference "
                                  "requests", ("model", "protocol"), registry=reg)
        self._latency = prom.Histogram("deepzero_oracle_request_duration_seconds", "Inference request "
                                       "latency, any outcome", ("model", "protocol"),
                                       buckets=LATENCY_BUCKETS, registry=reg)
        self._queue_hist = prom.Histogram("deepzero_oracle_queue_duration_seconds", "Wait for a "
                                          "black-box slot", ("model",), buckets=LATENCY_BUCKETS, registry=reg)
        self._compute_hist = prom.Histogram("deepzero_oracle_blackbox_duration_seconds", "One black-box "
                                            "call", ("model",), buckets=LATENCY_BUCKETS, registry=reg)
        inflight = prom.Gauge("deepzero_oracle_inflight_requests", "Inference requests being handled",
                              ("protocol",), registry=reg)
        self._inflight_by = {p: 0 for p in PROTOCOLS}
        for p in PROTOCOLS:
            inflight.labels(p).set_function(lambda p=p: self._inflight_by[p])
        if self._load is not None:
            prom.Gauge("deepzero_oracle_queued_calls", "Black-box calls waiting for a slot",
                       registry=reg).set_function(lambda: self._load.queued)
            prom.Gauge("deepzero_oracle_running_calls", "Black-box calls running",
                       registry=reg).set_function(lambda: self._load.in_flight)
        for m in models:  # zero series exist from the start, so rate() sees the first request
            for p in PROTOCOLS:
                self._requests.labels(m, p, "OK")
                self._rows.labels(m, p)
                self._latency.labels(m, p)

    def _child(self, metric, *labels):
        """``metric.labels(*labels)``, cached (the lookup costs more than the update)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text format, for a GET /metrics."""
        prom = require_metrics_extra()
        if self.registry is None:
            raise RuntimeError("this server keeps no Prometheus metrics")
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    # -- requests ----------------------------------------------------------------------------
    def begin(self, protocol: str, model: str = "") -> Call:
        """Open one inference request (never raises) for ``model`` if it is served (else the
        label waits for :func:`note_model`, and stays ``""`` if nothing resolves).
        ``call.refused`` is set while draining: the handler must then answer UNAVAILABLE (and
        still :meth:`end` the call)."""
        call = Call(protocol, time.perf_counter_ns())
        if model in self._counts:  # else the model host names it once it resolves the request
            call.model = model
        with self._lock:
            if self._draining:
                call.refused = True
            else:
                self._inflight += 1
                if self.registry is not None:
                    self._inflight_by[protocol] += 1
        call.token = _current.set(call)
        return call

    def end(self, call: Call, status: str) -> None:
        """Close ``call`` with the gRPC status code name of its answer."""
        now = time.perf_counter_ns()
        if call.token is not None:
            try:
                _current.reset(call.token)
            except ValueError:  # ended from another context: nothing to restore there
                pass
            call.token = None
        total = now - call.start_ns
        ok = status == "OK"
        counts = self._counts.get(call.model)
        with self._lock:
            if not call.refused:
                self._inflight -= 1
                if self.registry is not None:
                    self._inflight_by[call.protocol] -= 1
                if self._inflight == 0:
                    self._lock.notify_all()
            if counts is not None:
                (counts.success if ok else counts.fail).add(total)
                if ok:
                    counts.inference_count += call.rows
                    counts.last_inference = time.time_ns() // 1_000_000
                    if call.executions:
                        counts.queue.add(call.queue_ns)
                        counts.compute_infer.add(call.infer_ns)
                        if call.first_queue_ns is not None:
                            counts.compute_input.add(call.first_queue_ns - call.start_ns)
                        if call.last_infer_end_ns is not None:
                            counts.compute_output.add(now - call.last_infer_end_ns)
        if self.registry is not None:
            self._child(self._requests, call.model, call.protocol, status).inc()
            self._child(self._latency, call.model, call.protocol).observe(total / 1e9)
            if ok and call.rows:
                self._child(self._rows, call.model, call.protocol).inc(call.rows)

    @contextlib.contextmanager
    def waiting(self):
        """Around the wait for a black-box slot: times it."""
        t0 = time.perf_counter_ns()
        call = _current.get()
        if call is not None and call.first_queue_ns is None:
            call.first_queue_ns = t0
        try:
            yield
        finally:
            waited = time.perf_counter_ns() - t0
            if call is not None:
                call.queue_ns += waited
            if self.registry is not None and call is not None and call.model:
                self._child(self._queue_hist, call.model).observe(waited / 1e9)

    @contextlib.contextmanager
    def executing(self, model: str):
        """Around one black-box call of ``model``: counts and times it."""
        t0 = time.perf_counter_ns()
        try:
            yield
        finally:
            t1 = time.perf_counter_ns()
            counts = self._counts.get(model)
            with self._lock:
                if counts is not None:
                    counts.execution_count += 1
            call = _current.get()
            if call is not None:
                call.infer_ns += t1 - t0
                call.executions += 1
                call.last_infer_end_ns = t1
            if self.registry is not None and counts is not None:
                self._child(self._compute_hist, model).observe((t1 - t0) / 1e9)

    # -- drain -------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        """True once :meth:`start_drain` ran: new requests are refused."""
        return self._draining

    @property
    def inflight(self) -> int:
        """Inference requests admitted and not yet answered."""
        return self._inflight

    def start_drain(self) -> None:
        """Refuse new inference requests from now on (UNAVAILABLE / 503)."""
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until no admitted request is running (at most ``timeout`` s, or until ``stop``
        is set); True if none is."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._lock.wait(min(left, 0.1))
            return True

    # -- KServe v2 statistics ----------------------------------------------------------------
    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """Triton's ``model_stats`` entries: every model (``name`` empty) or the one named.

        Raises:
            KeyError: ``name`` (or ``version``) is not served.
        """
        if name and name not in self._counts:
            raise KeyError(name)
        if version not in ("", self.version):
            raise KeyError(version)
        names = [name] if name else list(self._counts)
        with self._lock:
            return [self._counts[n].as_dict(n, self.version) for n in names]
