"""A black box behind any KServe v2 gRPC server: ``deepzero-oracle serve`` (or
:func:`deepzero_oracle.server.serve_blackbox`), MLServer, Triton, KServe.

    box = GrpcBlackBox("127.0.0.1:50051", timeout=10)
    y = box(x)                         # x [N, ...] -> y [N, ...], like LocalBlackBox
    box.metadata()                     # the model's KServe v2 metadata (names, datatypes, shapes)
    ys = box.query_batch([x1, x2])     # our server: many queries in one call, per-query errors
    for y in box.stream(xs): ...       # our server: bidirectional stream for high query rates

Calls go to the standard ``inference.GRPCInferenceService`` (ModelInfer, ModelMetadata) with
raw contents, the inputs named after the model's metadata and matched by position, so any v2
server answers them; ``query_batch``, ``stream`` and ``describe`` use our ``Oracle`` service,
the fast paths of our own server. One channel is opened per black box and reused by every
call. Every call has a deadline (``timeout=``). Idempotent calls (inference, metadata,
batches) are retried on UNAVAILABLE by gRPC itself through a service-config retry policy;
streams are not retried. Failures raise :class:`~deepzero_oracle.blackbox.errors.BlackBoxRemoteError`
subclasses, which are ``BlackBoxError`` like every black box's errors.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Iterable, Iterator

import grpc
import numpy as np
import torch

from deepzero_oracle.blackbox.errors import BlackBoxInvalidArgument, BlackBoxRemoteError, remote_error
from deepzero_oracle.blackbox.local import BlackBoxError
from deepzero_oracle.blackbox.protocol import (
    KSERVE_SERVICE,
    ORACLE_SERVICE,
    WireError,
    bearer,
    datatype_of,
    decode_raw,
    decode_typed,
    encode_raw,
    message_limit_options,
    read_pem,
    resolve_token,
    status_name,
)
from deepzero_oracle.blackbox.remote import RemoteBlackBox, check_rows
from deepzero_oracle.wire import oracle_pb2 as pb


def _service_config(retries: int) -> str:
    """Retry UNAVAILABLE for the idempotent methods only (never the stream)."""
    if retries <= 0:
        return json.dumps({"methodConfig": []})
    idempotent = [{"service": KSERVE_SERVICE},
                  {"service": ORACLE_SERVICE, "method": "Describe"},
                  {"service": ORACLE_SERVICE, "method": "QueryBatch"}]
    return json.dumps({"methodConfig": [{
        "name": idempotent,
        "retryPolicy": {
            "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


class GrpcTransport:
    """One reusable gRPC channel with size limits, retry policy, token and TLS.

    Args:
        target: ``host:port`` (``grpc://`` or ``grpcs://`` prefixes accepted; grpcs = TLS).
        token: shared token sent as ``authorization: Bearer <token>`` (default: $DEEPZERO_ORACLE_TOKEN).
        tls: None/False for plaintext, True for TLS with system roots, or a CA certificate
            (PEM path or bytes) to trust, e.g. a self-signed server certificate.
        tls_server_name: expected name in the server certificate, if not the target host.
        max_message_mb: message size limit, both directions.
        retries: extra attempts on UNAVAILABLE for idempotent calls (0 disables, max 4).
        wait_for_ready: wait (until the deadline) for an unreachable server instead of failing.
    """

    def __init__(self, target: str, *, token: str | None = None, tls=None,
                 tls_server_name: str | None = None, max_message_mb: float = 64, retries: int = 4,
                 wait_for_ready: bool = False):
        for scheme, secure in (("grpcs://", True), ("grpc://", None)):
            if target.startswith(scheme):
                target = target[len(scheme):]
                if secure and not tls:
                    tls = True
        self.target = target
        self.wait_for_ready = wait_for_ready
        token = resolve_token(token)
        self.metadata = (("authorization", bearer(token)),) if token else ()
        max_bytes = int(max_message_mb * 2**20)
        options = [
            *message_limit_options(max_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retries)),
            # Reconnect to a restarted server within seconds (gRPC's default backoff grows to
            # 2 minutes, which would stall a training run long after the server is back).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls:
            roots = None if tls is True else read_pem(tls)
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)

    def unary(self, service: str, method: str, response_cls):
        """A unary callable for ``/service/method`` taking a message, returning ``response_cls``."""
        return self.channel.unary_unary(f"/{service}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_cls.FromString)

    def error(self, e: grpc.RpcError, context: str = "") -> BlackBoxRemoteError:
        """A gRPC failure as the matching BlackBoxRemoteError."""
        code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
        details = e.details() if hasattr(e, "details") else str(e)
        return remote_error(code, details or "", self.target, context=context)

    def close(self) -> None:
        self.channel.close()


def request_for(arrays: list[np.ndarray], names: list[str], model: str, version: str = "",
                outputs: Iterable[str] = ()) -> pb.ModelInferRequest:
    """ModelInferRequest with raw little-endian contents for ``arrays`` (each ``[n, ...]``)."""
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, a in zip(names, arrays):
        req.inputs.add(name=name, datatype=datatype_of(a), shape=a.shape)
        req.raw_input_contents.append(encode_raw(a))
    for name in outputs:
        req.outputs.add(name=name)
    return req


def _concat(parts: list):
    """Stack a list of ``[B_i, ...]`` tensors or arrays along axis 0 (torch.cat for tensors)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p.detach() for p in parts]) if len(parts) > 1 else parts[0]
    return np.concatenate([np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p) for p in parts])


