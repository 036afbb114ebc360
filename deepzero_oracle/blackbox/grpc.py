"""The gRPC client: a black box behind any KServe v2 gRPC server: ``deepzero-oracle serve`` (or
``deepzero_oracle.server.serve_blackbox``), MLServer, Triton, KServe.

    box = GrpcBlackBox("127.0.0.1:50051", timeout=10)
    box = GrpcBlackBox("127.0.0.1:8081", model="my-model", version="2", output_names=["probs"])
    y = box(x)                         # x [N, ...] -> y [N, ...], like LocalBlackBox
    box.metadata()                     # the model's KServe v2 metadata (names, datatypes, shapes)
    ys = box.query_batch([x1, x2])     # our server: many queries in one call, per-query errors
    for y in box.stream(xs): ...       # our server: bidirectional stream for high query rates

Calls go to the standard ``inference.GRPCInferenceService`` (ModelInfer, ModelMetadata) with
raw contents, the inputs named after the model's metadata and matched by position, so any v2
server answers them (``grpc://`` and ``kserve://`` specs are both this client);
``query_batch``, ``stream`` and ``describe`` use our ``Oracle`` service, the fast paths of our
own server. One channel is opened per black box and reused by every
call. Every call has a deadline (``timeout=``). Idempotent calls (inference, metadata,
batches) are retried on UNAVAILABLE by gRPC itself through a service-config retry policy;
streams are not retried. Given several addresses (replicas of one model), the channel
balances calls round-robin over the healthy ones, and an idempotent call that meets a dead
or stalled replica is sent again to another (the channel is
``GrpcTransport``). Black boxes pickle and
reconnect on first use, so they can travel to process pools and Dask workers. Failures raise
``BlackBoxRemoteError`` subclasses, which are
``BlackBoxError`` like every black box's errors.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import grpc
import numpy as np
import torch

from deepzero_oracle.blackbox.errors import (
    BlackBoxError,
    BlackBoxInvalidArgument,
    BlackBoxRemoteError,
    remote_error,
)
from deepzero_oracle.blackbox.remote import RemoteBlackBox, check_rows, metadata_dict
from deepzero_oracle.blackbox.transport import GrpcTransport, channel_target
from deepzero_oracle.wire import oracle_pb2 as pb
from deepzero_oracle.wire.codec import datatype_of, decode_raw, decode_typed, encode_raw
from deepzero_oracle.wire.constants import KSERVE_SERVICE, ORACLE_SERVICE, check_timeout, status_name
from deepzero_oracle.wire.errors import WireError


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


class GrpcBlackBox(RemoteBlackBox):
    """A black box behind a KServe v2 gRPC server: ``box(*inputs [N, ...]) -> [N, ...]``.

    Behaves like ``LocalBlackBox``: same call, a torch tensor
    back (a tuple for several outputs), ``BlackBoxError`` subclasses on failure. Inputs are
    sent under the names the model's metadata declares (or ``input_names``), matched by
    position.

    Args:
        target: ``host:port`` of the server, or a list of them: replicas of one model (calls are
            balanced over them; see GrpcTransport).
        model: model name ("" = our server's only model; other servers need the name).
        version: model version ("" = the server's choice).
        input_names: names of the inputs in call order (default: from the model's metadata).
        output_names: outputs to return, in order (default: all, in the server's order); they
            are also named in the requests, so the server computes only those.
        timeout: deadline of every call, in seconds (each chunk of a large call gets its own).
        token: shared token sent as ``authorization: Bearer <token>`` (default:
            $DEEPZERO_ORACLE_TOKEN).
        tls: None/False for plaintext, True for TLS with system roots, or a CA certificate
            (PEM path or bytes) to trust, e.g. a self-signed server certificate.
        tls_server_name: expected name in the server certificate, if not the target host.
        max_message_mb: message size limit, both directions.
        retries: extra attempts on UNAVAILABLE for idempotent calls (0 disables, max 4).
        wait_for_ready: wait (until the deadline) for an unreachable server instead of failing.
        max_batch_rows: most rows per message; larger calls are split and pipelined.
        max_inflight: chunks of one call in flight at once (1: one after the other, for servers
            that run one call per model at a time).
        stream_timeout: deadline of a whole ``stream()`` call, in seconds.
    """

    def __init__(self, target, *, model: str = "", version: str = "", input_names: list[str] | None = None,
                 output_names: list[str] | None = None, timeout: float = 30.0, token: str | None = None,
                 tls=None, tls_server_name: str | None = None, max_batch_rows: int = 65536,
                 max_message_mb: float = 64, retries: int = 4, wait_for_ready: bool = False,
                 max_inflight: int = 4, stream_timeout: float = 3600.0):
        super().__init__(model=model, version=version, input_names=input_names, output_names=output_names,
                         max_batch_rows=max_batch_rows, max_message_mb=max_message_mb)
        self.transport = GrpcTransport(target, token=token, tls=tls, tls_server_name=tls_server_name,
                                       max_message_mb=max_message_mb, retries=retries,
                                       wait_for_ready=wait_for_ready)
        self.target = self.transport.target
        self.timeout = check_timeout(timeout)
        self.max_inflight = max(1, int(max_inflight))
        self.stream_timeout = check_timeout(stream_timeout, "stream_timeout")

    # -- plumbing --------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """``host:port`` of every replica (one for a single server)."""
        return self.transport.targets

    def _kw(self, timeout: float | None = None) -> dict:
        return dict(timeout=self.timeout if timeout is None else check_timeout(timeout),
                    metadata=self.transport.metadata, wait_for_ready=self.transport.wait_for_ready)

    def _context(self, method: str) -> str:
        """How errors name a call: the method, and the model when one is named."""
        return f"{method}({self.model!r})" if self.model else method

    def _call(self, method: str, response_cls, request, service: str = KSERVE_SERVICE,
              timeout: float | None = None):
        """One idempotent unary call, retried on other replicas (GrpcTransport.call)."""
        rpc = self.transport.unary(service, method, response_cls)
        return self.transport.call(rpc, request, timeout=self.timeout if timeout is None else check_timeout(timeout),
                                   context=self._context(method))

    def _request(self, arrays: list[np.ndarray], names: list[str]) -> pb.ModelInferRequest:
        return request_for(arrays, names, self.model, self.version, self.output_names or ())

    def _fetch_metadata(self) -> dict:
        md = self._call("ModelMetadata", pb.ModelMetadataResponse,
                        pb.ModelMetadataRequest(name=self.model, version=self.version))
        return metadata_dict(md)

    def _pipelined(self, service: str, method: str, response_cls, requests: list) -> list:
        """Send idempotent requests with at most ``max_inflight`` outstanding; answers in order.
        A failed one is sent again as ``GrpcTransport.call`` says (replicas)."""
        rpc = self.transport.unary(service, method, response_cls)
        context = self._context(method)
        if len(requests) == 1 or self.max_inflight == 1:
            # Blocking calls: a future costs a helper thread per call in grpc's Python API.
            return [self.transport.call(rpc, req, timeout=self.timeout, context=context) for req in requests]
        answers, pending = [], deque()
        try:
            for req in requests:
                pending.append((req, rpc.future(req, **self._kw())))
                if len(pending) >= self.max_inflight:
                    req, future = pending.popleft()
                    answers.append(self.transport.call(rpc, req, timeout=self.timeout, context=context, first=future))
            while pending:
                req, future = pending.popleft()
                answers.append(self.transport.call(rpc, req, timeout=self.timeout, context=context, first=future))
        except BlackBoxError:
            for _, future in pending:
                future.cancel()
            raise
        return answers

    def _infer_chunks(self, chunks):
        names = self._names(len(chunks[0]))
        reqs = [self._request(c, names) for c in chunks]
        resps = self._pipelined(KSERVE_SERVICE, "ModelInfer", pb.ModelInferResponse, reqs)
        return [self._select(decode_response(r, self.target)) for r in resps]

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
            req = pb.QueryBatchRequest(request=self._request(part, names))
            if any(r != 1 for r in g_rows):  # all-ones is the default: keep messages small
                req.query_rows.extend(g_rows)
            reqs.append(req)
        resps = self._pipelined(ORACLE_SERVICE, "QueryBatch", pb.QueryBatchResponse, reqs)
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
        outs = self._select(decode_response(resp.response, self.target))
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
                    req = self._request(arrays, self._names(len(arrays)))
                    sent_rows.append(arrays[0].shape[0])
                    yield pb.QueryBatchRequest(request=req, query_rows=[arrays[0].shape[0]])
            except Exception as e:  # noqa: BLE001 -- re-raised below, in the caller's thread
                failure.append(e)

        rpc = self.transport.channel.stream_stream(
            f"/{ORACLE_SERVICE}/QueryStream", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.QueryBatchResponse.FromString)
        call = rpc(requests(), **self._kw(self.stream_timeout if timeout is None else timeout))
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
        md = self._call("Describe", pb.OracleMetadata, pb.ModelMetadataRequest(name=self.model, version=self.version),
                        service=ORACLE_SERVICE)

        return {
            **metadata_dict(md.model),
            "cost_hint_seconds_per_row": md.cost_hint_seconds_per_row,
            "measured_seconds_per_row": md.measured_seconds_per_row,
            "max_message_bytes": md.max_message_bytes, "max_concurrency": md.max_concurrency,
            "allow_nonfinite": md.allow_nonfinite, "server_version": md.server_version,
        }

    def ready(self, timeout: float | None = None) -> bool:
        """True if the server can answer: for a named model, its ModelReady says the model (and
        version) is ready; without a name, the health service says SERVING. False if
        unreachable, unknown, or stopping."""
        if self.model:
            try:
                return self._call("ModelReady", pb.ModelReadyResponse,
                                  pb.ModelReadyRequest(name=self.model, version=self.version), timeout=timeout).ready
            except BlackBoxError:
                return False
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.transport.channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""),
                              timeout=self.timeout if timeout is None else check_timeout(timeout),
                              metadata=self.transport.metadata)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def check_replicas(self, timeout: float = 10.0) -> None:
        """Raise `BlackBoxUnavailable` naming every replica that cannot be reached (health check)."""
        self.transport.check_replicas(timeout)

    def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        self.transport.close()

    def __enter__(self) -> "GrpcBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        target = self.targets if len(self.targets) > 1 else self.target
        return f"GrpcBlackBox({target!r}, model={self.model!r})"


__all__ = ["GrpcBlackBox", "GrpcTransport", "channel_target", "decode_response", "metadata_dict", "request_for"]
