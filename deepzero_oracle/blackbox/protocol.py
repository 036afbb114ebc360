"""What the gRPC server and the remote clients share: names, credentials and the tensor codec.

* Service names: KServe v2 ``inference.GRPCInferenceService`` (:data:`KSERVE_SERVICE`), our
  mirror of it (:data:`MIRROR_SERVICE`) and ``deepzero_oracle.v1.Oracle``
  (:data:`ORACLE_SERVICE`); :data:`DEFAULT_PORT`.
* Credentials: the shared-token environment variable (:data:`TOKEN_ENV`, read by
  :func:`resolve_token`), the ``authorization: Bearer <token>`` value (:func:`bearer`), PEM
  files or bytes (:func:`read_pem`).
* gRPC message size limits (:func:`message_limit_options`) and status codes by name and by
  number (:func:`status_number`, :func:`status_name`).
* HTTP statuses <-> gRPC status names (:data:`GRPC_CODE_OF_HTTP`, :func:`http_status`), so
  the REST and gRPC endpoints and clients report the same errors.
* Arrays <-> KServe v2 tensors (datatype string + int64 shape + raw little-endian bytes, typed
  contents, or REST JSON data: :func:`decode_json`, :func:`json_tensor`). Decoding never
  unpickles: raw bytes become a NumPy view of an explicit numeric dtype, after the byte count
  has been checked against the shape; JSON values must be numbers of the declared kind.

Imports neither grpc (only the status helpers load it, when called) nor the generated code, so
the REST client stays light. The server lives in :mod:`deepzero_oracle.server`, the clients in
:mod:`deepzero_oracle.blackbox.grpc` and :mod:`deepzero_oracle.blackbox.kserve`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

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


# -- tensor codec -------------------------------------------------------------------------------
# KServe datatype -> NumPy dtype, fixed little-endian as the protocol requires.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}

# Which typed-contents field carries each datatype (FP16 exists only as raw contents).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_TYPED_FIELDS = tuple(sorted(set(TYPED_FIELD.values()))) + ("bytes_contents",)


class WireError(ValueError):
    """A tensor on the wire is malformed. ``code`` is the gRPC status name to answer with;
    ``http`` the HTTP status when it is not the usual one for ``code`` (429 for a full queue,
    where RESOURCE_EXHAUSTED otherwise means 413: a body over the limit)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", *, http: int | None = None):
        super().__init__(message)
        self.code = code
        self.http = http


def datatype_of(arr: np.ndarray) -> str:
    """KServe datatype string of a NumPy array's dtype (``float32 -> "FP32"``).

    Raises:
        WireError: for dtypes the protocol cannot carry (object, complex, strings).
    """
    name = _BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if name is None:
        raise WireError(
            f"dtype {arr.dtype} cannot be sent; use one of "
            f"{', '.join(str(d) for d in DATATYPES.values())} (e.g. float32)"
        )
    return name


