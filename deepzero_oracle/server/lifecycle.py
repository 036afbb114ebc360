"""Start and stop the server: ``serve_blackbox``, ``OracleServer``.

    with serve_blackbox(fn, port=0) as server:       # fn(x [N, ...]) -> y [N, ...]
        box = GrpcBlackBox(server.address)
        y = box(x)

One :class:`~deepzero_oracle.server.host.ModelHost` holds the models and runs every request;
the gRPC servicer (``deepzero_oracle.server.servicer``) and the REST app
(``deepzero_oracle.server.rest``) are built here over that one host. Besides the services of
the servicer, a server answers
``grpc.health.v1.Health`` and server reflection (which lists the KServe v2 service under its
standard name ``inference.GRPCInferenceService`` too), checks the shared token
(``authorization: Bearer <token>``, UNAUTHENTICATED otherwise; health checks are exempt),
serves TLS when given a certificate and key, and answers RESOURCE_EXHAUSTED when full. With
``http_port`` it also serves the KServe v2 REST endpoint (``deepzero_oracle.server.rest``)
over the same models, token, TLS and limits; with ``metrics_port``, Prometheus metrics
(``deepzero_oracle.server.metrics``). ``OracleServer.stop`` drains: NOT_SERVING first,
new requests refused, running ones given the grace period.
"""

from __future__ import annotations

import hmac
import re
import tempfile
import threading
import time
from concurrent import futures
from typing import Callable, Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from deepzero_oracle.server.host import ModelHost
from deepzero_oracle.server.metrics import Telemetry, metrics_available, require_metrics_extra
from deepzero_oracle.server.servicer import OracleServicer, generic_handlers
from deepzero_oracle.server.specs import ServedModel
from deepzero_oracle.wire import oracle_pb2 as pb
from deepzero_oracle.wire.constants import (
    KSERVE_SERVICE,
    MIRROR_SERVICE,
    NO_DEADLINE_SECONDS,
    ORACLE_SERVICE,
    bearer,
    check_message_mb,
    message_limit_options,
    pem_file,
    read_pem,
)


