"""The gRPC side of the server: KServe v2 and Oracle service methods, and their handlers.

:class:`OracleServicer` implements ``inference.GRPCInferenceService`` (KServe v2: ServerLive/
Ready, ModelReady, ModelMetadata, ModelInfer, ModelStatistics; also answered as
``deepzero_oracle.v1.GRPCInferenceService``) and ``deepzero_oracle.v1.Oracle`` (Describe,
QueryBatch, QueryStream: many queries per call, in-band per-query errors). Its methods raise
:class:`~deepzero_oracle.blackbox.protocol.WireError` with the status to answer;
:func:`generic_handlers` turns that into the status, and parses requests from bytes itself, so
a malformed protobuf gets INVALID_ARGUMENT. The REST endpoint (:mod:`deepzero_oracle.server.rest`)
decodes its JSON or binary tensors and then takes the same path: :meth:`OracleServicer.validate`
and :meth:`OracleServicer.infer`. Starting a server is :mod:`deepzero_oracle.server.lifecycle`'s job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from deepzero_oracle.blackbox.protocol import (
    KSERVE_SERVICE,
    MIRROR_SERVICE,
    NO_DEADLINE_SECONDS,
    ORACLE_SERVICE,
    WORKER_METADATA_KEY,
    WireError,
    datatype_of,
    decode_raw,
    decode_typed,
    encode_raw,
    fill_typed,
    has_typed_contents,
    status_number,
)
from deepzero_oracle.server.metrics import DRAINING_MESSAGE, Telemetry, note_model, note_rows
from deepzero_oracle.server.specs import MODEL_VERSION, CallError, ServedModel
from deepzero_oracle.wire import oracle_pb2 as pb

log = logging.getLogger(__name__)

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


def deadline_of(context) -> float | None:
    """The ``time.monotonic()`` deadline of a gRPC call (None: REST, no deadline, or one so far
    off (over :data:`NO_DEADLINE_SECONDS`) that it means none; a client without a deadline shows
    a remaining time of ~1e19 s, which no lock or clock accepts)."""
    if context is None:
        return None
    remaining = context.time_remaining()
    if remaining is None or not remaining <= NO_DEADLINE_SECONDS:  # None, huge or NaN: none
        return None
    return time.monotonic() + max(0.0, remaining)


def _version() -> str:
    try:
        from deepzero_oracle import __version__
        return __version__
    except Exception:  # a half-written package __init__ must not stop the server
        return "unknown"


class OracleServicer:
    """Implements both services; every method raises WireError / CallError, never aborts.

    Args:
        models: the served models by wire name.
        max_message_bytes: largest answer it may send (larger ones get RESOURCE_EXHAUSTED).
        max_concurrency: black-box calls running at once, across all RPCs and REST requests.
        max_pending: black-box calls admitted at once (running + waiting for a slot); more are
            refused with RESOURCE_EXHAUSTED (HTTP 429). See :class:`CallQueue`.
        worker: ``(index, count)`` when this process is one of ``count`` sharing a port
            (``serve --workers N``); ServerReady then names it, so clients can spread their
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

    # -- helpers -------------------------------------------------------------------------
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

    def decode(self, request: pb.ModelInferRequest):
        """Request -> (model, input names, arrays in call order, used_raw)."""
        model = self.model(request.model_name, request.model_version)
        names = [t.name for t in request.inputs]
        raws = request.raw_input_contents
        if raws:
            if len(raws) != len(request.inputs):
                raise WireError(f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs; "
                                "send one entry per input, in order")
            arrays = []
            for t, raw in zip(request.inputs, raws):
                if t.HasField("contents") and has_typed_contents(t.contents):
                    raise WireError(f"input {t.name!r} has both typed contents and raw_input_contents")
                arrays.append(decode_raw(raw, t.datatype, t.shape, t.name))
        else:
            arrays = [decode_typed(t.contents, t.datatype, t.shape, t.name) for t in request.inputs]
        names, arrays = self.validate(model, names, arrays)
        return model, names, arrays, bool(raws)

    def validate(self, model: ServedModel, names: list[str], arrays: list[np.ndarray]):
        """Decoded request tensors (gRPC or REST) -> ``(names, arrays)`` in call order, checked
        against the model (count, names, rows, declared datatypes and shapes)."""
        for name in names:
            if not name:
                raise WireError("an input tensor has no name")
        return model.order_inputs(names, arrays)

    def infer(self, model: ServedModel, names: list[str], arrays: list[np.ndarray], requested=(),
              context=None) -> list[tuple[str, np.ndarray]]:
        """Validated inputs ``[N, ...]`` -> the requested outputs as ``(name, array [N, ...])``.

        The one inference path of both endpoints: NaN/Inf inputs are INVALID_ARGUMENT, the call
        runs under the concurrency limit (``context``: the gRPC deadline, None for REST), and
        answers over the message limit are RESOURCE_EXHAUSTED.
        """
        bad, where = model.nonfinite(names, arrays)
        if bad is not None:
            rows = np.flatnonzero(bad)
            raise WireError(f"input {where!r} has NaN or Inf in {len(rows)} row(s) (first: row "
                            f"{rows[0]}); the server rejects non-finite inputs")
        try:
            outs = self.run(model, arrays, context)
        except CallError as e:
            raise WireError(str(e), e.code) from e
        pairs = self.select_outputs(model, outs, requested)
        note_rows(len(arrays[0]))
        return pairs

    def run(self, model: ServedModel, arrays, context) -> list[np.ndarray]:
        """Call the model in a black-box slot (:class:`CallQueue`): wait in line for one while
        all are busy, until the client's deadline if it set one (``context``: the gRPC call;
        None for REST); refused at once when the queue is full."""
        deadline = deadline_of(context)
        if deadline is not None and deadline <= time.monotonic():
            raise WireError("deadline passed before the black box could run", "DEADLINE_EXCEEDED")
        with self.telemetry.waiting():
            self.calls.acquire(deadline, context.is_active if context is not None else None)
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

    def response(self, model: ServedModel, pairs: list[tuple[str, np.ndarray]], raw: bool,
                 request_id: str) -> pb.ModelInferResponse:
        """Output pairs -> ModelInferResponse (raw contents if the request was raw)."""
        resp = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request_id)
        for name, arr in pairs:
            t = resp.outputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
            if raw:
                resp.raw_output_contents.append(encode_raw(arr))
            else:
                fill_typed(t.contents, arr)
        return resp

    def server_info(self) -> dict:
        """``{"name", "version"}`` of this server (both endpoints add their extensions)."""
        return {"name": "deepzero-oracle", "version": _version()}

    # -- KServe v2 -----------------------------------------------------------------------
    def ServerLive(self, request, context):
        """Always live while the process answers."""
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        """Ready until ``stop()`` begins. A worker of ``serve --workers N`` also names itself in
        the trailing metadata (``WORKER_METADATA_KEY: "index/count"``)."""
        if self.worker is not None:
            context.set_trailing_metadata(((WORKER_METADATA_KEY, "%d/%d" % self.worker),))
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request, context):
        """Ready if the server is and it serves that model name and version."""
        return pb.ModelReadyResponse(ready=self.ready and request.name in self.models
                                     and request.version in ("", MODEL_VERSION))

    def ServerMetadata(self, request, context):
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(**self.server_info(),
                                         extensions=["oracle_batch", "oracle_stream", "model_statistics"])

    def ModelMetadata(self, request, context):
        """The model's tensors and cost figures (NOT_FOUND for an unknown model)."""
        return metadata_message(self.model(request.name, request.version).metadata())

    def ModelStatistics(self, request, context):
        """The statistics extension: per-model request counts and cumulative times (Triton's
        layout); every model for an empty name, NOT_FOUND for an unknown one."""
        if request.name:
            self.model(request.name, request.version)  # NOT_FOUND with the usual message
        try:
            stats = self.telemetry.statistics(request.name, request.version)
        except KeyError:
            raise WireError(f"no model has version {request.version!r}; they have [{MODEL_VERSION!r}]",
                            "NOT_FOUND") from None
        return statistics_message(stats)

    def ModelInfer(self, request, context):
        """One batch ``[N, ...]`` in, outputs ``[N, ...]`` out; NaN/Inf inputs are INVALID_ARGUMENT."""
        model, names, arrays, raw = self.decode(request)
        pairs = self.infer(model, names, arrays, [r.name for r in request.outputs], context)
        return self.response(model, pairs, raw, request.id)

    # -- Oracle --------------------------------------------------------------------------
    def Describe(self, request, context):
        """The model's metadata plus the server's limits and cost figures."""
        model = self.model(request.name, request.version)
        return pb.OracleMetadata(
            model=metadata_message(model.metadata()), cost_hint_seconds_per_row=model.cost_hint,
            measured_seconds_per_row=model.measured_seconds_per_row(),
            max_message_bytes=self.max_message_bytes, max_concurrency=self.max_concurrency,
            allow_nonfinite=model.allow_nonfinite, server_version=_version())

    def QueryBatch(self, request, context):
        """Many queries in one message (``query_rows`` each); per-query errors in-band."""
        return self.execute_batch(self.prepare_batch(request), context)

    def prepare_batch(self, request: pb.QueryBatchRequest) -> "_Prepared":
        """Decode and validate a batch: the part that does not call the black box."""
        model, names, arrays, raw = self.decode(request.request)
        n = arrays[0].shape[0]
        if request.query_rows:
            # Each entry in 1..n first, so the sum cannot wrap around int64 into looking right.
            if len(request.query_rows) > n or any(not 0 < r <= n for r in request.query_rows):
                raise WireError(f"query_rows must be positive, each at most the batch size {n}, and sum "
                                f"to it; got {len(request.query_rows)} entries, not all in 1..{n}")
            rows = np.asarray(request.query_rows, dtype=np.int64)
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
        return _Prepared(model, arrays, raw, rows, starts, errors, request.request)

    def execute_batch(self, prep: "_Prepared", context) -> pb.QueryBatchResponse:
        """Run the valid queries of a prepared batch; failures become in-band errors."""
        model, arrays, rows, starts, errors = prep.model, prep.arrays, prep.rows, prep.starts, prep.errors
        nq = len(rows)
        good = np.array([i not in errors for i in range(nq)]) if errors else np.ones(nq, bool)
        stacked, outs_per_query = None, None
        if good.any():
            sel = arrays if good.all() else [a[np.repeat(good, rows)] for a in arrays]
            try:
                stacked = self.run(model, sel, context)
            except CallError as e:
                if good.sum() == 1:
                    errors[int(np.flatnonzero(good)[0])] = (e.code, str(e))
                else:
                    # One query may be what the black box chokes on: answer the others.
                    outs_per_query = []
                    for i in np.flatnonzero(good):
                        part = [a[starts[i]:starts[i] + rows[i]] for a in arrays]
                        try:
                            outs_per_query.append(self.run(model, part, context))
                        except CallError as ei:
                            errors[int(i)] = (ei.code, f"query {i}: {ei}")
        if outs_per_query:
            try:
                stacked = [np.concatenate(parts) for parts in zip(*outs_per_query)]
            except ValueError as e:
                raise WireError(f"black box {model.name!r} answered queries with inconsistent "
                                f"shapes: {e}", "INTERNAL") from e
        request = prep.request
        if stacked is not None:
            pairs = self.select_outputs(model, stacked, [r.name for r in request.outputs])
            resp = self.response(model, pairs, prep.raw, request.id)
        else:
            resp = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        out = pb.QueryBatchResponse(response=resp)
        if errors:
            for i in sorted(errors):
                code, msg = errors[i]
                out.errors.add(index=i, code=status_number(code), message=msg)
            out.query_rows.extend(int(r) for i, r in enumerate(rows) if i not in errors)
        note_rows(int(rows.sum()) - sum(int(rows[i]) for i in errors))
        return out

    def QueryStream(self, request_iterator, context):
        """A stream of QueryBatchRequests (as bytes), each answered like QueryBatch."""
        # Answered in order. A reader thread parses and validates message k+1 while the black
        # box runs on message k, so transport and compute overlap. A bad message is answered
        # in-band (index -1): one malformed query does not tear down a high-rate stream.
        items: queue.Queue = queue.Queue(maxsize=_STREAM_WINDOW)
        done = threading.Event()

        def put(item) -> bool:
            while not done.is_set() and context.is_active():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader():
            try:
                for data in request_iterator:
                    try:
                        item = self.prepare_batch(pb.QueryBatchRequest.FromString(data))
                    except DecodeError as e:
                        item = _whole_request_error("INVALID_ARGUMENT", f"not a valid QueryBatchRequest: {e}")
                    except WireError as e:
                        item = _whole_request_error(e.code, str(e))
                    except Exception as e:  # noqa: BLE001 -- reported in-band, the stream goes on
                        log.exception("unexpected error preparing a stream message")
                        item = _whole_request_error("INTERNAL", f"server error: {type(e).__name__}: {e}")
                    if not put(item):
                        return
            except Exception:  # noqa: BLE001 -- the client cancelled or the connection broke
                pass
            put(_END_OF_STREAM)

        threading.Thread(target=reader, name="oracle-stream-reader", daemon=True).start()
        try:
            while True:
                try:
                    item = items.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if item is _END_OF_STREAM:
                    return
                # Each message is one request for the statistics and metrics.
                call = self.telemetry.begin("grpc", item.model.name if isinstance(item, _Prepared) else "")
                code = "INTERNAL"
                try:
                    if call.refused:
                        response = _whole_request_error("UNAVAILABLE", DRAINING_MESSAGE)
                    elif isinstance(item, pb.QueryBatchResponse):
                        response = item
                    else:
                        try:
                            response = self.execute_batch(item, context)
                        except WireError as e:
                            if e.code == "DEADLINE_EXCEEDED":
                                code = e.code
                                raise
                            response = _whole_request_error(e.code, str(e))
                    code = _whole_request_status(response)
                finally:
                    self.telemetry.end(call, code)
                yield response
        finally:
            done.set()


