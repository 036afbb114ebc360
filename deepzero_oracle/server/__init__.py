"""Serve any black box over gRPC (KServe v2, plus batched and streamed oracle queries) and REST.

    deepzero-oracle serve MODULE:CALLABLE --port 50051 [--http-port 8000]
    python -m deepzero_oracle.server MODULE:CALLABLE --port 50051      (same, without the CLI)

or, in Python::

    with serve_blackbox(fn, port=0) as server:       # fn(x [N, ...]) -> y [N, ...]
        box = GrpcBlackBox(server.address)
        y = box(x)

The callable follows the black-box contract: ``f(*inputs) -> outputs``, each input a NumPy
array ``[N, ...]`` (torch tensors with ``numpy=False`` / ``serve --torch``), returning one
array ``[N, ...]`` (NumPy or torch) or a tuple of them. The server answers

* ``inference.GRPCInferenceService`` (KServe v2: ServerLive/Ready, ModelReady, ServerMetadata,
  ModelMetadata, ModelInfer, ModelStatistics), under the standard name and under
  ``deepzero_oracle.v1.GRPCInferenceService``;
* ``deepzero_oracle.v1.Oracle`` (Describe, QueryBatch, QueryStream): many queries per call,
  in-band per-query errors;
* ``grpc.health.v1.Health`` and server reflection;
* with ``http_port`` / ``--http-port``: the KServe v2 REST protocol (:mod:`.rest`), JSON or
  binary tensors, with the same models, token, TLS and limits;
* with the ``metrics`` extra: Prometheus metrics (``GET /metrics`` on the REST port,
  ``metrics_port`` / ``--metrics-port``; :mod:`.metrics`).

SIGTERM (``OracleServer.stop``) drains: NOT_SERVING first, new requests refused, running ones
given the grace period.

Bad requests get precise statuses and never take the server down: INVALID_ARGUMENT for a
malformed protobuf, datatype, shape, byte count or NaN/Inf input; RESOURCE_EXHAUSTED for
messages over the size limit (on both ends) or when the server is full; UNAUTHENTICATED for a
missing or wrong token; NOT_FOUND for an unknown model. Nothing from the wire is unpickled.

Modules: ``deepzero_oracle.server.specs`` (what is served), ``.host`` (the model host: model
lookup, request validation, inference under the concurrency limit, telemetry, metadata and
statistics; no transport), ``.servicer`` (the gRPC endpoint: protobuf <-> host), ``.rest`` (the
REST endpoint: JSON or binary tensors <-> host), ``.lifecycle`` (builds one host and both
endpoints over it; starting and stopping a server), ``.metrics`` (statistics, Prometheus
metrics, drain state), ``.cli`` (the ``serve`` subcommand). What the clients share with the
server (service names, token variable, tensor codec, WireError) is in :mod:`deepzero_oracle.wire`.
"""

from deepzero_oracle.server.cli import register
from deepzero_oracle.blackbox.spec import load_callable
from deepzero_oracle.server.lifecycle import OracleServer, serve_blackbox
from deepzero_oracle.server.specs import ServedModel, TensorSpec

__all__ = ["OracleServer", "ServedModel", "TensorSpec", "load_callable", "register", "serve_blackbox"]
