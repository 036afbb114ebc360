"""A model served by any KServe v2 server (MLServer, Triton, KServe, ours) as a black box.

    box = KServeBlackBox("127.0.0.1:8081", "my-model")                          # gRPC, raw bytes
    box = KServeBlackBox("http://127.0.0.1:8080", "my-model", protocol="rest")  # REST, JSON
    y = box(x)                                                    # x [N, ...] -> y [N, ...]

Same call and errors as LocalBlackBox and GrpcBlackBox. Over gRPC it speaks the standard
``inference.GRPCInferenceService`` with raw little-endian contents; over REST it POSTs JSON
to ``/v2/models/<name>[/versions/<v>]/infer`` on one kept-alive ``httpx.Client``.
Input names come from the model's metadata unless given.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import time
import urllib.parse
from typing import TYPE_CHECKING

import numpy as np

from deepzero_oracle.blackbox.errors import remote_error, unreachable_replicas
from deepzero_oracle.blackbox.local import BlackBoxError
from deepzero_oracle.blackbox.protocol import (
    GRPC_CODE_OF_HTTP,
    KSERVE_SERVICE,
    WireError,
    bearer,
    check_timeout,
    decode_json,
    json_tensor,
    resolve_token,
)
from deepzero_oracle.blackbox.remote import RemoteBlackBox
from deepzero_oracle.extras import require

if TYPE_CHECKING:
    import httpx

# the REST client is an extra; gRPC users never import httpx
_REST_CLIENT = "the KServe v2 REST client (protocol='rest', kserve+http://)"


_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class KServeBlackBox(RemoteBlackBox):
    """A KServe v2 model as a black box: ``box(*inputs [N, ...]) -> [N, ...]``.

    Args:
        url: ``host:port`` (gRPC) or ``http(s)://host:port`` (REST); a list of them for replicas of
            one model (gRPC: balanced as GrpcBlackBox does; REST: calls rotate over the addresses,
            and a connection failure or a timeout is retried on the next one).
        model: model name on the server.
        protocol: "grpc" (raw contents; fastest) or "rest" (JSON).
        version: model version ("" = the server's choice).
        timeout: deadline of every call, in seconds.
        token: sent as ``authorization: Bearer <token>`` (default: $DEEPZERO_ORACLE_TOKEN).
        tls: gRPC: None/False, True or a CA PEM (path/bytes); REST: use https:// and pass a CA
            PEM path here to trust a private CA.
        input_names: names of the inputs in call order (default: from the model's metadata).
        output_names: outputs to return, in order (default: all, in the server's order).
        max_batch_rows: most rows per request; larger calls are split.
        max_message_mb: message size limit (gRPC, both directions) and REST chunk budget.
        retries: extra attempts when the server is unreachable (idempotent inference only).
        wait_for_ready: gRPC only: wait for an unreachable server until the deadline.

    Over REST, ``clients`` holds one ``httpx.Client`` per address (its connection pool keeps the
    connection alive between calls; ``http`` is the first); ``close()`` closes them. The black
    box pickles; a copy opens its own connections on first use.
    """

    def __init__(self, url, model: str, *, protocol: str = "grpc", version: str = "",
                 timeout: float = 30.0, token: str | None = None, tls=None,
                 input_names: list[str] | None = None, output_names: list[str] | None = None,
                 max_batch_rows: int = 65536, max_message_mb: float = 64, retries: int = 4,
                 wait_for_ready: bool = False):
        super().__init__(max_batch_rows=max_batch_rows, max_message_mb=max_message_mb,
                         input_names=input_names)
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        self.protocol, self.model, self.version = protocol, model, version
        self.timeout = check_timeout(timeout)
        self.output_names = list(output_names) if output_names is not None else None
        self.retries = max(0, int(retries))
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("KServeBlackBox needs at least one address")
        if protocol == "grpc":
            from deepzero_oracle.blackbox.transport import GrpcTransport  # REST users never import grpc

            self.transport = GrpcTransport(urls, token=token, tls=tls, max_message_mb=max_message_mb,
                                           retries=retries, wait_for_ready=wait_for_ready)
            self.target = self.transport.target
        else:
            require("rest", "httpx", feature=_REST_CLIENT)
            self.bases = [(u if "://" in u else "http://" + u).rstrip("/") for u in urls]
            self.base = self.bases[0]
            self.target = ",".join(self.bases)
            token = resolve_token(token)
            self._headers = {"Content-Type": "application/json"}
            if token:
                self._headers["Authorization"] = bearer(token)
            self._cafile = tls if isinstance(tls, str) else None
            self._clients: list[httpx.Client] | None = None
            self._turn = itertools.count()

    # -- connections -------------------------------------------------------------------------
    @property
    def clients(self) -> list[httpx.Client]:
        """REST: one ``httpx.Client`` per address (opened on first use), whose connection pool keeps
        its connection alive between calls."""
        if self._clients is None:
            httpx = require("rest", "httpx", feature=_REST_CLIENT)
            verify = ssl.create_default_context(cafile=self._cafile) if self._cafile else True
            # No Nagle delay: a request's headers and body are separate small writes, and waiting
            # for the server's delayed ACK between them costs ~40 ms per call.
            self._clients = [httpx.Client(base_url=base, headers=self._headers, timeout=self.timeout,
                                          transport=httpx.HTTPTransport(verify=verify, socket_options=_NO_DELAY))
                             for base in self.bases]
        return self._clients

    @property
    def http(self) -> httpx.Client:
        """REST: the client of the first address."""
        return self.clients[0]

    def _grpc_call(self, method: str, request, response_cls, timeout: float | None = None):
        """One idempotent gRPC call, retried on other replicas (GrpcTransport.call)."""
        rpc = self.transport.unary(KSERVE_SERVICE, method, response_cls)
        return self.transport.call(rpc, request, timeout=self.timeout if timeout is None else check_timeout(timeout),
                                   context=f"{method}({self.model!r})")

    # -- metadata --------------------------------------------------------------------------
    def _fetch_metadata(self) -> dict:
        if self.protocol == "rest":
            return self._http("GET", self._model_path(""), None, "metadata")
        from deepzero_oracle.blackbox.grpc import metadata_dict
        from deepzero_oracle.wire import oracle_pb2 as pb

        md = self._grpc_call("ModelMetadata", pb.ModelMetadataRequest(name=self.model, version=self.version),
                             pb.ModelMetadataResponse)
        return metadata_dict(md)

    def ready(self, timeout: float | None = None) -> bool:
        """True if the server says the model is ready (False if unreachable or unknown)."""
        if self.protocol == "grpc":
            from deepzero_oracle.wire import oracle_pb2 as pb

            try:
                return self._grpc_call("ModelReady", pb.ModelReadyRequest(name=self.model, version=self.version),
                                       pb.ModelReadyResponse, timeout).ready
            except BlackBoxError:
                return False
        import httpx

        try:
            r = self.http.get(self._model_path("/ready"),
                              timeout=self.timeout if timeout is None else check_timeout(timeout))
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _model_path(self, suffix: str) -> str:
        path = f"/v2/models/{urllib.parse.quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{urllib.parse.quote(self.version, safe='')}"
        return path + suffix

    def _select(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.output_names is None:
            return list(outputs.values())
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise BlackBoxError(f"black box at {self.target} did not return output(s) {missing}; "
                                f"it returned {list(outputs)}")
        return [outputs[n] for n in self.output_names]

    # -- inference -------------------------------------------------------------------------
    def _infer_chunks(self, chunks):
        names = self._names(len(chunks[0]))
        if self.protocol == "grpc":
            from deepzero_oracle.blackbox.grpc import decode_response, request_for
            from deepzero_oracle.wire import oracle_pb2 as pb

            answers = []
            for c in chunks:  # KServe servers are typically sequential per model: no pipelining
                req = request_for(c, names, self.model, self.version, self.output_names or ())
                resp = self._grpc_call("ModelInfer", req, pb.ModelInferResponse)
                answers.append(self._select(decode_response(resp, self.target)))
            return answers
        return [self._select(self._rest_infer(c, names)) for c in chunks]

    def _rest_infer(self, arrays: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        body = {"inputs": [json_tensor(n, a) for n, a in zip(names, arrays)]}
        if self.output_names:
            body["outputs"] = [{"name": n} for n in self.output_names]
        # allow_nan=False: JSON has no NaN; refuse rather than send something a server misreads.
        try:
            data = json.dumps(body, allow_nan=False).encode()
        except ValueError as e:
            raise remote_error("INVALID_ARGUMENT", "inputs hold NaN or Inf, which JSON cannot carry",
                               self.target, context="REST infer") from e
        answer = self._http("POST", self._model_path("/infer"), data, f"infer({self.model!r})")
        out: dict[str, np.ndarray] = {}
        try:
            for t in answer.get("outputs", []):
                out[t["name"]] = decode_json(t.get("data"), t.get("datatype", ""), t.get("shape", []),
                                             t["name"])
        except (WireError, KeyError, TypeError, AttributeError) as e:
            raise BlackBoxError(f"black box at {self.target} sent an unreadable answer: {e}") from e
        return out

    def _http(self, method: str, path: str, data: bytes | None, what: str) -> dict:
        """One JSON request with retries on connection failures / 503 (idempotent calls only).

        With several addresses, calls rotate over them; a connection failure or a timeout is
        retried on the next address (a timeout at most once per address, each with the full
        ``timeout``)."""
        import httpx

        replicas = len(self.bases) > 1
        deadline = time.monotonic() + self.timeout
        attempt, stalls = 0, 0
        turn = next(self._turn)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                   self.target, context=what)
            client = self.clients[(turn + attempt) % len(self.bases)]
            try:
                r = client.request(method, path, content=data, timeout=remaining)
            except httpx.TimeoutException:
                stalls += 1
                if not replicas or stalls >= len(self.bases):
                    raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                       self.target, context=what) from None
                attempt += 1
                deadline = time.monotonic() + self.timeout  # the next replica gets a full deadline
                continue
            except httpx.TransportError as e:
                if attempt >= self.retries + len(self.bases) - 1:
                    raise remote_error("UNAVAILABLE", f"{type(e).__name__}: {e}", self.target,
                                       context=what) from None
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError as e:
                        raise BlackBoxError(f"black box at {self.target} answered {what} with invalid "
                                            f"JSON: {e}") from None
                code = GRPC_CODE_OF_HTTP.get(r.status_code, "UNKNOWN")
                if code != "UNAVAILABLE" or attempt >= self.retries:
                    raise remote_error(code, f"HTTP {r.status_code}: {_error_text(r)}", self.target,
                                       context=what) from None
            attempt += 1
            time.sleep(min(0.1 * 2 ** (attempt - 1), 2.0, max(0.0, deadline - time.monotonic())))

    def check_replicas(self, timeout: float = 10.0) -> None:
        """Raise `BlackBoxUnavailable` naming every address that cannot be reached (gRPC: health
        check; REST: ``GET /v2/health/live``)."""
        if self.protocol == "grpc":
            return self.transport.check_replicas(timeout)
        import httpx

        problems = []
        for base, client in zip(self.bases, self.clients):
            try:
                r = client.get("/v2/health/live", timeout=check_timeout(timeout))
                if r.status_code != 200:
                    problems.append(f"{base} (HTTP {r.status_code})")
            except httpx.HTTPError as e:
                problems.append(f"{base} ({type(e).__name__}: {e})")
        if problems:
            raise unreachable_replicas(self.target, problems)

    def close(self) -> None:
        """Close the gRPC channel or the REST connection pools (a later call opens new ones)."""
        if self.protocol == "grpc":
            self.transport.close()
        elif self._clients is not None:
            for client in self._clients:
                client.close()
            self._clients = None

    def __getstate__(self) -> dict:
        # REST clients hold sockets: a copy (another process, a Dask worker) opens its own.
        return {k: (None if k == "_clients" else v) for k, v in self.__dict__.items() if k != "_turn"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.protocol == "rest":
            self._turn = itertools.count()

    def __enter__(self) -> "KServeBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KServeBlackBox({self.target!r}, {self.model!r}, protocol={self.protocol!r})"


def _error_text(r: httpx.Response) -> str:
    """The server's message in an error response (``{"error": ...}`` in KServe v2)."""
    try:
        parsed = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("detail") or parsed)
    return str(parsed)[:500]


__all__ = ["KServeBlackBox"]
