"""Every error of the black-box (client) layer: each says what was wrong and what to do.

:class:`BlackBoxError` is what any black box raises, local or remote; the remote clients
(gRPC, REST) raise its :class:`BlackBoxRemoteError` subclasses, so code written against a
local black box catches them unchanged. ``code`` is the gRPC status name (``"UNAVAILABLE"``),
also for REST, where HTTP statuses are mapped to the matching gRPC code. (The engine's own
errors are in :mod:`deepzero_oracle.errors`, the wire's in :mod:`deepzero_oracle.wire.errors`.)
"""

from __future__ import annotations

from deepzero_oracle.wire.constants import TOKEN_ENV


class BlackBoxError(RuntimeError):
    """A black box failed to answer a query, or answered with something unusable."""


class BlackBoxRemoteError(BlackBoxError):
    """A remote black box answered with an error, or could not be asked.

    Attributes:
        code: gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ...).
        details: the server's own message (or the transport's).
        target: the address that was queried.
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, details: str = "", target: str = ""):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details
        self.target = target


class BlackBoxUnavailable(BlackBoxRemoteError):
    """The server could not be reached (down, restarting, wrong address) even after retries.

    To wait for a restarting server instead (until the call's deadline), build the black box
    with ``wait_for_ready=True``."""

    code = "UNAVAILABLE"


class BlackBoxReplicasUnavailable(BlackBoxUnavailable):
    """No replica of a black box answered before the deadline (all down, stalled or restarting).

    Attributes:
        targets: the ``host:port`` of every replica that was tried.
    """

    def __init__(self, message: str, *, targets: list[str], code: str | None = None, details: str = ""):
        super().__init__(message, code=code, details=details, target=",".join(targets))
        self.targets = list(targets)


class BlackBoxTimeout(BlackBoxRemoteError):
    """No answer before the deadline (``timeout=``)."""

    code = "DEADLINE_EXCEEDED"


class BlackBoxInvalidArgument(BlackBoxRemoteError):
    """The query was malformed or rejected: datatype, shape, byte count, NaN/Inf inputs."""

    code = "INVALID_ARGUMENT"


class BlackBoxResourceExhausted(BlackBoxRemoteError):
    """A message exceeded the size limit, or the server was at its concurrency limit."""

    code = "RESOURCE_EXHAUSTED"


class BlackBoxUnauthenticated(BlackBoxRemoteError):
    """Missing or wrong shared token."""

    code = "UNAUTHENTICATED"


class BlackBoxNotFound(BlackBoxRemoteError):
    """The server does not serve the requested model (name or version)."""

    code = "NOT_FOUND"


_HINTS = {
    "UNAVAILABLE": (BlackBoxUnavailable,
                    "is the server running at that address (`deepzero-oracle serve ... --port P`)? "
                    "Idempotent calls were already retried"),
    "DEADLINE_EXCEEDED": (BlackBoxTimeout,
                          "raise timeout=, or send fewer rows per call (max_batch_rows=)"),
    "INVALID_ARGUMENT": (BlackBoxInvalidArgument,
                         "fix the query (datatype, shape, finite values) to match the model's "
                         "metadata"),
    "OUT_OF_RANGE": (BlackBoxInvalidArgument, "fix the query"),
    "FAILED_PRECONDITION": (BlackBoxInvalidArgument, "fix the query"),
    "RESOURCE_EXHAUSTED": (BlackBoxResourceExhausted,
                           "send fewer rows per call (max_batch_rows=) or raise the message limit "
                           "on both ends (max_message_mb= here, --max-message-mb on the server); "
                           "if the server is at its concurrency limit, retry later"),
    "UNAUTHENTICATED": (BlackBoxUnauthenticated,
                        f"pass token= (or set {TOKEN_ENV}) to the server's --token"),
    "PERMISSION_DENIED": (BlackBoxUnauthenticated, "check the token"),
    "NOT_FOUND": (BlackBoxNotFound, "check model= (and version=) against the server's models"),
}


def unreachable_replicas(target: str, problems: list[str]) -> BlackBoxUnavailable:
    """The error for replicas found unreachable before any work: ``problems`` name each address
    and what it met (``"HOST:PORT (UNAVAILABLE: ...)"``); ``target`` is every address."""
    return BlackBoxUnavailable(
        f"black box replicas {target}: cannot reach {'; '.join(problems)}. Start the server(s) there "
        "(`deepzero-oracle serve ... --port P`) or leave the address(es) out of the spec",
        code="UNAVAILABLE", target=target)


def remote_error(code: str, details: str, target: str, *, context: str = "") -> BlackBoxRemoteError:
    """Build the error for gRPC status ``code`` (a name) with the server's ``details``.

    The message names the target, the status, what the server said and what to do.
    """
    cls, hint = _HINTS.get(code, (BlackBoxRemoteError, "see the server's log"))
    where = f"{context} at {target}" if context else target
    message = f"black box {where} failed with {code}: {details or '(no details)'}; {hint}"
    return cls(message, code=code, details=details, target=target)


__all__ = [
    "BlackBoxError",
    "BlackBoxInvalidArgument",
    "BlackBoxNotFound",
    "BlackBoxRemoteError",
    "BlackBoxReplicasUnavailable",
    "BlackBoxResourceExhausted",
    "BlackBoxTimeout",
    "BlackBoxUnauthenticated",
    "BlackBoxUnavailable",
    "remote_error",
    "unreachable_replicas",
]