def to_numpy(value, *, what: str = "input") -> np.ndarray:
    """A C-contiguous NumPy array from a tensor, ndarray, list or scalar (detached, on CPU)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise WireError(f"{what}: bfloat16 has no KServe raw layout here; convert to float32")
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":  # the wire is little-endian
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def check_shape(shape, name: str, *, batched: bool = True) -> tuple[int, ...]:
    """Validate a wire shape: non-negative ints, and a leading batch dimension if ``batched``.

    Also refuses shapes no array can have (more than :data:`MAX_DIMS` dimensions, or a size
    past NumPy's index range even when a zero dimension makes it empty), so such requests
    are INVALID_ARGUMENT rather than a server error."""
    dims = tuple(int(d) for d in shape)
    if batched and len(dims) == 0:
        raise WireError(f"tensor {name!r}: shape [] has no batch dimension; send shape [N, ...]")
    if any(d < 0 for d in dims):
        raise WireError(f"tensor {name!r}: shape {list(dims)[:8]} has a negative dimension")
    if len(dims) > MAX_DIMS:
        raise WireError(f"tensor {name!r}: shape has {len(dims)} dimensions; at most {MAX_DIMS} are supported")
    if _count(d or 1 for d in dims) > _MAX_ELEMENTS:  # NumPy checks the non-zero dimensions' product
        raise WireError(f"tensor {name!r}: shape {list(dims)} needs more elements than any array can hold")
    return dims


# Most dimensions a wire tensor may have (NumPy's own limit is 32 or 64, by version).
MAX_DIMS = 32
# Largest element count of a shape (its non-zero dimensions): any dtype's byte size still fits
# NumPy's index type.
_MAX_ELEMENTS = np.iinfo(np.intp).max // 16


def _count(dims) -> int:
    n = 1
    for d in dims:  # Python ints: a hostile shape cannot overflow the product
        n *= d
    return n


def _dtype_for(datatype: str, name: str) -> np.dtype:
    dt = DATATYPES.get(datatype)
    if dt is None:
        if datatype == "BYTES":
            raise WireError(f"tensor {name!r}: BYTES tensors are not supported; send numbers")
        if datatype == "BF16":
            raise WireError(f"tensor {name!r}: BF16 is not supported; send FP32")
        raise WireError(
            f"tensor {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    return dt


def decode_raw(raw: bytes, datatype: str, shape, name: str) -> np.ndarray:
    """Raw little-endian bytes -> array ``shape`` of ``datatype`` (a read-only view, no copy).

    Raises:
        WireError: unknown datatype, bad shape, or byte count != prod(shape) * itemsize.
    """
    dt = _dtype_for(datatype, name)
    dims = check_shape(shape, name)
    expected = _count(dims) * dt.itemsize
    if len(raw) != expected:
        raise WireError(
            f"tensor {name!r}: {len(raw)} bytes of raw contents, but shape {list(dims)} of "
            f"{datatype} needs {expected}"
        )
    if datatype == "BOOL":  # any non-zero byte is true; never trust the byte to be 0/1
        return np.frombuffer(raw, dtype=np.uint8).reshape(dims) != 0
    return np.frombuffer(raw, dtype=dt).reshape(dims)


def has_typed_contents(contents) -> bool:
    """True if an ``InferTensorContents`` message holds any value."""
    return any(len(getattr(contents, f)) for f in _TYPED_FIELDS)


def decode_typed(contents, datatype: str, shape, name: str) -> np.ndarray:
    """Typed ``InferTensorContents`` -> array ``shape`` of ``datatype``.

    Raises:
        WireError: unknown datatype, wrong field, wrong value count, or values out of range.
    """
    dt = _dtype_for(datatype, name)
    dims = check_shape(shape, name)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise WireError(f"tensor {name!r}: {datatype} must be sent as raw contents")
    values = getattr(contents, field)
    others = [f for f in _TYPED_FIELDS if f != field and len(getattr(contents, f))]
    if others:
        raise WireError(f"tensor {name!r} of {datatype} carries values in {others[0]}; use {field}")
    if len(values) != _count(dims):
        raise WireError(
            f"tensor {name!r}: {len(values)} values in {field}, but shape {list(dims)} needs "
            f"{_count(dims)}"
        )
    if dt.kind in "iu" and dt.itemsize < 4:  # the proto field is 32-bit: narrow it with a check
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dt)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise WireError(f"tensor {name!r}: values out of range for {datatype}")
        return wide.astype(dt).reshape(dims)
    return np.asarray(values, dtype=dt).reshape(dims)


# Python types a JSON value may have for each NumPy kind (bool is not an int here).
_JSON_TYPES = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}


def _flat_values(data, dims: tuple[int, ...], name: str) -> list:
    """REST ``data``: a flat list, or lists nested exactly as ``dims`` -> a flat list (row-major)."""
    if not isinstance(data, list):
        raise WireError(f"tensor {name!r}: 'data' must be a JSON array of numbers")
    if not data or not isinstance(data[0], list):
        return data
    level = [data]
    for depth, size in enumerate(dims):
        for node in level:
            if not isinstance(node, list) or len(node) != size:
                raise WireError(f"tensor {name!r}: nested 'data' does not follow shape {list(dims)} "
                                f"at depth {depth}; send a flat row-major array or nest it exactly")
        level = [child for node in level for child in node]
    return level


def decode_json(data, datatype: str, shape, name: str) -> np.ndarray:
    """REST JSON tensor ``data`` (flat or nested as the shape, row-major) -> array ``shape`` of ``datatype``.

    Raises:
        WireError: unknown datatype, bad shape, wrong value count, a value of the wrong kind
            (a string, a bool for a number, a fraction for an integer) or out of range.
    """
    dt = _dtype_for(datatype, name)
    dims = check_shape(shape, name)
    values = _flat_values(data, dims, name)
    if len(values) != _count(dims):
        raise WireError(f"tensor {name!r}: {len(values)} values in 'data', but shape {list(dims)} "
                        f"needs {_count(dims)}")
    allowed = _JSON_TYPES[dt.kind]
    kinds = set(map(type, values))
    if not kinds <= allowed:
        bad = next(v for v in values if type(v) not in allowed)
        raise WireError(f"tensor {name!r} of {datatype}: value {str(bad)[:40]!r} is a "
                        f"{type(bad).__name__}; send {' or '.join(sorted(t.__name__ for t in allowed))} values")
    try:
        return np.array(values, dtype=dt).reshape(dims)
    except OverflowError as e:
        raise WireError(f"tensor {name!r}: values out of range for {datatype}: {e}") from None


def json_tensor(name: str, arr: np.ndarray, *, numpy: bool = False) -> dict:
    """A REST JSON tensor ``{"name", "datatype", "shape", "data"}`` of ``arr [N, ...]``, with
    flat row-major ``data`` of ``prod(shape)`` values: a list (any JSON encoder), or with
    ``numpy=True`` a flat C-contiguous native-endian array for ``orjson.dumps(...,
    option=orjson.OPT_SERIALIZE_NUMPY)``. Floats go as float64 there, so they print as the
    same round-trip numbers as the list's Python floats (FP32 values stay exact)."""
    flat = arr.ravel()
    if not numpy:
        data = flat.tolist()
    elif flat.dtype.kind == "f":
        data = np.ascontiguousarray(flat, dtype=np.float64)
    else:
        data = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    return {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape), "data": data}


def encode_raw(arr: np.ndarray) -> bytes:
    """Array -> flat row-major little-endian bytes."""
    dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    return np.ascontiguousarray(arr, dtype=dt).tobytes()


def fill_typed(contents, arr: np.ndarray) -> None:
    """Write ``arr`` into the typed field of an ``InferTensorContents`` message (slow path)."""
    datatype = datatype_of(arr)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise WireError(f"{datatype} can only be sent as raw contents")
    getattr(contents, field).extend(arr.ravel().tolist())


def nonfinite_rows(arr: np.ndarray) -> np.ndarray | None:
    """Boolean mask ``[N]`` of rows holding NaN or Inf; None for non-float arrays (no check)."""
    if arr.dtype.kind != "f":
        return None
    finite = np.isfinite(arr)
    return ~finite.reshape(arr.shape[0], -1).all(axis=1)
