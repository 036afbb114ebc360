"""Black boxes: things that may only be queried, arrays in and arrays out.

A black box is any callable ``f(inputs) -> outputs`` on a batch: ``inputs`` is an array
shaped ``[N, *in_shape]`` (a ``torch.Tensor`` or ``numpy.ndarray``) and ``outputs`` an array
shaped ``[N, *out_shape]`` of either kind. Rows are independent. Local callables, gRPC
servers and remote model APIs all follow the same contract and raise the same errors
(:mod:`deepzero_oracle.blackbox.errors`).

One client per protocol: :class:`GrpcBlackBox` (``grpc://`` and ``kserve://`` specs) and
:class:`RestBlackBox` (``kserve+http://``), on a common base
(:mod:`deepzero_oracle.blackbox.remote`: splitting large calls, metadata, output choice);
``KServeBlackBox(url, model, protocol=...)`` returns one of them. What they share with the
server (``deepzero_oracle.server``) is in :mod:`deepzero_oracle.wire`.
"""

from deepzero_oracle.blackbox.errors import (
    BlackBoxError,
    BlackBoxInvalidArgument,
    BlackBoxNotFound,
    BlackBoxRemoteError,
    BlackBoxReplicasUnavailable,
    BlackBoxResourceExhausted,
    BlackBoxTimeout,
    BlackBoxUnauthenticated,
    BlackBoxUnavailable,
)
from deepzero_oracle.blackbox.local import LocalBlackBox, as_tensor

# The remote black boxes import grpc and the generated code (~0.1-0.2 s) or httpx: load them on
# first use.
_LAZY = {
    "GrpcBlackBox": "deepzero_oracle.blackbox.grpc",
    "KServeBlackBox": "deepzero_oracle.blackbox.kserve",
    "RestBlackBox": "deepzero_oracle.blackbox.rest",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "GrpcBlackBox",
    "KServeBlackBox",
    "LocalBlackBox",
    "RestBlackBox",
    "as_tensor",
]
