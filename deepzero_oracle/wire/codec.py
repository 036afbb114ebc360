"""Arrays <-> KServe v2 tensors, the same on the server and in the clients.

A tensor on the wire is a datatype string + an int64 shape + its values: raw little-endian
bytes (:func:`encode_raw`, :func:`decode_raw`), typed contents of an ``InferTensorContents``
message (:func:`fill_typed`, :func:`decode_typed`), or REST JSON data (:func:`json_tensor`,
:func:`decode_json`). Decoding never unpickles: raw bytes become a NumPy view of an explicit
numeric dtype, after the byte count has been checked against the shape (:func:`check_shape`);
JSON values must be numbers of the declared kind. Every failure is a
:class:`~deepzero_oracle.wire.errors.WireError` saying what was wrong.

Imports neither grpc nor the generated code (messages are read through their fields), so the
REST client stays light.
"""

from __future__ import annotations

import numpy as np
import torch

from deepzero_oracle.wire.errors import WireError

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


__all__ = [
    "DATATYPES",
    "MAX_DIMS",
    "TYPED_FIELD",
    "WireError",
    "check_shape",
    "datatype_of",
    "decode_json",
    "decode_raw",
    "decode_typed",
    "encode_raw",
    "fill_typed",
    "has_typed_contents",
    "json_tensor",
    "nonfinite_rows",
    "to_numpy",
]
