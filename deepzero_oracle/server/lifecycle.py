"""Start and stop the server: :func:`serve_blackbox`, :class:`OracleServer`.

    with serve_blackbox(fn, port=0) as server:       # fn(x [N, ...]) -> y [N, ...]
        box = GrpcBlackBox(server.address)
        y = box(x)

Besides the services of :mod:`deepzero_oracle.server.servicer`, a server answers
``grpc.health.v1.Health`` and server reflection (which lists the KServe v2 service under its
standard name ``inference.GRPCInferenceService`` too), checks the shared token
(``authorization: Bearer <token>``, UNAUTHENTICATED otherwise; health checks are exempt),
serves TLS when given a certificate and key, and answers RESOURCE_EXHAUSTED when full. With
``http_port`` it also serves the KServe v2 REST endpoint (:mod:`deepzero_oracle.server.rest`)
over the same models, token, TLS and limits.
"""

from __future__ import annotations

import hmac
import re
from concurrent import futures
from typing import Callable, Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from deepzero_oracle.blackbox.protocol import (
    KSERVE_SERVICE,
    MIRROR_SERVICE,
    ORACLE_SERVICE,
    bearer,
    message_limit_options,
    read_pem,
)
from deepzero_oracle.server.servicer import OracleServicer, generic_handlers
from deepzero_oracle.server.specs import ServedModel
from deepzero_oracle.wire import oracle_pb2 as pb


class _TokenInterceptor(grpc.ServerInterceptor):
    """Shared-token auth: ``authorization: Bearer <token>`` metadata on every call except
    health checks (load balancers probe without credentials)."""

    def __init__(self, token: str):
        self._expected = bearer(token).encode()

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
    """A running server. ``port``/``address`` say where (gRPC), ``http_port``/``rest_url`` where
    the REST endpoint is (None without one); ``stop()`` ends both gracefully.

    Use as a context manager to stop it on exit.
    """

    def __init__(self, server: grpc.Server, servicer: OracleServicer, health_servicer, host: str, port: int,
                 tls: bool, rest=None):
        self._server, self._servicer, self._health = server, servicer, health_servicer
        self.host, self.port, self.tls = host, port, tls
        self._rest = rest
        self._stopped = False

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
        return self._servicer.models

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for ``grace`` s."""
        if self._stopped:
            return
        self._stopped = True
        self._servicer.ready = False
        self._health.enter_graceful_shutdown()
        stopping = self._server.stop(grace)
        if self._rest is not None:
            self._rest.stop(grace)
        stopping.wait()

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
                   reuse_port: bool = False, worker: tuple[int, int] | None = None) -> OracleServer:
    """Start a gRPC server (and optionally a REST endpoint) for a black box; returns once it listens.

    Args:
        fn: ``fn(*inputs [N, ...]) -> [N, ...]`` (or a tuple of arrays), or a dict
            ``{model_name: fn}`` to serve several models.
        host: interface to bind; 127.0.0.1 unless you mean to expose it.
        port: TCP port; 0 picks a free one (read it from ``.port``).
        model_name: name on the wire (default: the function's name, else "model").
        inputs / outputs: tensor specs (``TensorSpec``, ``"x:FP32:-1,64"`` or tuples) used for
            metadata and request checks; inputs default to ``fn``'s parameter names.
        numpy: give ``fn`` NumPy arrays (the default); False gives it torch tensors.
        token: shared secret; clients must send ``authorization: Bearer <token>``.
        tls_cert / tls_key: PEM paths or bytes; both or neither.
        max_message_mb: largest message received or sent, both directions.
        max_concurrency: black-box calls running at once (1: the callable need not be thread-safe).
        max_pending: RPCs admitted at once (running or waiting); more get RESOURCE_EXHAUSTED.
        allow_nonfinite: accept NaN/Inf inputs (default: INVALID_ARGUMENT).
        cost_hint: seconds per row, reported in the metadata for schedulers.
        http_port: also serve the KServe v2 REST endpoint on this port of ``host`` (0: a free
            one) with the same token, TLS and limits; needs the ``rest`` extra.
        reuse_port: share ``port`` with other processes that set it too (SO_REUSEPORT: the
            kernel spreads connections over them; ``serve --workers N``). Off by default, so a
            taken port fails loudly.
        worker: ``(index, count)``: this process is worker ``index`` of ``count`` sharing the
            port; ServerReady names it so clients can spread their connections over the workers.
    Returns:
        An :class:`OracleServer` (context manager) with ``.port``, ``.address``, ``.http_port``,
        ``.rest_url``, ``.stop()``.
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
    if http_port is not None:
        from deepzero_oracle.server.rest import require_rest_extra

        require_rest_extra()  # before anything listens
    max_bytes = int(max_message_mb * 2**20)
    servicer = OracleServicer(models, max_message_bytes=max_bytes, max_concurrency=max_concurrency,
                              worker=worker)
    options = [
        *message_limit_options(max_bytes),
        # Fail loudly if the port is taken, unless sharing it is what is asked for.
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    interceptors = [_TokenInterceptor(token)] if token else []
    # One thread per admitted RPC, so a long stream never starves health checks.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_pending + 2,
                                                    thread_name_prefix="oracle-rpc"),
                         options=options, interceptors=interceptors,
                         maximum_concurrent_rpcs=max_pending)
    server.add_generic_rpc_handlers(generic_handlers(servicer))
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
            rest = RestEndpoint(rest_app(servicer, token=token, max_body_bytes=max_bytes, max_pending=max_pending),
                                host=host, port=http_port, tls_cert=tls_cert, tls_key=tls_key)
        except BaseException:
            server.stop(0)
            raise
    return OracleServer(server, servicer, health_servicer, host, bound, tls=tls_cert is not None, rest=rest)


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


