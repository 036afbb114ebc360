"""The gRPC channel under every gRPC black box: size limits, token and TLS, a retry policy for
idempotent calls, and, given several addresses (replicas of one model), one channel that
balances calls round-robin over the healthy ones and sends a call that meets a dead or stalled
replica to another (:meth:`GrpcTransport.call`). Transports pickle and reconnect on first use.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import weakref

import grpc

from deepzero_oracle.blackbox.errors import (
    BlackBoxRemoteError,
    BlackBoxReplicasUnavailable,
    BlackBoxUnavailable,
    remote_error,
    unreachable_replicas,
)
from deepzero_oracle.wire import oracle_pb2 as pb
from deepzero_oracle.wire.constants import (
    KSERVE_SERVICE,
    ORACLE_SERVICE,
    WORKER_METADATA_KEY,
    bearer,
    check_message_mb,
    check_timeout,
    message_limit_options,
    read_pem,
    resolve_token,
)

# Codes after which an idempotent call to a replica set is sent again (to another replica).
_RETRY_ELSEWHERE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

# Channels of unpickled transports by configuration, so a worker thread that receives a fresh
# copy every step (ParallelOracle re-ships its oracle after each bind) keeps its connections:
# per process for replicas (one round robin spreads every thread's calls), per thread for one
# address (a connection per thread, spread over the workers of `serve --workers N`).
_THREAD_CHANNELS = threading.local()
_PROCESS_CHANNELS: dict = {}

# This process's connections per worker of a `serve --workers N` server, by address: the kernel
# hands each new connection to a random worker, so two connections land on one worker half the
# time; a copy's channel reconnects until its worker holds no more of them than any other.
_WORKER_LOAD: dict[str, list[int]] = {}
_WORKER_LOAD_LOCK = threading.Lock()


def _service_config(retries: int, replicas: bool = False) -> str:
    """Retry UNAVAILABLE for the idempotent methods only (never the stream). For replicas:
    round-robin over the addresses, and only over those whose health service says SERVING
    (our server reports the overall service "" NOT_SERVING from the start of a graceful
    shutdown; a server without a health service counts as healthy)."""
    config: dict = {"methodConfig": []}
    if retries > 0:
        idempotent = [{"service": KSERVE_SERVICE},
                      {"service": ORACLE_SERVICE, "method": "Describe"},
                      {"service": ORACLE_SERVICE, "method": "QueryBatch"}]
        config["methodConfig"] = [{
            "name": idempotent,
            "retryPolicy": {
                "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    if replicas:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def worker_of(channel: grpc.Channel, metadata=(), timeout: float = 5.0) -> tuple[int, int] | None:
    """``(index, count)`` of the ``serve --workers N`` worker at the other end of ``channel``'s
    connection (ServerReady's trailing metadata); None if the server does not say (one process,
    another server) or does not answer within ``timeout`` s."""
    rpc = channel.unary_unary(f"/{KSERVE_SERVICE}/ServerReady", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.ServerReadyResponse.FromString)
    try:
        _, call = rpc.with_call(pb.ServerReadyRequest(), timeout=timeout, metadata=metadata)
    except grpc.RpcError:
        return None
    for key, value in call.trailing_metadata() or ():
        if key == WORKER_METADATA_KEY:
            index, _, count = value.partition("/")
            if index.isdigit() and count.isdigit() and int(index) < int(count):
                return int(index), int(count)
    return None


def _release_worker(address: str, index: int, count: int) -> None:
    with _WORKER_LOAD_LOCK:
        load = _WORKER_LOAD.get(address)
        if load is not None and len(load) == count and load[index] > 0:
            load[index] -= 1


def channel_target(targets: list[str]) -> str:
    """One gRPC channel target for several ``host:port``: ``ipv4:A:P,B:Q`` (or ``ipv6:``), with host
    names resolved here (gRPC's ipv4/ipv6 schemes take addresses only)."""
    resolved, families = [], set()
    for target in targets:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, ValueError) as e:
            raise BlackBoxUnavailable(f"replica {target}: cannot resolve {host!r} ({e}); check the address",
                                      target=target) from None
        family, *_, address = min(infos, key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
        families.add(family)
        resolved.append(f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}")
    if len(families) > 1:
        raise ValueError(f"replicas {','.join(targets)} mix IPv4 and IPv6 addresses; give them all in one family")
    return ("ipv6:" if families == {socket.AF_INET6} else "ipv4:") + ",".join(resolved)


class GrpcTransport:
    """Reusable gRPC channel with size limits, retry policy, token and TLS, to one server or to
    replicas of one.

    With several targets, one channel balances calls round-robin over the replicas that pass
    gRPC health checks, and :meth:`call` sends an idempotent call that fails with UNAVAILABLE or
    DEADLINE_EXCEEDED again (to another replica) until ``timeout`` has passed since the first
    attempt; a stalled replica costs one deadline per call that reaches it.

    The channel opens on first use, so a transport (and a black box holding one) pickles: a copy
    sent to a thread, process or Dask worker opens its own connection there. Unpickled copies of
    a replica set share one channel per process, so its round robin spreads the calls of every
    thread over the replicas; unpickled copies of one address share one channel per thread,
    which shares no connection with other channels, so copies in different threads have
    different connections; against ``serve --workers N`` such a connection is reopened until it
    reaches a worker with the fewest of this process's connections, so N threads keep N workers
    busy (the kernel alone puts two connections on one worker half the time). Either
    way a thread that gets a new copy every step keeps its connections. The original uses
    gRPC's per-process pool.

    Args:
        target: ``host:port`` (``grpc://`` or ``grpcs://`` prefixes accepted; grpcs = TLS), or a
            list of them, one per replica (``targets``; ``target`` is then ``h1:p1,h2:p2``).
        token: shared token sent as ``authorization: Bearer <token>`` (default: $DEEPZERO_ORACLE_TOKEN).
        tls: None/False for plaintext, True for TLS with system roots, or a CA certificate
            (PEM path or bytes) to trust, e.g. a self-signed server certificate.
        tls_server_name: expected name in the server certificate, if not the target host.
        max_message_mb: message size limit, both directions.
        retries: extra attempts on UNAVAILABLE for idempotent calls (0 disables, max 4).
        wait_for_ready: wait (until the deadline) for an unreachable server instead of failing.
    """

    def __init__(self, target, *, token: str | None = None, tls=None,
                 tls_server_name: str | None = None, max_message_mb: float = 64, retries: int = 4,
                 wait_for_ready: bool = False):
        targets = [target] if isinstance(target, str) else list(target)
        if not targets:
            raise ValueError("GrpcTransport needs at least one host:port")
        for i, t in enumerate(targets):
            for scheme, secure in (("grpcs://", True), ("grpc://", None)):
                if t.startswith(scheme):
                    targets[i] = t[len(scheme):]
                    if secure and not tls:
                        tls = True
        self.targets = targets
        self.target = ",".join(targets)
        self.wait_for_ready = wait_for_ready
        token = resolve_token(token)
        self.metadata = (("authorization", bearer(token)),) if token else ()
        self.options = [
            *message_limit_options(int(check_message_mb(max_message_mb) * 2**20)),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retries, replicas=len(targets) > 1)),
            # Reconnect to a restarted server within seconds (gRPC's default backoff grows to
            # 2 minutes, which would stall a training run long after the server is back).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if tls_server_name:
            self.options.append(("grpc.ssl_target_name_override", tls_server_name))
        elif tls and len(targets) > 1:
            # An ipv4:/ipv6: target has no host name to check the certificate against.
            self.options.append(("grpc.default_authority", targets[0].rpartition(":")[0].strip("[]")))
        self.tls_roots = None if not tls else b"" if tls is True else read_pem(tls)
        self._channel = None
        self._stubs: dict = {}
        self._lock = threading.Lock()
        self._copy = False  # unpickled: shares its thread's channel (see channel)
        self.resent = 0  # attempts :meth:`call` sent again to another replica

    # -- the channel, opened on first use --------------------------------------------------
    def _open(self, target: str, options) -> grpc.Channel:
        if self.tls_roots is None:
            return grpc.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(self.tls_roots or None)
        return grpc.secure_channel(target, creds, options=options)

    @property
    def channel(self) -> grpc.Channel:
        """The channel (to every replica), opened on first use. An unpickled copy takes the
        channel of its process (replicas) or of its thread (one address) for the same
        configuration, opened with connections of its own."""
        if self._channel is None:
            with self._lock:
                if self._channel is None:
                    if self._copy:
                        key = (tuple(self.targets), tuple(self.options), self.tls_roots)
                        cache = (_PROCESS_CHANNELS if len(self.targets) > 1
                                 else _THREAD_CHANNELS.__dict__.setdefault("channels", {}))
                        if key not in cache:
                            cache[key] = (self._new_channel() if len(self.targets) > 1
                                          else self._channel_on_a_free_worker())
                        self._channel = cache[key]
                    else:
                        self._channel = self._new_channel()
        return self._channel

    def _new_channel(self) -> grpc.Channel:
        target = channel_target(self.targets) if len(self.targets) > 1 else self.targets[0]
        return self._open(target, self.options)

    def _channel_on_a_free_worker(self) -> grpc.Channel:
        """A new channel to the one address. If a worker of ``serve --workers N`` answers it,
        its connection is closed and opened again (up to ``max(16, 4 N)`` times) until it lands
        on a worker holding no more of this process's connections than any other, so threads
        with a copy each keep every worker busy."""
        attempt, limit = 0, 16
        while True:
            channel = self._new_channel()
            worker = worker_of(channel, self.metadata)
            if worker is None:
                return channel
            index, count = worker
            attempt, limit = attempt + 1, max(limit, 4 * count)
            with _WORKER_LOAD_LOCK:
                load = _WORKER_LOAD.get(self.target)
                if load is None or len(load) != count:  # a new server on this address
                    load = _WORKER_LOAD[self.target] = [0] * count
                if load[index] == min(load) or attempt >= limit:
                    load[index] += 1
                    weakref.finalize(channel, _release_worker, self.target, index, count)
                    return channel
            channel.close()

    def unary(self, service: str, method: str, response_cls):
        """A unary callable for ``/service/method`` taking a message, returning ``response_cls``."""
        key = (service, method)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = self.channel.unary_unary(
                f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString)
        return stub

    # -- calls -----------------------------------------------------------------------------
    def call(self, rpc, request, *, timeout: float, context: str, first=None):
        """One idempotent unary call (``rpc(request)``) with deadline ``timeout`` s per attempt.

        With replicas, UNAVAILABLE (backing off up to 1 s) and DEADLINE_EXCEEDED (at most once per
        replica: a stalled one) are sent again, to another replica, until ``timeout`` has passed
        since the first attempt; then `BlackBoxReplicasUnavailable` names every address. The caller
        counts the call once, however many attempts it took.

        Args:
            first: a Future of the first attempt, already sent (pipelined calls).
        Raises:
            BlackBoxRemoteError: the matching subclass (see :func:`remote_error`).
        """
        timeout = check_timeout(timeout)
        started, stalls, attempts, backoff = time.monotonic(), 0, 0, 0.1
        while True:
            attempts += 1
            try:
                if first is not None:
                    attempt, first = first, None
                    return attempt.result()
                return rpc(request, timeout=timeout, metadata=self.metadata, wait_for_ready=self.wait_for_ready)
            except grpc.RpcError as e:
                code = e.code().name if e.code() is not None else "UNKNOWN"
                if len(self.targets) == 1 or code not in _RETRY_ELSEWHERE:
                    raise self.error(e, context) from None
                stalls += code == "DEADLINE_EXCEEDED"
                waited = time.monotonic() - started
                if stalls > len(self.targets) or (code == "UNAVAILABLE" and waited + backoff > timeout):
                    raise self.replicas_error(e, context, attempts, waited) from None
                with self._lock:
                    self.resent += 1
                if code == "UNAVAILABLE":
                    time.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)

    def replicas_error(self, e: grpc.RpcError, context: str, attempts: int, waited: float):
        """No replica answered: the error names every address and what the last attempt met."""
        code = e.code().name if e.code() is not None else "UNKNOWN"
        return BlackBoxReplicasUnavailable(
            f"black box {context} at replicas {self.target}: no replica answered in {waited:.1f} s "
            f"({attempts} attempts; the last failed with {code}: {e.details() or '(no details)'}); are "
            "the servers running at those addresses? A resumable run (Trainer, `sol train`) continues "
            "from its last checkpoint once they are back", targets=self.targets, code="UNAVAILABLE",
            details=e.details() or "")

    def check_replicas(self, timeout: float = 10.0) -> None:
        """Ask each replica's health service (``""``) on a connection of its own; raise
        `BlackBoxUnavailable` naming every replica that cannot be reached or is not SERVING
        (a server without a health service passes)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        problems = []
        for target in self.targets:
            channel = self._open(target, [o for o in self.options if o[0] != "grpc.service_config"])
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=check_timeout(timeout)).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"{target} ({health_pb2.HealthCheckResponse.ServingStatus.Name(status)})")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    problems.append(f"{target} ({e.code().name}: {e.details()})")
            finally:
                channel.close()
        if problems:
            raise unreachable_replicas(self.target, problems)

    def error(self, e: grpc.RpcError, context: str = "") -> BlackBoxRemoteError:
        """A gRPC failure as the matching BlackBoxRemoteError."""
        code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
        details = e.details() if hasattr(e, "details") else str(e)
        return remote_error(code, details or "", self.target, context=context)

    def close(self) -> None:
        """Close the channel (a later call opens a new one); a copy only lets go of its thread's."""
        with self._lock:
            if self._channel is not None and not self._copy:
                self._channel.close()
            self._channel, self._stubs = None, {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_channel", "_stubs", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _channel=None, _stubs={}, _lock=threading.Lock(), _copy=True)
        if ("grpc.use_local_subchannel_pool", 1) not in self.options:
            self.options = [*self.options, ("grpc.use_local_subchannel_pool", 1)]


__all__ = ["GrpcTransport", "channel_target", "worker_of"]