class _TokenInterceptor(grpc.ServerInterceptor):
    """Shared-token auth: ``authorization: Bearer <token>`` metadata on every call except
    health checks (load balancers probe without credentials). Refused inference calls are
    counted in ``telemetry`` (status UNAUTHENTICATED), as the REST endpoint counts its 401s."""

    def __init__(self, token: str, telemetry: Telemetry | None = None):
        self._expected = bearer(token).encode()
        self._telemetry = telemetry

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
        counted = self._telemetry is not None and details.method.rsplit("/", 1)[-1] in _COUNTED_METHODS

        def deny(request, context):
            if counted:
                self._telemetry.end(self._telemetry.begin("grpc"), "UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Same RPC kind as the real handler; requests are not even parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


# The inference methods (counted by the telemetry), as in servicer's handlers.
_COUNTED_METHODS = frozenset({"ModelInfer", "QueryBatch", "QueryStream"})


class OracleServer:
    """A running server. ``port``/``address`` say where (gRPC), ``http_port``/``rest_url`` where
    the REST endpoint is, ``metrics_port``/``metrics_url`` where Prometheus scrapes (None
    without them); ``stop()`` drains and ends them all.

    Use as a context manager to stop it on exit.
    """

    def __init__(self, server: grpc.Server, model_host: ModelHost, health_servicer, host: str, port: int,
                 tls: bool, rest=None, metrics_httpd=None):
        self._server, self._model_host, self._health = server, model_host, health_servicer
        self.host, self.port, self.tls = host, port, tls
        self._rest = rest
        self._metrics_httpd = metrics_httpd
        self._stopped = False
        self._hurry = threading.Event()

    @property
    def telemetry(self) -> Telemetry:
        """The server's counts: model statistics, Prometheus registry (``.registry``), drain state."""
        return self._model_host.telemetry

    @property
    def metrics_port(self) -> int | None:
        """The port of the separate Prometheus endpoint (None if it has none)."""
        return self._metrics_httpd.server_port if self._metrics_httpd is not None else None

    @property
    def metrics_url(self) -> str | None:
        """``http(s)://host:port/metrics`` of the separate Prometheus endpoint (None if it has none)."""
        if self._metrics_httpd is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.metrics_port}/metrics"

    @property
    def http_port(self) -> int | None:
        """The REST endpoint's port (None if it has none)."""
        return self._rest.port if self._rest is not None else None

    @property
    def rest_url(self) -> str | None:
        """``http(s)://host:port`` of the REST endpoint (None if it has none)."""
        return self._rest.url if self._rest is not None else None

    @property
    def address(self) -> str:
        """``host:port`` for clients (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def models(self) -> dict[str, ServedModel]:
        """The served models by name."""
        return self._model_host.models

    @property
    def model_host(self) -> ModelHost:
        """What answers both endpoints; ``model_host.in_flight`` and ``model_host.queued`` count
        the black-box calls running and waiting for a slot."""
        return self._model_host

    @property
    def servicer(self) -> ModelHost:
        """The same object as :attr:`model_host` (its earlier name, kept for existing code)."""
        return self._model_host

    def stop(self, grace: float = 2.0) -> int:
        """Drain, then stop: returns how many inference requests were still running when the
        grace period ended (0: all finished).

        In order: health turns NOT_SERVING (gRPC health, ServerReady, ModelReady, REST
        ``/v2/health/ready`` 400) while both endpoints keep answering; new inference requests
        are refused (gRPC UNAVAILABLE, REST 503: clients retry elsewhere); requests already
        admitted get up to ``grace`` s to finish (``hurry`` cuts the wait short); then the
        endpoints stop listening and whatever still runs is cancelled.
        """
        if self._stopped:
            return 0
        self._stopped = True
        grace = min(grace, NO_DEADLINE_SECONDS) if grace > 0 else 0.0  # inf/NaN reach no clock
        deadline = time.monotonic() + grace
        self._model_host.ready = False
        self._health.enter_graceful_shutdown()
        self._model_host.telemetry.start_drain()
        self._model_host.stop_admitting(grace)  # new calls: UNAVAILABLE; queued ones: until the grace ends
        self._model_host.telemetry.wait_idle(grace, stop=self._hurry)
        left = self._model_host.telemetry.inflight
        remaining = 0.0 if self._hurry.is_set() else max(0.0, deadline - time.monotonic())
        stopping = self._server.stop(remaining)
        if self._rest is not None:
            self._rest.stop(remaining)
        stopping.wait()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        return left

    def hurry(self) -> None:
        """Cut a running ``stop``'s wait short (e.g. on a second SIGTERM)."""
        self._hurry.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` s); True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> "OracleServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_blackbox(fn: Callable | Mapping[str, Callable], *, host: str = "127.0.0.1", port: int = 0,
                   model_name: str | None = None, inputs=None, outputs=None, numpy: bool = True,
                   token: str | None = None, tls_cert: str | bytes | None = None,
                   tls_key: str | bytes | None = None, max_message_mb: float = 64,
                   max_concurrency: int = 1, max_pending: int = 64, allow_nonfinite: bool = False,
                   cost_hint: float | None = None, http_port: int | None = None,
                   reuse_port: bool = False, worker: tuple[int, int] | None = None,
                   metrics_port: int | None = None) -> OracleServer:
    """Start a gRPC server (and optionally a REST endpoint) for a black box; returns once it listens.

    Args:
        fn: ``fn(*inputs [N, ...]) -> [N, ...]`` (or a tuple of arrays), or a dict
            ``{model_name: fn}`` to serve several models.
        host: interface to bind; 127.0.0.1 unless you mean to expose it.
        port: TCP port; 0 picks a free one (read it from ``.port``).
        model_name: name on the wire (default: the function's name, else "model").
        inputs: tensor specs (``TensorSpec``, ``"x:FP32:-1,64"`` or tuples) used for metadata
            and request checks; default: ``fn``'s parameter names.
        outputs: the outputs' tensor specs, in the same forms.
        numpy: give ``fn`` NumPy arrays (the default); False gives it torch tensors.
        token: shared secret; clients must send ``authorization: Bearer <token>``.
        tls_cert: PEM path or bytes of the server's certificate; with ``tls_key`` or neither.
        tls_key: PEM path or bytes of its private key.
        max_message_mb: largest message received or sent, both directions.
        max_concurrency: black-box calls running at once (1: the callable need not be thread-safe).
        max_pending: black-box calls admitted at once, gRPC and REST together (running or
            waiting for a slot; >= max_concurrency); more get RESOURCE_EXHAUSTED (REST: 429).
        allow_nonfinite: accept NaN/Inf inputs (default: INVALID_ARGUMENT).
        cost_hint: seconds per row, reported in the metadata for schedulers.
        http_port: also serve the KServe v2 REST endpoint on this port of ``host`` (0: a free
            one) with the same token, TLS and limits; needs the ``rest`` extra.
        reuse_port: share ``port`` with other processes that set it too (SO_REUSEPORT: the
            kernel spreads connections over them; ``serve --workers N``). Off by default, so a
            taken port fails loudly.
        worker: ``(index, count)``: this process is worker ``index`` of ``count`` sharing the
            port; ServerReady names it so clients can spread their connections over the workers.
        metrics_port: also serve Prometheus metrics at ``/metrics`` on this port of ``host`` (0:
            a free one; TLS as the server), without the token; needs the ``metrics`` extra.
            With that extra installed the metrics are kept anyway, and the REST endpoint
            answers ``GET /metrics`` too.
    Returns:
        An ``OracleServer`` (context manager) with ``.port``, ``.address``, ``.http_port``,
        ``.rest_url``, ``.metrics_url``, ``.model_host``, ``.telemetry``, ``.stop()``.
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
    if not 1 <= max_concurrency <= max_pending:
        raise ValueError(f"need 1 <= max_concurrency <= max_pending, got {max_concurrency} and {max_pending} "
                         "(max_pending counts running and queued calls)")
    if http_port is not None:
        from deepzero_oracle.server.rest import require_rest_extra

        require_rest_extra()  # before anything listens
    if metrics_port is not None:
        require_metrics_extra()
    max_bytes = int(check_message_mb(max_message_mb) * 2**20)
    model_host = ModelHost(models, max_message_bytes=max_bytes, max_concurrency=max_concurrency,
                           max_pending=max_pending, worker=worker, metrics=metrics_available())
    options = [
        *message_limit_options(max_bytes),
        # Fail loudly if the port is taken, unless sharing it is what is asked for.
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    interceptors = [_TokenInterceptor(token, model_host.telemetry)] if token else []
    # One thread per admitted RPC, so a long stream never starves health checks. The host's
    # queue bounds the black-box calls (max_pending, with a clear RESOURCE_EXHAUSTED); gRPC's own
    # limit, a little above it, leaves room for health and metadata calls when it is full.
    rpc_limit = max_pending + _RPC_HEADROOM
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=rpc_limit, thread_name_prefix="oracle-rpc"),
                         options=options, interceptors=interceptors,
                         maximum_concurrent_rpcs=rpc_limit)
    server.add_generic_rpc_handlers(generic_handlers(OracleServicer(model_host)))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", MIRROR_SERVICE, KSERVE_SERVICE, ORACLE_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (KSERVE_SERVICE, MIRROR_SERVICE, ORACLE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server, pool=reflection_pool())
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(read_pem(tls_key), read_pem(tls_cert))])
        bound = server.add_secure_port(bind, creds)
    else:
        bound = server.add_insecure_port(bind)
    if not bound:
        raise OSError(f"could not bind {bind} (port in use?)")
    server.start()
    rest = None
    if http_port is not None:
        from deepzero_oracle.server.rest import RestEndpoint, rest_app

        try:
            rest = RestEndpoint(rest_app(model_host, token=token, max_body_bytes=max_bytes, max_pending=max_pending),
                                host=host, port=http_port, tls_cert=tls_cert, tls_key=tls_key)
        except BaseException:
            server.stop(0)
            raise
    metrics_httpd = None
    if metrics_port is not None:
        try:
            metrics_httpd = _metrics_server(model_host.telemetry, host, metrics_port, tls_cert, tls_key)
        except BaseException:
            server.stop(0)
            if rest is not None:
                rest.stop(0)
            raise
    return OracleServer(server, model_host, health_servicer, host, bound, tls=tls_cert is not None, rest=rest,
                        metrics_httpd=metrics_httpd)


def _metrics_server(telemetry: Telemetry, host: str, port: int, tls_cert, tls_key):
    """prometheus_client's own HTTP server for ``telemetry``'s registry on ``host:port``
    (HTTPS with the server's certificate); returns the running WSGI server."""
    prom = require_metrics_extra()
    if tls_cert is None:
        started = prom.start_http_server(port, addr=host, registry=telemetry.registry)
    else:
        # The TLS context reads files: PEM bytes live in a private folder only while it loads.
        with tempfile.TemporaryDirectory(prefix="deepzero-oracle-tls-") as folder:
            started = prom.start_http_server(
                port, addr=host, registry=telemetry.registry,
                certfile=pem_file(tls_cert, f"{folder}/cert.pem"), keyfile=pem_file(tls_key, f"{folder}/key.pem"))
    if not isinstance(started, tuple):
        raise RuntimeError("prometheus_client is too old to serve --metrics-port (needs >= 0.20): "
                           "pip install -U prometheus_client")
    return started[0]


# RPCs gRPC admits beyond max_pending: health checks, metadata, and calls still being decoded.
_RPC_HEADROOM = 8


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: ours, health, reflection, and the KServe v2 service
    under its standard package ``inference`` (a copy of our mirror's file with the package
    renamed). A pool of its own, so the ``inference.*`` names never clash in this process with
    those tritonclient or MLServer register in the default pool."""
    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(_standard_kserve_file().SerializeToString())
    return pool


def _standard_kserve_file() -> descriptor_pb2.FileDescriptorProto:
    """oracle.proto's GRPCInferenceService and the messages it reaches, in package ``inference``."""
    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    old, new = f".{ours.package}.", ".inference."
    service = next(s for s in ours.service if s.name == "GRPCInferenceService")
    by_name = {m.name: m for m in ours.message_type}
    needed, todo = set(), [t for m in service.method for t in (m.input_type, m.output_type)]
    while todo:  # top-level messages reachable from the service's requests and responses
        name = todo.pop()[len(old):].split(".")[0]
        if name in needed:
            continue
        needed.add(name)
        stack = [by_name[name]]
        while stack:
            message = stack.pop()
            stack.extend(message.nested_type)
            todo.extend(f.type_name for f in message.field if f.type_name.startswith(old))
    std = descriptor_pb2.FileDescriptorProto(name="deepzero_oracle/kserve_v2_inference.proto",
                                             package="inference", syntax=ours.syntax)
    std.message_type.extend(m for m in ours.message_type if m.name in needed)
    std.service.add().CopyFrom(service)
    stack = list(std.message_type)
    while stack:  # point every type reference at the new package
        message = stack.pop()
        stack.extend(message.nested_type)
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old):]
    for method in std.service[0].method:
        method.input_type = new + method.input_type[len(old):]
        method.output_type = new + method.output_type[len(old):]
    return std


def _default_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name if re.fullmatch(r"[A-Za-z0-9_.\-]+", name) else "model"


