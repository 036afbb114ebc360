"""Protocol constants both ends share, and the helpers around them (no NumPy, no grpc at import).

* Service names: KServe v2 ``inference.GRPCInferenceService`` (:data:`KSERVE_SERVICE`), our
  mirror of it (:data:`MIRROR_SERVICE`) and ``deepzero_oracle.v1.Oracle``
  (:data:`ORACLE_SERVICE`); :data:`DEFAULT_PORT`.
* Credentials: the shared-token environment variable (:data:`TOKEN_ENV`, read by
  :func:`resolve_token`), the ``authorization: Bearer <token>`` value (:func:`bearer`), PEM
  files or bytes (:func:`read_pem`, :func:`pem_file`).
* Deadlines and sizes: :data:`NO_DEADLINE_SECONDS` and :func:`check_timeout`,
  :data:`MAX_MESSAGE_MB` and :func:`check_message_mb`, gRPC message size options
  (:func:`message_limit_options`).
* Status mapping: gRPC status codes by name and by number (:func:`status_number`,
  :func:`status_name`; they load grpc when called), HTTP statuses <-> gRPC status names
  (:data:`GRPC_CODE_OF_HTTP`, :func:`http_status`), so the REST and gRPC endpoints and clients
  report the same errors.
"""

from __future__ import annotations

import os

KSERVE_SERVICE = "inference.GRPCInferenceService"
MIRROR_SERVICE = "deepzero_oracle.v1.GRPCInferenceService"
ORACLE_SERVICE = "deepzero_oracle.v1.Oracle"
DEFAULT_PORT = 50051
TOKEN_ENV = "DEEPZERO_ORACLE_TOKEN"
# Trailing metadata of ServerReady from a worker of `serve --workers N`: "index/count", so a
# client can spread its connections over the processes that share one port.
WORKER_METADATA_KEY = "deepzero-oracle-worker"
# The KServe v2 REST binary-data extension: the length of the JSON header that precedes the
# raw tensor bytes in a request or response body.
BINARY_HEADER = "Inference-Header-Content-Length"

# HTTP status -> the gRPC status it means (so REST and gRPC raise the same errors).
GRPC_CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
    502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
# gRPC status name -> the HTTP status the REST endpoint answers with.
_HTTP_OF_CODE = {
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 413, "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def http_status(code: str) -> int:
    """The HTTP status for gRPC status name ``code`` (``"NOT_FOUND" -> 404``; 500 if unmapped)."""
    return _HTTP_OF_CODE.get(code, 500)


def resolve_token(token: str | None) -> str | None:
    """``token`` if given, else ``$DEEPZERO_ORACLE_TOKEN``; None when neither is set (or empty)."""
    return token if token is not None else os.environ.get(TOKEN_ENV) or None


def bearer(token: str) -> str:
    """The ``authorization`` metadata/header value that carries ``token``."""
    return f"Bearer {token}"


def read_pem(value: str | bytes | os.PathLike) -> bytes:
    """PEM contents: ``value`` itself if bytes, else the file at that path."""
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def pem_file(value: str | bytes | os.PathLike, path: str) -> str:
    """A file path holding the PEM ``value``: ``value`` itself if it is a path, else ``path``
    with the bytes written to it, private to this user (for APIs that only read files)."""
    if not isinstance(value, bytes):
        return os.fspath(value)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return path


# Durations longer than this are treated as "no deadline" (a client's timeout is clamped to it;
# a server sees a caller without a deadline as one with an effectively infinite one). gRPC
# turns deadlines of ~1e10 s and more into already-passed ones, and Python's locks refuse
# timeouts past the platform's time_t, so no duration above this reaches either.
NO_DEADLINE_SECONDS = 30 * 86400.0


def check_timeout(value, name: str = "timeout") -> float:
    """A caller's timeout in seconds, checked: a positive number; None or anything above
    :data:`NO_DEADLINE_SECONDS` (inf included) means "no deadline" and gives that cap.

    Raises:
        ValueError: zero, negative, NaN, or not a number (naming ``name``).
    """
    if value is None:
        return NO_DEADLINE_SECONDS
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds (or None: no deadline), got {value!r}") from None
    if not seconds > 0:  # also NaN
        raise ValueError(f"{name} must be a positive number of seconds (or None: no deadline), got {value!r}")
    return min(seconds, NO_DEADLINE_SECONDS)


# gRPC's message size limits are C ints: 2 GiB and more does not fit.
MAX_MESSAGE_MB = 2047.0


def check_message_mb(value, name: str = "max_message_mb") -> float:
    """A message size limit in MiB, checked: a number in (0, :data:`MAX_MESSAGE_MB`].

    Raises:
        ValueError: anything else (naming ``name``), e.g. 0, negative, NaN, inf, 4096.
    """
    try:
        mb = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of MiB, got {value!r}") from None
    if not 0 < mb <= MAX_MESSAGE_MB or mb * 2**20 < 1:
        raise ValueError(f"{name} must be more than 0 and at most {MAX_MESSAGE_MB:.0f} MiB (gRPC's limit), "
                         f"got {value!r}")
    return mb


def message_limit_options(max_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel/server options that cap received and sent messages at ``max_bytes``."""
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def status_number(name: str) -> int:
    """The number of the gRPC status called ``name`` (``"INVALID_ARGUMENT" -> 3``)."""
    import grpc  # here, not at the top: the REST client must not need grpc

    return grpc.StatusCode[name].value[0]


def status_name(number: int) -> str:
    """The name of gRPC status ``number`` (``3 -> "INVALID_ARGUMENT"``); "UNKNOWN" if none."""
    import grpc

    return next((c.name for c in grpc.StatusCode if c.value[0] == number), "UNKNOWN")


__all__ = [
    "BINARY_HEADER",
    "DEFAULT_PORT",
    "GRPC_CODE_OF_HTTP",
    "KSERVE_SERVICE",
    "MAX_MESSAGE_MB",
    "MIRROR_SERVICE",
    "NO_DEADLINE_SECONDS",
    "ORACLE_SERVICE",
    "TOKEN_ENV",
    "WORKER_METADATA_KEY",
    "bearer",
    "check_message_mb",
    "check_timeout",
    "http_status",
    "message_limit_options",
    "pem_file",
    "read_pem",
    "resolve_token",
    "status_name",
    "status_number",
]
