"""The gRPC endpoint of the server: protobuf messages <-> the model host.

:class:`OracleServicer` implements ``inference.GRPCInferenceService`` (KServe v2: ServerLive/
Ready, ModelReady, ModelMetadata, ModelInfer, ModelStatistics; also answered as
``deepzero_oracle.v1.GRPCInferenceService``) and ``deepzero_oracle.v1.Oracle`` (Describe,
QueryBatch, QueryStream: many queries per call, in-band per-query errors). It decodes each
request with the codec (:mod:`deepzero_oracle.wire.codec`), hands the tensors to the
:class:`~deepzero_oracle.server.host.ModelHost` (validation, inference under the concurrency
limit, telemetry) and encodes the answer; the gRPC call's context is the host's caller (its
deadline and liveness). Its methods raise :class:`~deepzero_oracle.wire.errors.WireError` with
the status to answer; :func:`generic_handlers` turns that into the status, and parses requests
from bytes itself, so a malformed protobuf gets INVALID_ARGUMENT. Starting a server is
:mod:`deepzero_oracle.server.lifecycle`'s job.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from deepzero_oracle.server.host import ModelHost, QueryPlan
from deepzero_oracle.server.metrics import DRAINING_MESSAGE, Telemetry
from deepzero_oracle.server.specs import MODEL_VERSION, ServedModel
from deepzero_oracle.wire import oracle_pb2 as pb
from deepzero_oracle.wire.codec import datatype_of, decode_raw, decode_typed, encode_raw, fill_typed, has_typed_contents
from deepzero_oracle.wire.constants import (KSERVE_SERVICE, MIRROR_SERVICE, ORACLE_SERVICE, WORKER_METADATA_KEY,
                                            status_number)
from deepzero_oracle.wire.errors import WireError

log = logging.getLogger(__name__)


class OracleServicer:
    """Implements both services over a :class:`ModelHost`; every method raises WireError,
    never aborts.

    Args:
        host: the models and the inference path (shared with the REST endpoint).
    """

    def __init__(self, host: ModelHost):
        self.host = host

    @property
    def telemetry(self) -> Telemetry:
        """The host's telemetry (the handlers count inference requests in it)."""
        return self.host.telemetry

    # -- protobuf <-> host -----------------------------------------------------------------
    def decode(self, request: pb.ModelInferRequest):
        """Request -> (model, input names, arrays in call order, used_raw)."""
        model = self.host.model(request.model_name, request.model_version)
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
        names, arrays = self.host.validate(model, names, arrays)
        return model, names, arrays, bool(raws)

    @staticmethod
    def response(model: ServedModel, pairs: list[tuple[str, np.ndarray]], raw: bool,
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

    # -- KServe v2 -----------------------------------------------------------------------
    def ServerLive(self, request, context):
        """Always live while the process answers."""
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        """Ready until ``stop()`` begins. A worker of ``serve --workers N`` also names itself in
        the trailing metadata (``WORKER_METADATA_KEY: "index/count"``)."""
        if self.host.worker is not None:
            context.set_trailing_metadata(((WORKER_METADATA_KEY, "%d/%d" % self.host.worker),))
        return pb.ServerReadyResponse(ready=self.host.ready)

    def ModelReady(self, request, context):
        """Ready if the server is and it serves that model name and version."""
        return pb.ModelReadyResponse(ready=self.host.model_ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(**self.host.server_info(),
                                         extensions=["oracle_batch", "oracle_stream", "model_statistics"])

    def ModelMetadata(self, request, context):
        """The model's tensors and cost figures (NOT_FOUND for an unknown model)."""
        return metadata_message(self.host.model(request.name, request.version).metadata())

    def ModelStatistics(self, request, context):
        """The statistics extension: per-model request counts and cumulative times (Triton's
        layout); every model for an empty name, NOT_FOUND for an unknown one."""
        return statistics_message(self.host.statistics(request.name, request.version))

    def ModelInfer(self, request, context):
        """One batch ``[N, ...]`` in, outputs ``[N, ...]`` out; NaN/Inf inputs are INVALID_ARGUMENT."""
        model, names, arrays, raw = self.decode(request)
        pairs = self.host.infer(model, names, arrays, [r.name for r in request.outputs], context)
        return self.response(model, pairs, raw, request.id)

    # -- Oracle --------------------------------------------------------------------------
    def Describe(self, request, context):
        """The model's metadata plus the server's limits and cost figures."""
        model = self.host.model(request.name, request.version)
        return pb.OracleMetadata(
            model=metadata_message(model.metadata()), cost_hint_seconds_per_row=model.cost_hint,
            measured_seconds_per_row=model.measured_seconds_per_row(),
            allow_nonfinite=model.allow_nonfinite, **self.host.limits())

    def QueryBatch(self, request, context):
        """Many queries in one message (``query_rows`` each); per-query errors in-band."""
        return self.execute_batch(self.prepare_batch(request), context)

    def prepare_batch(self, request: pb.QueryBatchRequest) -> _Prepared:
        """Decode and validate a batch: the part that does not call the black box."""
        model, names, arrays, raw = self.decode(request.request)
        return _Prepared(self.host.plan_queries(model, names, arrays, request.query_rows), raw, request.request)

    def execute_batch(self, prep: _Prepared, context) -> pb.QueryBatchResponse:
        """Run the valid queries of a prepared batch; failures become in-band errors."""
        plan, request = prep.plan, prep.request
        pairs = self.host.run_queries(plan, [r.name for r in request.outputs], context)
        if pairs is not None:
            resp = self.response(plan.model, pairs, prep.raw, request.id)
        else:
            resp = pb.ModelInferResponse(model_name=plan.model.name, model_version=MODEL_VERSION, id=request.id)
        out = pb.QueryBatchResponse(response=resp)
        if plan.errors:
            for i in sorted(plan.errors):
                code, msg = plan.errors[i]
                out.errors.add(index=i, code=status_number(code), message=msg)
            out.query_rows.extend(int(r) for i, r in enumerate(plan.rows) if i not in plan.errors)
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
                call = self.telemetry.begin("grpc", item.plan.model.name if isinstance(item, _Prepared) else "")
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

    plan: QueryPlan
    raw: bool
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


__all__ = ["OracleServicer", "generic_handlers", "metadata_message", "statistics_message"]