@dataclass
class _Prepared:
    """A decoded, validated QueryBatchRequest waiting for the black box."""

    model: ServedModel
    arrays: list
    raw: bool
    rows: np.ndarray
    starts: np.ndarray
    errors: dict
    request: pb.ModelInferRequest


_END_OF_STREAM = object()
# Messages of one stream decoded ahead of the black box (bounds memory per stream).
_STREAM_WINDOW = 8


def metadata_message(md: dict) -> pb.ModelMetadataResponse:
    """A model's metadata dict (``ServedModel.metadata()``) as a ModelMetadataResponse."""
    def tensors(ts):
        return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"],
                                                        shape=t["shape"]) for t in ts]

    message = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"],
                                       inputs=tensors(md["inputs"]), outputs=tensors(md["outputs"]))
    for key, value in md.get("parameters", {}).items():
        if isinstance(value, bool):
            message.parameters[key].bool_param = value
        else:
            message.parameters[key].double_param = float(value)
    return message


def _whole_request_error(code: str, message: str) -> pb.QueryBatchResponse:
    return pb.QueryBatchResponse(errors=[pb.QueryError(index=-1, code=status_number(code), message=message)])


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _whole_request_status(response: pb.QueryBatchResponse) -> str:
    """The status name of a stream answer: its whole-request error's, else OK."""
    for error in response.errors:
        if error.index == -1:
            return _CODE_NAMES.get(error.code, "UNKNOWN")
    return "OK"


