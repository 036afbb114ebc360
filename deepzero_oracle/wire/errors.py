"""The error of the wire layer: a malformed tensor or request, with the status to answer."""

from __future__ import annotations


class WireError(ValueError):
    """A tensor on the wire is malformed. ``code`` is the gRPC status name to answer with;
    ``http`` the HTTP status when it is not the usual one for ``code`` (429 for a full queue,
    where RESOURCE_EXHAUSTED otherwise means 413: a body over the limit)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", *, http: int | None = None):
        super().__init__(message)
        self.code = code
        self.http = http


__all__ = ["WireError"]
