"""The KServe v2 REST endpoint of the server: an ASGI app (Starlette) served by uvicorn.

    deepzero-oracle serve mymodule:step --http-port 8000
    curl -s 127.0.0.1:8000/v2/models/step/infer -d '{"inputs": [{"name": "x", "datatype": "FP32",
         "shape": [1, 2], "data": [1, 2]}]}'

Routes (the v2 REST protocol; JSON bodies; errors are ``{"error": "<what to do>"}``):

    GET  /v2/health/live, /v2/health/ready            200; ready: 400 while stopping (no token)
    GET  /v2                                           server metadata
    GET  /v2/models/{name}[/versions/{v}]              model metadata (404: unknown model)
    GET  /v2/models/{name}[/versions/{v}]/ready        200 ready, 400 not ready, 404 unknown
    POST /v2/models/{name}[/versions/{v}]/infer        inference
    GET  /v2/models/stats, /v2/models/{name}[/versions/{v}]/stats
                                                       statistics extension (Triton's JSON)
    GET  /metrics                                      Prometheus text format (no token)

Tensors travel as JSON ``data`` (flat, or nested as the shape; row-major) or, with the v2
binary-data extension (what tritonclient.http sends by default), as raw little-endian bytes
after a JSON header whose length is in the ``Inference-Header-Content-Length`` header (each
such input says ``"parameters": {"binary_data_size": n}``). Outputs are binary when the request
asks: ``"binary_data": true`` in an output's parameters, or ``"binary_data_output": true`` in
the request's parameters for all of them; otherwise JSON.

It keeps the gRPC endpoint's promises: the same shared token (header ``Authorization: Bearer
<token>``; 401 without it, health checks exempt), TLS from the same certificate and key,
413 for a body over the message limit, 429 when ``max_pending`` requests are in progress, 400
with a message for bad JSON, datatype, shape, byte count or NaN/Inf, 404 for an unknown model,
and ``stop()`` drains (ready turns 400, new infer requests get 503, running ones finish).
Requests are decoded here and then validated and run by the model host's one path
(:meth:`ModelHost.validate`, :meth:`ModelHost.infer`), the same as gRPC requests; this module
never touches the gRPC side.

Needs the ``rest`` extra: ``pip install 'deepzero-oracle[rest]'``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from deepzero_oracle.extras import install_hint, require
from deepzero_oracle.server.host import ModelHost
from deepzero_oracle.server.metrics import DRAINING_MESSAGE, require_metrics_extra
from deepzero_oracle.server.specs import MODEL_VERSION, ServedModel
from deepzero_oracle.wire.codec import datatype_of, decode_json, decode_raw, encode_raw, json_tensor
from deepzero_oracle.wire.constants import BINARY_HEADER, bearer, http_status, pem_file
from deepzero_oracle.wire.errors import WireError

try:  # the 'rest' extra's fast JSON codec; the standard library's json without it
    import orjson
except ImportError:
    orjson = None

log = logging.getLogger(__name__)

REST_EXTRA = install_hint("rest")


def require_rest_extra() -> None:
    """Raise :class:`~deepzero_oracle.extras.MissingExtra` (one line naming the ``rest`` extra)
    if Starlette or uvicorn is missing."""
    require("rest", "starlette", "uvicorn", feature="the REST endpoint (--http-port / http_port=)")


# -- decoding and encoding (no web framework here) -----------------------------------------------
def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise WireError(f"{what}: 'parameters' must be a JSON object")
    return params


def decode_infer_body(body: bytes, header_length: str | None) -> tuple[dict, list[str], list[np.ndarray]]:
    """An infer request body -> ``(the JSON request, input names, arrays [N, ...] in request order)``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None: all JSON).
    The JSON is read by orjson when installed; a body it refuses or reads differently from the
    standard library (NaN/Infinity literals, integers past 64 bits, UTF-16/32, deep nesting)
    is read again by the standard library, so the same bodies pass and fail with the same
    messages either way.
    Raises WireError (INVALID_ARGUMENT) saying what is malformed.
    """
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise WireError(f"{BINARY_HEADER} must be an integer, got {header_length[:40]!r}") from None
        if not 0 < length <= len(body):
            raise WireError(f"{BINARY_HEADER} is {length} but the body has {len(body)} bytes")
        head, binary = body[:length], memoryview(body)[length:]
    if orjson is not None:
        try:
            request = orjson.loads(head)
            return request, *_decode_inputs(request, binary)
        except (orjson.JSONDecodeError, WireError):
            pass  # the standard library's reading decides, and words the error
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError(f"the body is not valid JSON: {str(e)[:200]}") from None
    return request, *_decode_inputs(request, binary)


def _decode_inputs(request, binary: memoryview) -> tuple[list[str], list[np.ndarray]]:
    """The parsed request's inputs -> ``(names, arrays [N, ...])``, binary ones cut from ``binary``."""
    if not isinstance(request, dict):
        raise WireError('the body must be a JSON object {"inputs": [...]}')
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise WireError("'inputs' must be a non-empty list of tensors "
                        '{"name", "datatype", "shape", "data"}')
    names, arrays, offset = [], [], 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise WireError(f"input {i} must be a JSON object")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not name:
            raise WireError(f"input {i} has no 'name'")
        if not isinstance(datatype, str):
            raise WireError(f"input {name!r} has no 'datatype' string (e.g. \"FP32\")")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise WireError(f"input {name!r}: 'shape' must be a list of integers")
        size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise WireError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            arrays.append(decode_json(tensor["data"], datatype, shape, name))
        else:
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise WireError(f"input {name!r}: binary_data_size {str(size)[:40]} does not fit the "
                                f"{len(binary) - offset} binary bytes left after the JSON header")
            if "data" in tensor:
                raise WireError(f"input {name!r} has both 'data' and binary data")
            arrays.append(decode_raw(binary[offset:offset + size], datatype, shape, name))
            offset += size
        names.append(name)
    if offset != len(binary):
        raise WireError(f"{len(binary) - offset} bytes of binary data are claimed by no input's "
                        "binary_data_size")
    return names, arrays