def decode_response(resp: pb.ModelInferResponse, target: str) -> dict[str, np.ndarray]:
    """Outputs of a ModelInferResponse (raw or typed contents) by name, in order."""
    out: dict[str, np.ndarray] = {}
    raws = resp.raw_output_contents
    try:
        if raws and len(raws) != len(resp.outputs):
            raise WireError(f"{len(raws)} raw_output_contents for {len(resp.outputs)} outputs")
        for i, t in enumerate(resp.outputs):
            if raws:
                out[t.name] = decode_raw(raws[i], t.datatype, t.shape, t.name)
            else:
                out[t.name] = decode_typed(t.contents, t.datatype, t.shape, t.name)
    except WireError as e:
        raise BlackBoxError(f"black box at {target} sent an unreadable answer: {e}") from e
    return out


def metadata_dict(md: pb.ModelMetadataResponse) -> dict:
    """A ModelMetadataResponse as the v2 metadata dict ``{"name", "versions", "platform",
    "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}``."""
    def tensors(ts):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {"name": md.name, "versions": list(md.versions), "platform": md.platform,
            "inputs": tensors(md.inputs), "outputs": tensors(md.outputs)}


class GrpcBlackBox(RemoteBlackBox):
    """A black box behind a KServe v2 gRPC server: ``box(*inputs [N, ...]) -> [N, ...]``.

    Behaves like :class:`~deepzero_oracle.blackbox.LocalBlackBox`: same call, a torch tensor
    back (a tuple for several outputs), ``BlackBoxError`` subclasses on failure. Inputs are
    sent under the names the model's metadata declares, matched by position.

    Args:
        target: ``host:port`` of the server.
        model: model name ("" = our server's only model; other servers need the name).
        timeout: deadline of every call, in seconds (each chunk of a large call gets its own).
        token, tls, tls_server_name, max_message_mb, retries, wait_for_ready: see GrpcTransport.
        max_batch_rows: most rows per message; larger calls are split and pipelined.
        max_inflight: chunks of one call in flight at once.
        stream_timeout: deadline of a whole ``stream()`` call, in seconds.
    """

    def __init__(self, target: str, *, model: str = "", timeout: float = 30.0, token: str | None = None,
                 tls=None, tls_server_name: str | None = None, max_batch_rows: int = 65536,
                 max_message_mb: float = 64, retries: int = 4, wait_for_ready: bool = False,
                 max_inflight: int = 4, stream_timeout: float = 3600.0):
        super().__init__(max_batch_rows=max_batch_rows, max_message_mb=max_message_mb)
        self.transport = GrpcTransport(target, token=token, tls=tls, tls_server_name=tls_server_name,
                                       max_message_mb=max_message_mb, retries=retries,
                                       wait_for_ready=wait_for_ready)
        self.target = self.transport.target
        self.model, self.timeout = model, timeout
        self.max_inflight = max(1, int(max_inflight))
        self.stream_timeout = stream_timeout
        t = self.transport
        self._infer = t.unary(KSERVE_SERVICE, "ModelInfer", pb.ModelInferResponse)
        self._model_metadata = t.unary(KSERVE_SERVICE, "ModelMetadata", pb.ModelMetadataResponse)
        self._batch = t.unary(ORACLE_SERVICE, "QueryBatch", pb.QueryBatchResponse)
        self._describe = t.unary(ORACLE_SERVICE, "Describe", pb.OracleMetadata)
        self._stream = t.channel.stream_stream(
            f"/{ORACLE_SERVICE}/QueryStream", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.QueryBatchResponse.FromString)

    # -- plumbing --------------------------------------------------------------------------
    def _kw(self, timeout: float | None = None) -> dict:
        return dict(timeout=self.timeout if timeout is None else timeout,
                    metadata=self.transport.metadata, wait_for_ready=self.transport.wait_for_ready)

    def _fetch_metadata(self) -> dict:
        try:
            md = self._model_metadata(pb.ModelMetadataRequest(name=self.model), **self._kw())
        except grpc.RpcError as e:
            raise self.transport.error(e, f"ModelMetadata({self.model!r})") from None
        return metadata_dict(md)

    def _pipelined(self, rpc, requests: list, context: str) -> list:
        """Send requests with at most ``max_inflight`` outstanding; answers in order."""
        answers, pending = [], deque()
        try:
            if len(requests) == 1 or self.max_inflight == 1:
                # Blocking calls: a future costs a helper thread per call in grpc's Python API.
                return [rpc(req, **self._kw()) for req in requests]
            for req in requests:
                pending.append(rpc.future(req, **self._kw()))
                if len(pending) >= self.max_inflight:
                    answers.append(pending.popleft().result())
            while pending:
                answers.append(pending.popleft().result())
        except grpc.RpcError as e:
            for f in pending:
                f.cancel()
            raise self.transport.error(e, context) from None
        return answers

    def _infer_chunks(self, chunks):
        names = self._names(len(chunks[0]))
        reqs = [request_for(c, names, self.model) for c in chunks]
        resps = self._pipelined(self._infer, reqs, "ModelInfer")
        return [list(decode_response(r, self.target).values()) for r in resps]

    # -- public API ------------------------------------------------------------------------
    def query_batch(self, queries: list, *, return_exceptions: bool = False) -> list:
        """Many independent queries, stacked into as few calls as the limits allow.

        Args:
            queries: list of queries; each is one input array ``[B_i, ...]`` or a tuple of
                inputs (all queries share trailing shapes and datatypes).
            return_exceptions: put each failed query's error in its slot instead of raising.
        Returns:
            One answer per query: a tensor ``[B_i, ...]`` (tuple if several outputs), or a
            ``BlackBoxRemoteError`` for a failed query when ``return_exceptions``.
        """
        if not queries:
            return []
        n_inputs = len(queries[0]) if isinstance(queries[0], tuple) else 1
        columns = [[q[k] if isinstance(q, tuple) else q for q in queries] for k in range(n_inputs)]
        rows = [int(x.shape[0]) if x.ndim else 0 for x in columns[0]]
        for k, col in enumerate(columns[1:], 1):
            if [int(x.shape[0]) if x.ndim else 0 for x in col] != rows:
                raise BlackBoxInvalidArgument(f"black box at {self.target}: input {k} of some query "
                                              "has a different row count than input 0",
                                              target=self.target)
        if min(rows) < 1:
            raise BlackBoxInvalidArgument(f"black box at {self.target}: every query needs >= 1 row "
                                          "([B, ...] arrays)", target=self.target)
        try:
            # One concatenation per input (not one conversion per query): the fast path.
            stacked = self._arrays(tuple(_concat(col) for col in columns))
        except (TypeError, ValueError, RuntimeError) as e:
            raise BlackBoxInvalidArgument(f"black box at {self.target}: queries cannot be stacked "
                                          f"(same trailing shape and dtype needed): {e}",
                                          target=self.target) from e
        row_budget = self._rows_per_chunk(stacked)
        groups, current, current_rows = [], [], 0
        for i, r in enumerate(rows):
            if current and current_rows + r > row_budget:
                groups.append(current)
                current, current_rows = [], 0
            current.append(i)
            current_rows += r
        groups.append(current)
        names = self._names(len(stacked))
        reqs, offset = [], 0
        for g in groups:
            g_rows = [rows[i] for i in g]
            total = sum(g_rows)
            part = [a[offset:offset + total] for a in stacked]
            offset += total
            req = pb.QueryBatchRequest(request=request_for(part, names, self.model))
            if any(r != 1 for r in g_rows):  # all-ones is the default: keep messages small
                req.query_rows.extend(g_rows)
            reqs.append(req)
        resps = self._pipelined(self._batch, reqs, "QueryBatch")
        results: list = []
        for g, resp in zip(groups, resps):
            results.extend(self._split(resp, [rows[i] for i in g]))
        self.calls += 1
        self.rows += sum(rows)
        if not return_exceptions:
            for r in results:
                if isinstance(r, BlackBoxRemoteError):
                    raise r
        return results

    def _split(self, resp: pb.QueryBatchResponse, rows: list[int]) -> list:
        """One QueryBatchResponse -> per-query answers (tensors) or errors, in query order."""
        failed = {}
        for err in resp.errors:
            if err.index < 0:  # the whole request was rejected (stream only)
                e = remote_error(status_name(err.code), err.message, self.target,
                                 context="QueryStream")
                return [e] * len(rows)
            if err.index >= len(rows):
                raise BlackBoxError(f"black box at {self.target} reported an error for query "
                                    f"{err.index} of {len(rows)}")
            failed[int(err.index)] = remote_error(status_name(err.code), err.message,
                                                  self.target, context="query")
        ok_rows = [r for i, r in enumerate(rows) if i not in failed]
        if not ok_rows:
            return [failed[i] for i in range(len(rows))]
        outs = list(decode_response(resp.response, self.target).values())
        check_rows(outs, sum(ok_rows), self.target)
        # One tensor per output, then views per query (torch.split is one C call).
        tensors = [torch.from_numpy(o if o.flags.writeable else o.copy()) for o in outs]
        pieces = [torch.split(t, ok_rows) for t in tensors]
        ok = iter(zip(*pieces))
        results = []
        for i in range(len(rows)):
            if i in failed:
                results.append(failed[i])
            else:
                parts = next(ok)
                results.append(parts[0] if len(parts) == 1 else tuple(parts))
        return results

    def stream(self, queries: Iterable, *, return_exceptions: bool = False,
               timeout: float | None = None) -> Iterator:
        """Answer queries over one bidirectional stream, in order (highest query rate).

        Args:
            queries: iterable of queries (an array ``[B, ...]`` or a tuple of inputs each).
            return_exceptions: yield a failed query's error instead of raising it.
            timeout: deadline of the whole stream (default ``stream_timeout``).
        Yields:
            One answer per query: a tensor ``[B, ...]`` (tuple if several outputs) or an error.
        """
        sent_rows: deque[int] = deque()
        failure: list[BaseException] = []

        def requests():
            # gRPC consumes this on its own thread and would turn an exception here into a
            # bare CANCELLED: keep the error, end the stream, and raise it after the answers.
            try:
                for q in queries:
                    arrays = self._arrays(q if isinstance(q, tuple) else (q,))
                    req = request_for(arrays, self._names(len(arrays)), self.model)
                    sent_rows.append(arrays[0].shape[0])
                    yield pb.QueryBatchRequest(request=req, query_rows=[arrays[0].shape[0]])
            except Exception as e:  # noqa: BLE001 -- re-raised below, in the caller's thread
                failure.append(e)

        call = self._stream(requests(), **self._kw(self.stream_timeout if timeout is None else timeout))
        try:
            for resp in call:
                if not sent_rows:
                    raise BlackBoxError(f"black box at {self.target} sent more answers than queries")
                rows = sent_rows.popleft()
                (answer,) = self._split(resp, [rows])
                self.calls += 1
                self.rows += rows
                if isinstance(answer, BlackBoxRemoteError) and not return_exceptions:
                    raise answer
                yield answer
        except grpc.RpcError as e:
            raise self.transport.error(e, "QueryStream") from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]
        if sent_rows:
            raise BlackBoxError(f"black box at {self.target} closed the stream with "
                                f"{len(sent_rows)} queries unanswered")

    def describe(self) -> dict:
        """The model's metadata: input/output names, datatypes, shapes, limits, cost figures."""
        try:
            md = self._describe(pb.ModelMetadataRequest(name=self.model), **self._kw())
        except grpc.RpcError as e:
            raise self.transport.error(e, "Describe") from None

        return {
            **metadata_dict(md.model),
            "cost_hint_seconds_per_row": md.cost_hint_seconds_per_row,
            "measured_seconds_per_row": md.measured_seconds_per_row,
            "max_message_bytes": md.max_message_bytes, "max_concurrency": md.max_concurrency,
            "allow_nonfinite": md.allow_nonfinite, "server_version": md.server_version,
        }

    def ready(self, timeout: float | None = None) -> bool:
        """True if the server's health service says SERVING (False if unreachable)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.transport.channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""),
                              timeout=self.timeout if timeout is None else timeout,
                              metadata=self.transport.metadata)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        """Close the channel; the black box cannot be used afterwards."""
        self.transport.close()

    def __enter__(self) -> "GrpcBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcBlackBox({self.target!r}, model={self.model!r})"


__all__ = ["GrpcBlackBox", "GrpcTransport", "metadata_dict"]