def statistics_message(stats: list[dict]) -> pb.ModelStatisticsResponse:
    """:meth:`Telemetry.statistics` entries as a ModelStatisticsResponse (Triton's layout)."""
    response = pb.ModelStatisticsResponse()
    for entry in stats:
        phases = {k: pb.StatisticDuration(**v) for k, v in entry["inference_stats"].items()}
        response.model_stats.add(name=entry["name"], version=entry["version"],
                                 last_inference=entry["last_inference"],
                                 inference_count=entry["inference_count"],
                                 execution_count=entry["execution_count"],
                                 inference_stats=pb.InferStatistics(**phases))
    return response


def generic_handlers(servicer: OracleServicer) -> tuple[grpc.GenericRpcHandler, ...]:
    """Handlers of every service ``servicer`` answers: the KServe v2 service under its standard
    name and under our mirror's name, and the Oracle service (for ``add_generic_rpc_handlers``)."""
    services = pb.DESCRIPTOR.services_by_name
    return (
        _handlers(servicer, MIRROR_SERVICE, services["GRPCInferenceService"]),
        _handlers(servicer, KSERVE_SERVICE, services["GRPCInferenceService"]),
        _handlers(servicer, ORACLE_SERVICE, services["Oracle"]),
    )


def _handlers(servicer: OracleServicer, service_name: str, descriptor) -> grpc.GenericRpcHandler:
    """Method handlers for one service. Requests arrive as bytes and are parsed here, so a
    malformed protobuf gets INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL)."""
    table = {}
    for method in descriptor.methods:
        req_cls = getattr(pb, method.input_type.name)
        impl = getattr(servicer, method.name)
        telemetry = servicer.telemetry if method.name in _COUNTED else None
        if method.client_streaming:
            table[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream_behavior(impl), request_deserializer=None,
                response_serializer=lambda m: m.SerializeToString())
        else:
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_behavior(impl, req_cls, telemetry), request_deserializer=None,
                response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(service_name, table)


