"""The gRPC side of the server: KServe v2 and Oracle service methods, and their handlers.

:class:`OracleServicer` implements ``inference.GRPCInferenceService`` (KServe v2: ServerLive/
Ready, ModelReady, ModelMetadata, ModelInfer; also answered as
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
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from deepzero_oracle.blackbox.protocol import (
    KSERVE_SERVICE,
    MIRROR_SERVICE,
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
from deepzero_oracle.server.specs import MODEL_VERSION, CallError, ServedModel
from deepzero_oracle.wire import oracle_pb2 as pb

log = logging.getLogger(__name__)

# Room for the protobuf envelope around raw tensor bytes when checking answer sizes (clients
# keep 64 KiB of room on their side, so an answer as large as its request always fits).
_ENVELOPE_BYTES = 4096


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
        max_concurrency: black-box calls running at once, across all RPCs.
        worker: ``(index, count)`` when this process is one of ``count`` sharing a port
            (``serve --workers N``); ServerReady then names it, so clients can spread their
            connections over the workers.
    """

    def __init__(self, models: dict[str, ServedModel], *, max_message_bytes: int, max_concurrency: int,
                 worker: tuple[int, int] | None = None):
        self.models = models
        self.worker = worker
        self.max_message_bytes = max_message_bytes
        self.max_concurrency = max_concurrency
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.ready = True

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
        return self.select_outputs(model, outs, requested)

    def run(self, model: ServedModel, arrays, context) -> list[np.ndarray]:
        """Call the model under the concurrency limit, giving up at the client's deadline."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            raise WireError("deadline passed before the black box could run", "DEADLINE_EXCEEDED")
        if not self.slots.acquire(timeout=remaining):
            raise WireError(f"deadline passed while waiting for one of {self.max_concurrency} "
                            "black-box slot(s)", "DEADLINE_EXCEEDED")
        try:
            return model.call(arrays)
        finally:
            self.slots.release()

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
        return pb.ServerMetadataResponse(**self.server_info(), extensions=["oracle_batch", "oracle_stream"])

    def ModelMetadata(self, request, context):
        """The model's tensors and cost figures (NOT_FOUND for an unknown model)."""
        return metadata_message(self.model(request.name, request.version).metadata())

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
            rows = np.asarray(request.query_rows, dtype=np.int64)
            if (rows <= 0).any() or int(rows.sum()) != n:
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
                if isinstance(item, pb.QueryBatchResponse):
                    yield item
                    continue
                try:
                    response = self.execute_batch(item, context)
                except WireError as e:
                    if e.code == "DEADLINE_EXCEEDED":
                        raise
                    response = _whole_request_error(e.code, str(e))
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
        if method.client_streaming:
            table[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream_behavior(impl), request_deserializer=None,
                response_serializer=lambda m: m.SerializeToString())
        else:
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_behavior(impl, req_cls), request_deserializer=None,
                response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(service_name, table)


def _unary_behavior(impl, req_cls):
    def behavior(data: bytes, context):
        try:
            request = req_cls.FromString(data)
        except DecodeError as e:
            err = ("INVALID_ARGUMENT", f"request is not a valid {req_cls.DESCRIPTOR.full_name}: {e}")
        else:
            try:
                return impl(request, context)
            except WireError as e:
                err = (e.code, str(e))
            except Exception as e:  # noqa: BLE001 -- never let one request take the server down
                log.exception("unexpected error in %s", impl.__name__)
                err = ("INTERNAL", f"server error in {impl.__name__}: {type(e).__name__}: {e}")
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
