"""Serve any black box over gRPC (KServe v2 layout, plus batched and streamed oracle queries).

    deepzero-oracle serve MODULE:CALLABLE --port 50051
    python -m deepzero_oracle.serve MODULE:CALLABLE --port 50051      (same, without the CLI)

or, in Python::

    with serve_blackbox(fn, port=0) as server:       # fn(x [N, ...]) -> y [N, ...]
        box = GrpcBlackBox(server.address)
        y = box(x)

The callable follows the black-box contract: ``f(*inputs) -> outputs``, each input an array
``[N, ...]`` (a torch.Tensor, or a numpy.ndarray with ``numpy=True``), returning one array
``[N, ...]`` or a tuple of them. The server answers

* ``inference.GRPCInferenceService`` (KServe v2: ServerLive/Ready, ModelReady, ModelMetadata,
  ModelInfer), under the standard name and under ``deepzero_oracle.v1.GRPCInferenceService``;
* ``deepzero_oracle.v1.Oracle`` (Describe, QueryBatch, QueryStream): many queries per call,
  in-band per-query errors;
* ``grpc.health.v1.Health`` and server reflection.

Bad requests get precise statuses and never take the server down: INVALID_ARGUMENT for a
malformed protobuf, datatype, shape, byte count or NaN/Inf input; RESOURCE_EXHAUSTED for
messages over the size limit (on both ends) or when the server is full; UNAUTHENTICATED for a
missing or wrong token; NOT_FOUND for an unknown model. Nothing from the wire is unpickled.
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import inspect
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepzero_oracle.blackbox._codec import (
    DATATYPES,
    WireError,
    datatype_of,
    decode_raw,
    decode_typed,
    encode_raw,
    fill_typed,
    has_typed_contents,
    nonfinite_rows,
    to_numpy,
)
from deepzero_oracle.wire import oracle_pb2 as pb

log = logging.getLogger("deepzero_oracle.serve")

TOKEN_ENV = "DEEPZERO_ORACLE_TOKEN"
KSERVE_SERVICE = "inference.GRPCInferenceService"
MIRROR_SERVICE = "deepzero_oracle.v1.GRPCInferenceService"
ORACLE_SERVICE = "deepzero_oracle.v1.Oracle"
DEFAULT_PORT = 50051
MODEL_VERSION = "1"
# Room for the protobuf envelope around raw tensor bytes when checking answer sizes (clients
# keep 64 KiB of room on their side, so an answer as large as its request always fits).
_ENVELOPE_BYTES = 4096


def _version() -> str:
    try:
        from deepzero_oracle import __version__
        return __version__
    except Exception:  # a half-written package __init__ must not stop the server
        return "unknown"


def _code_number(name: str) -> int:
    return grpc.StatusCode[name].value[0]


@dataclass(frozen=True)
class TensorSpec:
    """What a model declares about one input or output tensor.

    Args:
        name: tensor name on the wire.
        datatype: KServe datatype (``"FP32"``); None accepts any numeric datatype.
        shape: full shape including the batch dimension, -1 for any size (``(-1, 64)``);
            None leaves the shape undeclared.
    """

    name: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        """Parse ``NAME[:DATATYPE[:D0,D1,...]]``, e.g. ``x:FP32:-1,64``."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"tensor spec {text!r}: expected NAME[:DATATYPE[:D0,D1,...]]")
        datatype = parts[1].upper() if len(parts) > 1 and parts[1] else None
        if datatype is not None and datatype not in DATATYPES:
            raise ValueError(f"tensor spec {text!r}: unknown datatype; use one of {', '.join(DATATYPES)}")
        shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 and parts[2] else None
        return cls(parts[0], datatype, shape)

    @classmethod
    def coerce(cls, value) -> "TensorSpec":
        """A TensorSpec from a spec, a ``"NAME:DT:SHAPE"`` string or a ``(name, dt, shape)`` tuple."""
        if isinstance(value, TensorSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        items = tuple(value)
        if not 1 <= len(items) <= 3:
            raise ValueError(f"tensor spec {value!r}: expected (name, datatype, shape)")
        datatype = items[1] if len(items) > 1 else None
        shape = items[2] if len(items) > 2 else None
        return cls(items[0], datatype, tuple(shape) if shape is not None else None)


class _CallError(Exception):
    """The black box itself failed on a batch (not the request)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServedModel:
    """One callable behind the server, with its declared tensors and running cost figures.

    Args:
        name: model name on the wire.
        fn: ``fn(*inputs [N, ...]) -> [N, ...]`` or a tuple of such arrays.
        inputs / outputs: TensorSpec-likes; inputs default to ``fn``'s positional parameters.
        numpy: pass ``numpy.ndarray`` inputs instead of ``torch.Tensor``.
        allow_nonfinite: accept NaN/Inf inputs instead of answering INVALID_ARGUMENT.
        cost_hint: declared seconds per row, reported in the metadata.
    """

    def __init__(self, name: str, fn: Callable, *, inputs=None, outputs=None, numpy: bool = False,
                 allow_nonfinite: bool = False, cost_hint: float | None = None):
        if not callable(fn):
            raise TypeError(f"model {name!r}: expected a callable, got {type(fn).__name__}")
        self.name, self.fn, self.numpy = name, fn, numpy
        self.allow_nonfinite = allow_nonfinite
        self.cost_hint = float(cost_hint or 0.0)
        if inputs is not None:
            self.inputs = [TensorSpec.coerce(s) for s in inputs]
            self.arity: int | None = len(self.inputs)
        else:
            names, self.arity = _positional_names(fn)
            self.inputs = [TensorSpec(n) for n in names]
        self.outputs = [TensorSpec.coerce(s) for s in outputs] if outputs is not None else None
        self._observed_outputs: list[TensorSpec] | None = None
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.rows = 0

    # -- metadata ------------------------------------------------------------------------
    def output_specs(self) -> list[TensorSpec]:
        """Declared outputs, else those seen on the last successful call, else none."""
        return self.outputs or self._observed_outputs or []

    def measured_seconds_per_row(self) -> float:
        """Mean seconds per row of the successful calls so far (0 before the first)."""
        with self._lock:
            return self.seconds / self.rows if self.rows else 0.0

    def metadata(self) -> pb.ModelMetadataResponse:
        """KServe ModelMetadataResponse: names, datatypes, shapes, platform, cost hint."""
        def tensor(spec: TensorSpec):
            return pb.ModelMetadataResponse.TensorMetadata(
                name=spec.name, datatype=spec.datatype or "",
                shape=list(spec.shape) if spec.shape is not None else [])
        md = pb.ModelMetadataResponse(
            name=self.name, versions=[MODEL_VERSION], platform="deepzero-oracle",
            inputs=[tensor(s) for s in self.inputs], outputs=[tensor(s) for s in self.output_specs()])
        md.parameters["cost_hint_seconds_per_row"].double_param = self.cost_hint
        md.parameters["measured_seconds_per_row"].double_param = self.measured_seconds_per_row()
        md.parameters["allow_nonfinite"].bool_param = self.allow_nonfinite
        return md

    # -- requests ------------------------------------------------------------------------
    def order_inputs(self, names: list[str], arrays: list[np.ndarray]):
        """Match request tensors to the callable's arguments and check declared specs.

        By name when every request name is a declared input name, else by position.
        Returns ``(names, arrays)`` in call order.
        """
        if self.arity is not None and len(arrays) != self.arity:
            expected = [s.name for s in self.inputs]
            raise WireError(f"model {self.name!r} takes {self.arity} input tensor(s) {expected}, "
                            f"got {len(arrays)} {names}")
        if not arrays:
            raise WireError(f"model {self.name!r}: the request has no input tensors")
        declared = [s.name for s in self.inputs]
        if self.arity is not None and sorted(names) == sorted(declared) and len(set(names)) == len(names):
            arrays = [arrays[names.index(n)] for n in declared]
            names = declared
        rows = arrays[0].shape[0]
        for name, arr in zip(names, arrays):
            if arr.shape[0] != rows:
                raise WireError(f"input {name!r} has {arr.shape[0]} rows but input {names[0]!r} "
                                f"has {rows}; all inputs need the same batch size")
        if rows == 0:
            raise WireError("the request has 0 rows; send at least one row")
        if self.arity is not None:
            for spec, arr in zip(self.inputs, arrays):
                self._check_spec(spec, arr)
        return names, arrays

    def _check_spec(self, spec: TensorSpec, arr: np.ndarray) -> None:
        if spec.datatype is not None and datatype_of(arr) != spec.datatype:
            raise WireError(f"input {spec.name!r} is {datatype_of(arr)} but model {self.name!r} "
                            f"expects {spec.datatype}")
        if spec.shape is not None:
            ok = len(spec.shape) == arr.ndim and all(d in (-1, a) for d, a in zip(spec.shape, arr.shape))
            if not ok:
                raise WireError(f"input {spec.name!r} has shape {list(arr.shape)} but model "
                                f"{self.name!r} expects {list(spec.shape)} (-1: any)")

    def nonfinite(self, names: list[str], arrays: list[np.ndarray]) -> tuple[np.ndarray | None, str]:
        """Mask ``[N]`` of rows with NaN/Inf in any float input (None if all finite or allowed)."""
        if self.allow_nonfinite:
            return None, ""
        mask, where = None, ""
        for name, arr in zip(names, arrays):
            bad = nonfinite_rows(arr)
            if bad is not None and bad.any():
                where = where or name
                mask = bad if mask is None else mask | bad
        return mask, where

    def call(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the callable on ``arrays`` (each ``[N, ...]``); return its outputs ``[N, ...]``.

        Raises:
            _CallError: the callable raised, or answered with the wrong number of rows.
        """
        rows = arrays[0].shape[0]
        # Hand the callable writable copies: it may modify its inputs, and the decoded
        # arrays are read-only views of the request bytes.
        args = [a if a.flags.writeable else a.copy() for a in arrays]
        if not self.numpy:
            args = [torch.from_numpy(a) for a in args]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                answer = self.fn(*args)
        except ValueError as e:
            raise _CallError("INVALID_ARGUMENT", f"black box {self.name!r} rejected the input: "
                             f"{type(e).__name__}: {e}") from e
        except Exception as e:  # the callable's own bug: report, keep serving
            log.exception("black box %r raised", self.name)
            raise _CallError("INTERNAL", f"black box {self.name!r} raised {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - start
        answers = answer if isinstance(answer, tuple) else (answer,)
        outs = []
        for i, a in enumerate(answers):
            try:
                arr = to_numpy(a, what=f"output {i}")
                datatype_of(arr)
            except (WireError, TypeError, ValueError) as e:
                raise _CallError("INTERNAL", f"black box {self.name!r} output {i}: {e}") from e
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise _CallError("INTERNAL", f"black box {self.name!r} returned shape {list(arr.shape)} "
                                 f"for {rows} input rows; it must return one row per input row")
            outs.append(arr)
        with self._lock:
            self.seconds += elapsed
            self.rows += rows
        if self.outputs is None and self._observed_outputs is None:
            self._observed_outputs = [TensorSpec(f"output_{i}", datatype_of(o), (-1,) + o.shape[1:])
                                      for i, o in enumerate(outs)]
        return outs

    def output_names(self, count: int) -> list[str]:
        """Wire names of ``count`` outputs: the declared ones, else ``output_0``, ``output_1``..."""
        if self.outputs is not None and len(self.outputs) == count:
            return [s.name for s in self.outputs]
        return [f"output_{i}" for i in range(count)]


def _positional_names(fn: Callable) -> tuple[list[str], int | None]:
    """Names and count of ``fn``'s required positional parameters (None count: any)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ["input_0"], None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return ["input_0"], None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty]
    if not names:
        return ["input_0"], None
    return names, len(names)


class _Servicer:
    """Implements both services; every method raises WireError / _CallError, never aborts."""

    def __init__(self, models: dict[str, ServedModel], *, max_message_bytes: int, max_concurrency: int):
        self.models = models
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
        for name in names:
            if not name:
                raise WireError("an input tensor has no name")
        names, arrays = model.order_inputs(names, arrays)
        return model, names, arrays, bool(raws)

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

    def response(self, model: ServedModel, outs: list[np.ndarray], raw: bool, request_id: str,
                 requested=()) -> pb.ModelInferResponse:
        """Outputs ``[N, ...]`` -> ModelInferResponse (raw if the request was raw), size-checked."""
        names = model.output_names(len(outs))
        if requested:
            wanted = [r.name for r in requested]
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise WireError(f"unknown output(s) {unknown}; model {model.name!r} has {names}")
            pairs = [(n, outs[names.index(n)]) for n in wanted]
        else:
            pairs = list(zip(names, outs))
        size = sum(o.nbytes for _, o in pairs)
        if size + _ENVELOPE_BYTES > self.max_message_bytes:
            raise WireError(f"the answer has {size / 2**20:.1f} MiB, over the server's "
                            f"{self.max_message_bytes / 2**20:.0f} MiB message limit; send fewer "
                            "rows per call or raise --max-message-mb", "RESOURCE_EXHAUSTED")
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
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and request.name in self.models
                                     and request.version in ("", MODEL_VERSION))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="deepzero-oracle", version=_version(),
                                         extensions=["oracle_batch", "oracle_stream"])

    def ModelMetadata(self, request, context):
        return self.model(request.name, request.version).metadata()

    def ModelInfer(self, request, context):
        model, names, arrays, raw = self.decode(request)
        bad, where = model.nonfinite(names, arrays)
        if bad is not None:
            rows = np.flatnonzero(bad)
            raise WireError(f"input {where!r} has NaN or Inf in {len(rows)} row(s) (first: row "
                            f"{rows[0]}); the server rejects non-finite inputs")
        try:
            outs = self.run(model, arrays, context)
        except _CallError as e:
            raise WireError(str(e), e.code) from e
        return self.response(model, outs, raw, request.id, request.outputs)

    # -- Oracle --------------------------------------------------------------------------
    def Describe(self, request, context):
        model = self.model(request.name, request.version)
        return pb.OracleMetadata(
            model=model.metadata(), cost_hint_seconds_per_row=model.cost_hint,
            measured_seconds_per_row=model.measured_seconds_per_row(),
            max_message_bytes=self.max_message_bytes, max_concurrency=self.max_concurrency,
            allow_nonfinite=model.allow_nonfinite, server_version=_version())

    def QueryBatch(self, request, context):
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
            except _CallError as e:
                if good.sum() == 1:
                    errors[int(np.flatnonzero(good)[0])] = (e.code, str(e))
                else:
                    # One query may be what the black box chokes on: answer the others.
                    outs_per_query = []
                    for i in np.flatnonzero(good):
                        part = [a[starts[i]:starts[i] + rows[i]] for a in arrays]
                        try:
                            outs_per_query.append(self.run(model, part, context))
                        except _CallError as ei:
                            errors[int(i)] = (ei.code, f"query {i}: {ei}")
        if outs_per_query:
            try:
                stacked = [np.concatenate(parts) for parts in zip(*outs_per_query)]
            except ValueError as e:
                raise WireError(f"black box {model.name!r} answered queries with inconsistent "
                                f"shapes: {e}", "INTERNAL") from e
        request = prep.request
        if stacked is not None:
            resp = self.response(model, stacked, prep.raw, request.id, request.outputs)
        else:
            resp = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        out = pb.QueryBatchResponse(response=resp)
        if errors:
            for i in sorted(errors):
                code, msg = errors[i]
                out.errors.add(index=i, code=_code_number(code), message=msg)
            out.query_rows.extend(int(r) for i, r in enumerate(rows) if i not in errors)
        return out

    def QueryStream(self, request_iterator, context):
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


def _whole_request_error(code: str, message: str) -> pb.QueryBatchResponse:
    return pb.QueryBatchResponse(errors=[pb.QueryError(index=-1, code=_code_number(code), message=message)])


def _handlers(servicer: _Servicer, service_name: str, descriptor) -> grpc.GenericRpcHandler:
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


class _TokenInterceptor(grpc.ServerInterceptor):
    """Shared-token auth: ``authorization: Bearer <token>`` metadata on every call except
    health checks (load balancers probe without credentials)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = ""
        for item in details.invocation_metadata or ():
            if item.key == "authorization":
                got = item.value if isinstance(item.value, str) else item.value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        message = ("missing token: send metadata 'authorization: Bearer <token>'" if not got
                   else "wrong token")

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Same RPC kind as the real handler; requests are not even parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class OracleServer:
    """A running server. ``port``/``address`` say where; ``stop()`` ends it gracefully.

    Use as a context manager to stop it on exit.
    """

    def __init__(self, server: grpc.Server, servicer: _Servicer, health_servicer, host: str, port: int,
                 tls: bool):
        self._server, self._servicer, self._health = server, servicer, health_servicer
        self.host, self.port, self.tls = host, port, tls
        self._stopped = False

    @property
    def address(self) -> str:
        """``host:port`` for clients (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def models(self) -> dict[str, ServedModel]:
        """The served models by name."""
        return self._servicer.models

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for ``grace`` s."""
        if self._stopped:
            return
        self._stopped = True
        self._servicer.ready = False
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` s); True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> "OracleServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_blackbox(fn: Callable | Mapping[str, Callable], *, host: str = "127.0.0.1", port: int = 0,
                   model_name: str | None = None, inputs=None, outputs=None, numpy: bool = False,
                   token: str | None = None, tls_cert: str | bytes | None = None,
                   tls_key: str | bytes | None = None, max_message_mb: float = 64,
                   max_concurrency: int = 1, max_pending: int = 64, allow_nonfinite: bool = False,
                   cost_hint: float | None = None) -> OracleServer:
    """Start a gRPC server for a black box; returns once it listens.

    Args:
        fn: ``fn(*inputs [N, ...]) -> [N, ...]`` (or a tuple of arrays), or a dict
            ``{model_name: fn}`` to serve several models.
        host: interface to bind; 127.0.0.1 unless you mean to expose it.
        port: TCP port; 0 picks a free one (read it from ``.port``).
        model_name: name on the wire (default: the function's name, else "model").
        inputs / outputs: tensor specs (``TensorSpec``, ``"x:FP32:-1,64"`` or tuples) used for
            metadata and request checks; inputs default to ``fn``'s parameter names.
        numpy: give ``fn`` numpy arrays instead of torch tensors.
        token: shared secret; clients must send ``authorization: Bearer <token>``.
        tls_cert / tls_key: PEM paths or bytes; both or neither.
        max_message_mb: largest message received or sent, both directions.
        max_concurrency: black-box calls running at once (1: the callable need not be thread-safe).
        max_pending: RPCs admitted at once (running or waiting); more get RESOURCE_EXHAUSTED.
        allow_nonfinite: accept NaN/Inf inputs (default: INVALID_ARGUMENT).
        cost_hint: seconds per row, reported in the metadata for schedulers.
    Returns:
        An :class:`OracleServer` (context manager) with ``.port``, ``.address``, ``.stop()``.
    """
    if isinstance(fn, Mapping):
        items = dict(fn)
    else:
        items = {model_name or _default_name(fn): fn}
    if not items:
        raise ValueError("serve_blackbox needs at least one callable")
    models = {name: ServedModel(name, f, inputs=inputs, outputs=outputs, numpy=numpy,
                                allow_nonfinite=allow_nonfinite, cost_hint=cost_hint)
              for name, f in items.items()}
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    if max_concurrency < 1 or max_pending < 1:
        raise ValueError("max_concurrency and max_pending must be >= 1")
    max_bytes = int(max_message_mb * 2**20)
    servicer = _Servicer(models, max_message_bytes=max_bytes, max_concurrency=max_concurrency)
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # Fail loudly if the port is taken instead of sharing it with another process.
        ("grpc.so_reuseport", 0),
    ]
    interceptors = [_TokenInterceptor(token)] if token else []
    # One thread per admitted RPC, so a long stream never starves health checks.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_pending + 2,
                                                    thread_name_prefix="oracle-rpc"),
                         options=options, interceptors=interceptors,
                         maximum_concurrent_rpcs=max_pending)
    services = pb.DESCRIPTOR.services_by_name
    server.add_generic_rpc_handlers((
        _handlers(servicer, MIRROR_SERVICE, services["GRPCInferenceService"]),
        _handlers(servicer, KSERVE_SERVICE, services["GRPCInferenceService"]),
        _handlers(servicer, ORACLE_SERVICE, services["Oracle"]),
    ))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", MIRROR_SERVICE, KSERVE_SERVICE, ORACLE_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (MIRROR_SERVICE, ORACLE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(_read_pem(tls_key), _read_pem(tls_cert))])
        bound = server.add_secure_port(bind, creds)
    else:
        bound = server.add_insecure_port(bind)
    if not bound:
        raise OSError(f"could not bind {bind} (port in use?)")
    server.start()
    return OracleServer(server, servicer, health_servicer, host, bound, tls=tls_cert is not None)


def _read_pem(value: str | bytes | os.PathLike) -> bytes:
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _default_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name if re.fullmatch(r"[A-Za-z0-9_.\-]+", name) else "model"


def load_callable(spec: str) -> Callable | Mapping[str, Callable]:
    """Import ``MODULE:ATTR[.ATTR...]`` (the current directory is importable) and return it.

    The attribute may also be a dict ``{model_name: callable}``: then every entry is served.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:CALLABLE, e.g. mypkg.sim:step")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not callable(v)]
        if bad or not obj:
            raise TypeError(f"{spec!r} is a mapping, but not of names to callables (bad: {bad})")
        return obj
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


class ServerProcess:
    """``deepzero-oracle serve`` in a child process; knows its address and its process id.

    Args:
        target: ``MODULE:CALLABLE`` as for the CLI.
        *args: more CLI options (``"--token", "t"``); ``--port 0`` is added if no --port.
        cwd: directory to start in (MODULE must import from there).
        env: environment for the child (default: this process's).
        startup_timeout: seconds to wait for the "serving ... at HOST:PORT" line.
    Stop it with ``stop()`` (SIGTERM, then SIGKILL after ``timeout``) or ``kill()``.
    """

    def __init__(self, target: str, *args: str, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 startup_timeout: float = 60.0):
        import queue
        import subprocess
        import tempfile

        cmd = [python, "-m", "deepzero_oracle.serve", target, *args]
        if "--port" not in args:
            cmd += ["--port", "0"]
        self.stderr_file = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=None if env is None else dict(env),
                                     stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        self.address = ""
        while not self.address:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"server {target} did not start in {startup_timeout} s; "
                                   f"stderr: {self.stderr_tail()}") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"server {target} exited with {self.proc.returncode} before "
                                   f"serving; stderr: {self.stderr_tail()}")
            m = re.search(r" at (\S+) \(", line)
            if m:
                self.address = m.group(1)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of the child's stderr (for error messages)."""
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")[-chars:]

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (default SIGTERM: graceful) to our child, wait; SIGKILL if it hangs."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the child (a crash, as far as clients can tell)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse subparsers object (sets ``func=``)."""
    p = subparsers.add_parser(
        "serve", help="serve a Python callable as a gRPC black box",
        description="Serve MODULE:CALLABLE, f(*inputs [N, ...]) -> [N, ...], over gRPC (KServe v2 "
                    "inference protocol plus batched/streamed oracle queries, health, reflection).")
    p.add_argument("target", metavar="MODULE:CALLABLE",
                   help="e.g. mypkg.sim:step (a dict {name: callable} serves several models)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 = any free")
    p.add_argument("--model-name", default=None, help="name on the wire (default: the callable's)")
    p.add_argument("--max-message-mb", type=float, default=64, help="message size limit, both ways")
    p.add_argument("--token", default=None,
                   help=f"shared token clients must send (default: ${TOKEN_ENV}; prefer the "
                        "environment variable, command lines are visible to other users)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--max-concurrency", type=int, default=1, help="black-box calls at once (default 1)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="RPCs admitted at once; more get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--numpy", action="store_true", help="pass numpy arrays instead of torch tensors")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf inputs")
    p.add_argument("--cost-hint", type=float, default=None, help="declared seconds per row")
    p.add_argument("--input", action="append", default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an input, e.g. x:FP32:-1,64 (repeat per input, in order)")
    p.add_argument("--output", action="append", default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an output (repeat per output, in order)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on SIGTERM")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``deepzero-oracle serve``: run until SIGTERM/SIGINT, then stop gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fn = load_callable(args.target)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    server = serve_blackbox(
        fn, host=args.host, port=args.port, model_name=args.model_name, inputs=args.input,
        outputs=args.output, numpy=args.numpy, token=token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_message_mb=args.max_message_mb,
        max_concurrency=args.max_concurrency, max_pending=args.max_pending,
        allow_nonfinite=args.allow_nonfinite, cost_hint=args.cost_hint)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    names = ", ".join(repr(n) for n in server.models)
    # One machine-readable line (tests and scripts parse the address from it).
    print(f"deepzero-oracle: serving {names} at {server.address} "
          f"({'tls' if server.tls else 'insecure'}, token {'on' if token else 'off'})", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("signal received: stopping (grace %.1f s)", args.grace)
    server.stop(args.grace)
    print("deepzero-oracle: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deepzero_oracle.serve MODULE:CALLABLE [options]``."""
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