def requested_outputs(request: dict) -> tuple[list[str], dict[str, bool]]:
    """The request's output names (empty: all) and which of them are wanted as binary data.

    The binary choice of an unlisted output is under ``""`` (the ``binary_data_output`` flag).
    """
    everything = _parameters(request, "the request").get("binary_data_output", False)
    if not isinstance(everything, bool):
        raise WireError("the request's binary_data_output parameter must be true or false")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise WireError("'outputs' must be a list of {\"name\"} objects")
    names, binary = [], {"": everything}
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise WireError(f"requested output {i} must be an object with a 'name'")
        flag = _parameters(out, f"output {out['name']!r}").get("binary_data", everything)
        if not isinstance(flag, bool):
            raise WireError(f"output {out['name']!r}: binary_data must be true or false")
        names.append(out["name"])
        binary[out["name"]] = flag
    return names, binary


def encode_infer_response(model: ServedModel, pairs: list[tuple[str, np.ndarray]], request_id,
                          binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """Output pairs ``(name, array [N, ...])`` -> ``(body, headers)``: JSON, or a JSON header
    then raw bytes (binary extension). JSON is written by orjson straight from the arrays when it
    is installed, except for NaN/Inf values, which the standard library writes as before."""
    fast = orjson is not None and not any(
        arr.dtype.kind == "f" and not binary.get(name, binary[""]) and not np.isfinite(arr).all()
        for name, arr in pairs)
    outputs, blobs = [], []
    for name, arr in pairs:
        if binary.get(name, binary[""]):
            raw = encode_raw(arr)
            outputs.append({"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape),
                            "parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        else:
            outputs.append(json_tensor(name, arr, numpy=fast))
    answer = {"model_name": model.name, "model_version": MODEL_VERSION, "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    head = None
    if fast:
        with contextlib.suppress(orjson.JSONEncodeError):  # e.g. an id holding a lone surrogate
            head = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if head is None:
        for tensor in outputs:
            if isinstance(tensor.get("data"), np.ndarray):
                tensor["data"] = tensor["data"].tolist()
        head = json.dumps(answer).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(head))}


def answer_infer(host: ModelHost, model: ServedModel, body: bytes,
                 header_length: str | None) -> tuple[bytes, dict[str, str]]:
    """One infer request, body to body, through the host's shared validation and inference."""
    call = prepare_infer(host, model, body, header_length)
    return finish_infer(model, call, host.infer(model, *call.inputs, call.wanted))


@dataclass
class _InferCall:
    """A decoded, validated infer request waiting for the black box."""

    inputs: tuple[list[str], list[np.ndarray]]
    wanted: list[str]
    binary: dict[str, bool]
    request_id: str | None


def prepare_infer(host: ModelHost, model: ServedModel, body: bytes, header_length: str | None) -> _InferCall:
    """Decode and validate an infer body (no black-box call): the part before ``host.infer``."""
    request, names, arrays = decode_infer_body(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError("'id' must be a string")
    wanted, binary = requested_outputs(request)
    return _InferCall(host.validate(model, names, arrays), wanted, binary, request_id)


def finish_infer(model: ServedModel, call: _InferCall, pairs) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers for ``host.infer``'s output pairs."""
    return encode_infer_response(model, pairs, call.request_id, call.binary)


# -- the ASGI app ---------------------------------------------------------------------------------
# Request bodies up to this size are decoded and answers encoded on the event loop's thread;
# larger ones in a worker thread, so health checks never wait behind a big decode.
_DECODE_ON_LOOP_BYTES = 256 * 1024

def rest_app(host: ModelHost, *, token: str | None, max_body_bytes: int, max_pending: int):
    """The Starlette app of the v2 REST routes over ``host`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    expected = bearer(token).encode() if token else None
    in_progress = 0  # infer requests admitted; only the event loop's thread touches it

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    telemetry = host.telemetry

    def endpoint(handler, *, needs_token: bool = True, counted: bool = False):
        """Token check, then ``handler``; WireErrors become their HTTP status. ``counted``: an
        inference route, counted once with its outcome (statistics, metrics) and refused with
        503 while the server drains."""
        async def answer(request, call) -> tuple:
            if expected is not None and needs_token:
                got = request.headers.get("authorization", "")
                if not hmac.compare_digest(got.encode("utf-8", "replace"), expected):
                    message = ("missing token: send the header 'Authorization: Bearer <token>'"
                               if not got else "wrong token")
                    return error(401, message, **{"WWW-Authenticate": "Bearer"}), "UNAUTHENTICATED"
            try:
                if call is not None and call.refused:
                    raise WireError(DRAINING_MESSAGE, "UNAVAILABLE")
                response = await handler(request)
                return response, _status_name(response.status_code)
            except WireError as e:
                return error(e.http or http_status(e.code), str(e)), e.code
            except Exception as e:  # noqa: BLE001 -- never let one request take the server down
                log.exception("unexpected error answering %s", request.url.path)
                return error(500, f"server error: {type(e).__name__}: {e}"), "INTERNAL"

        async def wrapped(request):
            if not counted:
                return (await answer(request, None))[0]
            call = telemetry.begin("rest", request.path_params.get("name", ""))
            status = "INTERNAL"
            try:
                response, status = await answer(request, call)
                return response
            finally:
                telemetry.end(call, status)
        return wrapped

    def model_of(request) -> ServedModel:
        return host.model(request.path_params["name"], request.path_params.get("version", ""))

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": host.ready}, status_code=200 if host.ready else 400)

    async def server_metadata(request):
        return JSONResponse({**host.server_info(), "extensions": ["binary_tensor_data", "model_statistics"]})

    async def statistics(request):
        stats = host.statistics(request.path_params.get("name", ""), request.path_params.get("version", ""))
        return JSONResponse({"model_stats": stats})

    async def metrics(request):
        if telemetry.registry is None:
            return error(501, f"{_metrics_missing()}")
        body, content_type = telemetry.exposition()
        return Response(body, headers={"content-type": content_type})

    async def model_metadata(request):
        return JSONResponse(model_of(request).metadata())

    async def model_ready(request):
        model = model_of(request)
        return JSONResponse({"name": model.name, "ready": host.ready},
                            status_code=200 if host.ready else 400)

    async def infer(request):
        nonlocal in_progress
        model = model_of(request)
        encoding = request.headers.get("content-encoding", "identity")
        if encoding != "identity":
            raise WireError(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        if in_progress >= max_pending:
            return error(429, f"the server is full ({max_pending} requests in progress); retry later "
                              "or raise --max-pending")
        in_progress += 1
        try:
            body = await _read_body(request, max_body_bytes)
            header_length = request.headers.get(BINARY_HEADER)
            if len(body) > _DECODE_ON_LOOP_BYTES:  # large bodies: decode off the event loop
                content, headers = await run_in_threadpool(answer_infer, host, model, body, header_length)
            else:  # small ones: only the black box leaves the loop (fewer thread switches)
                call = prepare_infer(host, model, body, header_length)
                pairs = await run_in_threadpool(host.infer, model, *call.inputs, call.wanted)
                content, headers = finish_infer(model, call, pairs)
        finally:
            in_progress -= 1
        return Response(content, headers=headers)

    async def no_route(request, exc):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; the v2 "
                                      "routes are /v2, /v2/health/{live,ready}, /v2/models/stats, "
                                      "/v2/models/NAME[/versions/V][/ready|/infer|/stats] and /metrics")

    routes = [Route("/v2/health/live", endpoint(live, needs_token=False), methods=["GET"]),
              Route("/v2/health/ready", endpoint(ready, needs_token=False), methods=["GET"]),
              # Prometheus scrapes carry no token, as health checks: counts and model names only.
              Route("/metrics", endpoint(metrics, needs_token=False), methods=["GET"]),
              Route("/v2", endpoint(server_metadata), methods=["GET"]),
              # Before /v2/models/{name}: "stats" is every model's statistics, as in Triton.
              Route("/v2/models/stats", endpoint(statistics), methods=["GET"])]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(prefix, endpoint(model_metadata), methods=["GET"]),
                   Route(prefix + "/ready", endpoint(model_ready), methods=["GET"]),
                   Route(prefix + "/stats", endpoint(statistics), methods=["GET"]),
                   Route(prefix + "/infer", endpoint(infer, counted=True), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})


_STATUS_OF_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                   413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED",
                   503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _status_name(http: int) -> str:
    """The gRPC status code name the metrics use for an HTTP status."""
    return "OK" if http < 400 else _STATUS_OF_HTTP.get(http, "INTERNAL")


def _metrics_missing() -> str:
    try:
        require_metrics_extra()
    except ImportError as e:
        return str(e)
    return "this server keeps no Prometheus metrics"


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with RESOURCE_EXHAUSTED (413) as soon as it passes ``limit`` bytes."""
    too_big = (f"the request body is over the server's {limit / 2**20:.0f} MiB message limit; send "
               "fewer rows per request (binary tensors are about 3x smaller than JSON) or raise "
               "--max-message-mb")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise WireError(too_big, "RESOURCE_EXHAUSTED")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WireError(too_big, "RESOURCE_EXHAUSTED")
        chunks.append(chunk)
    return b"".join(chunks)


# -- running it -----------------------------------------------------------------------------------
class RestEndpoint:
    """The REST app served by uvicorn on a background thread; returns once it listens.

    Args:
        app: the ASGI app (:func:`rest_app`).
        host / port: where to listen (port 0: a free port; read ``.port``).
        tls_cert / tls_key: PEM paths or bytes (both or neither): HTTPS.
    """

    def __init__(self, app, *, host: str, port: int, tls_cert=None, tls_key=None,
                 startup_timeout: float = 30.0):
        import uvicorn

        self._socket = _listening_socket(host, port)
        self.host, self.port, self.tls = host, self._socket.getsockname()[1], tls_cert is not None
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        try:
            if self.tls:
                # uvicorn (like Python's ssl) reads the certificate and key from files: PEM bytes
                # go to a private temporary folder only while the TLS context is made.
                with tempfile.TemporaryDirectory(prefix="deepzero-oracle-tls-") as folder:
                    config.ssl_certfile = pem_file(tls_cert, os.path.join(folder, "cert.pem"))
                    config.ssl_keyfile = pem_file(tls_key, os.path.join(folder, "key.pem"))
                    config.load()
            else:
                config.load()
        except Exception:
            self._socket.close()
            raise
        self._server = uvicorn.Server(config)
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="oracle-rest", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(0)
                raise RuntimeError(f"the REST endpoint did not start: {self._failure or 'timed out'}")
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as e:  # noqa: BLE001 -- reported by the thread that started it
            self._failure.append(e)

    @property
    def url(self) -> str:
        """``http(s)://host:port`` for clients (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        """Stop listening, let running requests finish for ``grace`` s, then end the thread."""
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        self._thread.join(grace + 10)
        self._socket.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``. Made with an explicit IPPROTO_TCP: asyncio turns
    Nagle's algorithm off only on such sockets, and with it on, every response whose headers and
    body go out as two writes waits ~40 ms for the client's delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"could not bind {host}:{port} for the REST endpoint (port in use?): {e}") from e
    return sock

