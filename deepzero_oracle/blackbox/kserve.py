"""``KServeBlackBox``: a model served by any KServe v2 server (MLServer, Triton, KServe, ours),
by URL and protocol. A factory: it returns the client of that protocol.

    box = KServeBlackBox("127.0.0.1:8081", "my-model")                          # GrpcBlackBox
    box = KServeBlackBox("http://127.0.0.1:8080", "my-model", protocol="rest")  # RestBlackBox
    y = box(x)                                                    # x [N, ...] -> y [N, ...]

Use :class:`~deepzero_oracle.blackbox.grpc.GrpcBlackBox` or
:class:`~deepzero_oracle.blackbox.rest.RestBlackBox` directly for their other options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepzero_oracle.blackbox.grpc import GrpcBlackBox
    from deepzero_oracle.blackbox.rest import RestBlackBox

PROTOCOLS = ("grpc", "rest")


# The name of a class once: users' code calls it by that name.
def KServeBlackBox(url, model: str, *, protocol: str = "grpc", version: str = "", timeout: float = 30.0,  # noqa: N802
                   token: str | None = None, tls=None, input_names: list[str] | None = None,
                   output_names: list[str] | None = None, max_batch_rows: int = 65536,
                   max_message_mb: float = 64, retries: int = 4,
                   wait_for_ready: bool = False) -> GrpcBlackBox | RestBlackBox:
    """The black box ``box(*inputs [N, ...]) -> [N, ...]`` of a KServe v2 model.

    Args:
        url: ``host:port`` (gRPC) or ``http(s)://host:port`` (REST); a list of them for replicas
            of one model.
        model: model name on the server.
        protocol: "grpc" (raw contents; fastest): a ``GrpcBlackBox`` sending one chunk at a time
            (KServe servers typically run one call per model at a time); or "rest" (JSON): a
            ``RestBlackBox`` (needs the ``rest`` extra).
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
    Returns:
        A ``GrpcBlackBox`` or a ``RestBlackBox``; both are context managers.
    Raises:
        ValueError: an unknown ``protocol``, no address, or ``wait_for_ready`` with REST.
        MissingExtra: ``protocol="rest"`` without the ``rest`` extra.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
    url = url if isinstance(url, str) else list(url)
    if not url:
        raise ValueError("KServeBlackBox needs at least one address")
    common = dict(version=version, timeout=timeout, token=token, tls=tls, input_names=input_names,
                  output_names=output_names, max_batch_rows=max_batch_rows, max_message_mb=max_message_mb,
                  retries=retries)
    if protocol == "rest":
        if wait_for_ready:
            raise ValueError("wait_for_ready is a gRPC option; over REST, calls are retried (retries=) "
                             "until the timeout")
        from deepzero_oracle.blackbox.rest import RestBlackBox  # gRPC users never import httpx

        return RestBlackBox(url, model, **common)
    from deepzero_oracle.blackbox.grpc import GrpcBlackBox  # REST users never import grpc

    return GrpcBlackBox(url, model=model, wait_for_ready=wait_for_ready, max_inflight=1, **common)


__all__ = ["KServeBlackBox", "PROTOCOLS"]