# Unary methods counted as inference requests (statistics, metrics, drain); QueryStream counts
# each of its messages itself.
_COUNTED = frozenset({"ModelInfer", "QueryBatch"})


def _unary_behavior(impl, req_cls, telemetry: Telemetry | None = None):
    def behavior(data: bytes, context):
        call = telemetry.begin("grpc") if telemetry is not None else None
        err = ("INTERNAL", "")
        try:
            if call is not None and call.refused:
                raise WireError(DRAINING_MESSAGE, "UNAVAILABLE")
            try:
                request = req_cls.FromString(data)
            except DecodeError as e:
                raise WireError(f"request is not a valid {req_cls.DESCRIPTOR.full_name}: {e}") from None
            answer = impl(request, context)
            err = None
            return answer
        except WireError as e:
            err = (e.code, str(e))
        except Exception as e:  # noqa: BLE001 -- never let one request take the server down
            log.exception("unexpected error in %s", impl.__name__)
            err = ("INTERNAL", f"server error in {impl.__name__}: {type(e).__name__}: {e}")
        finally:
            if call is not None:
                telemetry.end(call, "OK" if err is None else err[0])
        context.abort(grpc.StatusCode[err[0]], err[1])
    return behavior


def _stream_behavior(impl):
    def behavior(request_iterator, context):
        try:
            yield from impl(request_iterator, context)
        except WireError as e:
            err = (e.code, str(e))
        except Exception as e:  # noqa: BLE001
            if isinstance(e, grpc.RpcError) or not context.is_active():
                return  # the client went away
            log.exception("unexpected error in %s", impl.__name__)
            err = ("INTERNAL", f"server error in {impl.__name__}: {type(e).__name__}: {e}")
        else:
            return
        context.abort(grpc.StatusCode[err[0]], err[1])
    return behavior
