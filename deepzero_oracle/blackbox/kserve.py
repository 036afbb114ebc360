"""A model served by any KServe v2 server (MLServer, Triton, KServe, ours) as a black box.

    box = KServeBlackBox("127.0.0.1:8081", "my-model")                          # gRPC, raw bytes
    box = KServeBlackBox("http://127.0.0.1:8080", "my-model", protocol="rest")  # REST, JSON
    y = box(x)                                                    # x [N, ...] -> y [N, ...]

Same call and errors as LocalBlackBox and GrpcBlackBox. Over gRPC it speaks the standard
``inference.GRPCInferenceService`` with raw little-endian contents; over REST it POSTs JSON
to ``/v2/models/<name>[/versions/<v>]/infer`` with the standard library's ``urllib``.
Input names come from the model's metadata unless given.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from deepzero_oracle.blackbox.errors import remote_error
from deepzero_oracle.blackbox.local import BlackBoxError
from deepzero_oracle.blackbox.protocol import (
    DATATYPES,
    KSERVE_SERVICE,
    WireError,
    bearer,
    check_shape,
    datatype_of,
    resolve_token,
)
from deepzero_oracle.blackbox.remote import RemoteBlackBox

# HTTP status -> the gRPC status it means (so REST and gRPC raise the same errors).
_HTTP_CODES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


class KServeBlackBox(RemoteBlackBox):
    """A KServe v2 model as a black box: ``box(*inputs [N, ...]) -> [N, ...]``.

    Args:
        url: ``host:port`` (gRPC) or ``http(s)://host:port`` (REST).
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
    """

    def __init__(self, url: str, model: str, *, protocol: str = "grpc", version: str = "",
                 timeout: float = 30.0, token: str | None = None, tls=None,
                 input_names: list[str] | None = None, output_names: list[str] | None = None,
                 max_batch_rows: int = 65536, max_message_mb: float = 64, retries: int = 4,
                 wait_for_ready: bool = False):
        super().__init__(max_batch_rows=max_batch_rows, max_message_mb=max_message_mb)
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        self.protocol, self.model, self.version, self.timeout = protocol, model, version, timeout
        self.input_names = list(input_names) if input_names is not None else None
        self.output_names = list(output_names) if output_names is not None else None
        self.retries = max(0, int(retries))
        self._metadata: dict | None = None
        if protocol == "grpc":
            # Imported here so REST users never pay for (or need) grpc.
            from deepzero_oracle.blackbox import grpc as _g
            from deepzero_oracle.wire import oracle_pb2 as pb

            self._g, self._pb = _g, pb
            self.transport = _g.GrpcTransport(url, token=token, tls=tls, max_message_mb=max_message_mb,
                                              retries=retries, wait_for_ready=wait_for_ready)
            self.target = self.transport.target
            unary = self.transport.unary
            self._infer = unary(KSERVE_SERVICE, "ModelInfer", pb.ModelInferResponse)
            self._model_metadata = unary(KSERVE_SERVICE, "ModelMetadata", pb.ModelMetadataResponse)
            self._model_ready = unary(KSERVE_SERVICE, "ModelReady", pb.ModelReadyResponse)
        else:
            if "://" not in url:
                url = "http://" + url
            self.base = url.rstrip("/")
            self.target = self.base
            token = resolve_token(token)
            self._headers = {"Content-Type": "application/json"}
            if token:
                self._headers["Authorization"] = bearer(token)
            self._ssl = ssl.create_default_context(cafile=tls) if isinstance(tls, str) else None

    # -- metadata --------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The model's KServe metadata: ``{"name", "inputs": [{"name", "datatype", "shape"}], ...}``."""
        if self._metadata is None:
            if self.protocol == "grpc":
                import grpc

                try:
                    md = self._model_metadata(self._pb.ModelMetadataRequest(name=self.model, version=self.version),
                                              **self._kw())
                except grpc.RpcError as e:
                    raise self.transport.error(e, f"ModelMetadata({self.model!r})") from None
                tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                      for t in ts]
                self._metadata = {"name": md.name, "versions": list(md.versions), "platform": md.platform,
                                  "inputs": tensors(md.inputs), "outputs": tensors(md.outputs)}
            else:
                self._metadata = self._http("GET", self._model_path(""), None, "metadata")
        return self._metadata

    def ready(self, timeout: float | None = None) -> bool:
        """True if the server says the model is ready (False if unreachable or unknown)."""
        if self.protocol == "grpc":
            import grpc

            try:
                return self._model_ready(self._pb.ModelReadyRequest(name=self.model, version=self.version),
                                         **self._kw(timeout)).ready
            except grpc.RpcError:
                return False
        try:
            req = urllib.request.Request(self.base + self._model_path("/ready"), headers=self._headers)
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout,
                                        context=self._ssl) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _names(self, count: int) -> list[str]:
        names = self.input_names
        if names is None:
            declared = [t["name"] for t in self.metadata().get("inputs", [])]
            names = declared if len(declared) == count else [f"input-{i}" for i in range(count)]
            self.input_names = names
        if len(names) != count:
            raise BlackBoxError(f"black box at {self.target}: called with {count} inputs but "
                                f"input_names has {len(names)}: {names}")
        return names

    def _model_path(self, suffix: str) -> str:
        path = f"/v2/models/{urllib.parse.quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{urllib.parse.quote(self.version, safe='')}"
        return path + suffix

    def _kw(self, timeout: float | None = None) -> dict:
        return dict(timeout=self.timeout if timeout is None else timeout,
                    metadata=self.transport.metadata, wait_for_ready=self.transport.wait_for_ready)

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
            import grpc

            answers = []
            for c in chunks:  # KServe servers are typically sequential per model: no pipelining
                req = self._g.request_for(c, names, self.model, self.version, self.output_names or ())
                try:
                    resp = self._infer(req, **self._kw())
                except grpc.RpcError as e:
                    raise self.transport.error(e, f"ModelInfer({self.model!r})") from None
                answers.append(self._select(self._g.decode_response(resp, self.target)))
            return answers
        return [self._select(self._rest_infer(c, names)) for c in chunks]

    def _rest_infer(self, arrays: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        body = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
                            "data": a.ravel().tolist()} for n, a in zip(names, arrays)]}
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
                dt = DATATYPES.get(t.get("datatype", ""))
                if dt is None:
                    raise WireError(f"output {t.get('name')!r}: unsupported datatype {t.get('datatype')!r}")
                shape = check_shape(t.get("shape", []), t.get("name", "?"))
                values = np.asarray(t.get("data", []), dtype=dt)
                if values.size != int(np.prod(shape, dtype=np.int64)):
                    raise WireError(f"output {t.get('name')!r}: {values.size} values for shape {list(shape)}")
                out[t["name"]] = values.reshape(shape)
        except (WireError, KeyError, TypeError, ValueError) as e:
            raise BlackBoxError(f"black box at {self.target} sent an unreadable answer: {e}") from e
        return out

    def _http(self, method: str, path: str, data: bytes | None, what: str) -> dict:
        """One JSON request with retries on connection failures / 503 (idempotent calls only)."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                   self.target, context=what)
            req = urllib.request.Request(self.base + path, data=data, method=method, headers=self._headers)
            try:
                with urllib.request.urlopen(req, timeout=remaining, context=self._ssl) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                code = _HTTP_CODES.get(e.code, "UNKNOWN")
                detail = _error_text(e)
                if code != "UNAVAILABLE" or attempt >= self.retries:
                    raise remote_error(code, f"HTTP {e.code}: {detail}", self.target, context=what) from None
            except (socket.timeout, TimeoutError):
                raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                   self.target, context=what) from None
            except (urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                       self.target, context=what) from None
                if attempt >= self.retries:
                    raise remote_error("UNAVAILABLE", f"{reason}", self.target, context=what) from None
            except json.JSONDecodeError as e:
                raise BlackBoxError(f"black box at {self.target} answered {what} with invalid JSON: {e}") from None
            attempt += 1
            time.sleep(min(0.1 * 2 ** (attempt - 1), 2.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Close the gRPC channel (REST holds no connection)."""
        if self.protocol == "grpc":
            self.transport.close()

    def __enter__(self) -> "KServeBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KServeBlackBox({self.target!r}, {self.model!r}, protocol={self.protocol!r})"


def _error_text(e: "urllib.error.HTTPError") -> str:
    try:
        body = e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 -- the status alone still says what happened
        return e.reason or ""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            return str(parsed.get("error") or parsed.get("detail") or parsed)
    except ValueError:
        pass
    return body[:500]


__all__ = ["KServeBlackBox"]
