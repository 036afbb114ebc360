"""What the server knows about the callables it serves: tensor specs and served models.

A :class:`ServedModel` wraps one callable ``fn(*inputs [N, ...]) -> [N, ...]`` (or a tuple of
such arrays): it matches request tensors to the callable's arguments, checks them against the
declared :class:`TensorSpec` s, runs the callable and keeps its cost figures and what its calls
have shown (for the metadata). The model host (:mod:`deepzero_oracle.server.host`) calls it for
both endpoints, :mod:`deepzero_oracle.server.servicer` (gRPC) and
:mod:`deepzero_oracle.server.rest` (REST).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from deepzero_oracle.wire.codec import DATATYPES, datatype_of, nonfinite_rows, to_numpy
from deepzero_oracle.wire.errors import WireError

log = logging.getLogger(__name__)

# The one version every served model answers to.
MODEL_VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """What a model declares about one input or output tensor.

    Args:
        name: tensor name on the wire.
        datatype: KServe datatype (``"FP32"``); None accepts any numeric datatype.
        shape: full shape including the batch dimension, -1 for any size (``(-1, 64)``);
            None leaves the shape undeclared.
    """

    name: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        """Parse ``NAME[:DATATYPE[:D0,D1,...]]``, e.g. ``x:FP32:-1,64``."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"tensor spec {text!r}: expected NAME[:DATATYPE[:D0,D1,...]]")
        datatype = parts[1].upper() if len(parts) > 1 and parts[1] else None
        if datatype is not None and datatype not in DATATYPES:
            raise ValueError(f"tensor spec {text!r}: unknown datatype; use one of {', '.join(DATATYPES)}")
        shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 and parts[2] else None
        return cls(parts[0], datatype, shape)

    @classmethod
    def coerce(cls, value) -> "TensorSpec":
        """A TensorSpec from a spec, a ``"NAME:DT:SHAPE"`` string or a ``(name, dt, shape)`` tuple."""
        if isinstance(value, TensorSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        items = tuple(value)
        if not 1 <= len(items) <= 3:
            raise ValueError(f"tensor spec {value!r}: expected (name, datatype, shape)")
        datatype = items[1] if len(items) > 1 else None
        shape = items[2] if len(items) > 2 else None
        return cls(items[0], datatype, tuple(shape) if shape is not None else None)


class CallError(Exception):
    """The black box itself failed on a batch (not the request). ``code``: gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServedModel:
    """One callable behind the server, with its declared tensors and running cost figures.

    Args:
        name: model name on the wire.
        fn: ``fn(*inputs [N, ...]) -> [N, ...]`` or a tuple of such arrays.
        inputs / outputs: TensorSpec-likes; inputs default to ``fn``'s positional parameters.
        numpy: pass ``numpy.ndarray`` inputs (the default); False passes ``torch.Tensor`` s.
        allow_nonfinite: accept NaN/Inf inputs instead of answering INVALID_ARGUMENT.
        cost_hint: declared seconds per row, reported in the metadata.

    The metadata reports each tensor as declared; what a declaration leaves open (the datatype,
    the shape, or a whole undeclared output) is filled in from the last successful call: its
    datatype and its shape with the batch dimension as -1. Before the first call an undeclared
    tensor reports datatype "" (any numeric datatype accepted) and shape [] (rank not declared),
    and undeclared outputs are not listed. Observations never become checks: only declarations do.
    """

    def __init__(self, name: str, fn: Callable, *, inputs=None, outputs=None, numpy: bool = True,
                 allow_nonfinite: bool = False, cost_hint: float | None = None):
        if not callable(fn):
            raise TypeError(f"model {name!r}: expected a callable, got {type(fn).__name__}")
        self.name, self.fn, self.numpy = name, fn, numpy
        self.allow_nonfinite = allow_nonfinite
        self.cost_hint = float(cost_hint or 0.0)
        if inputs is not None:
            self.inputs = [TensorSpec.coerce(s) for s in inputs]
            self.arity: int | None = len(self.inputs)
        else:
            names, self.arity = _positional_names(fn)
            self.inputs = [TensorSpec(n) for n in names]
        self.outputs = [TensorSpec.coerce(s) for s in outputs] if outputs is not None else None
        self._seen_inputs: list[TensorSpec] | None = None
        self._seen_outputs: list[TensorSpec] | None = None
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.rows = 0

    # -- metadata ------------------------------------------------------------------------
    def input_specs(self) -> list[TensorSpec]:
        """The inputs as declared, completed by what the calls so far have shown."""
        with self._lock:
            return _completed(self.inputs, self._seen_inputs)

    def output_specs(self) -> list[TensorSpec]:
        """Declared outputs completed by observation, else those the calls so far returned."""
        with self._lock:
            if self.outputs is None:
                return list(self._seen_outputs or [])
            return _completed(self.outputs, self._seen_outputs)

    def measured_seconds_per_row(self) -> float:
        """Mean seconds per row of the successful calls so far (0 before the first)."""
        with self._lock:
            return self.seconds / self.rows if self.rows else 0.0

    def metadata(self) -> dict:
        """KServe v2 model metadata ``{"name", "versions", "platform", "inputs", "outputs",
        "parameters"}``; each tensor is ``{"name", "datatype", "shape"}`` (-1: any size)."""
        def tensor(spec: TensorSpec) -> dict:
            return {"name": spec.name, "datatype": spec.datatype or "",
                    "shape": list(spec.shape) if spec.shape is not None else []}
        return {
            "name": self.name, "versions": [MODEL_VERSION], "platform": "deepzero-oracle",
            "inputs": [tensor(s) for s in self.input_specs()],
            "outputs": [tensor(s) for s in self.output_specs()],
            "parameters": {"cost_hint_seconds_per_row": self.cost_hint,
                           "measured_seconds_per_row": self.measured_seconds_per_row(),
                           "allow_nonfinite": self.allow_nonfinite},
        }

    # -- requests ------------------------------------------------------------------------
    def order_inputs(self, names: list[str], arrays: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        """Match request tensors to the callable's arguments and check declared specs.

        By name when every request name is a declared input name, else by position.
        Returns ``(names, arrays)`` in call order.
        """
        if self.arity is not None and len(arrays) != self.arity:
            expected = [s.name for s in self.inputs]
            raise WireError(f"model {self.name!r} takes {self.arity} input tensor(s) {expected}, "
                            f"got {len(arrays)} {names}")
        if not arrays:
            raise WireError(f"model {self.name!r}: the request has no input tensors")
        declared = [s.name for s in self.inputs]
        if self.arity is not None and sorted(names) == sorted(declared) and len(set(names)) == len(names):
            arrays = [arrays[names.index(n)] for n in declared]
            names = declared
        rows = arrays[0].shape[0]
        for name, arr in zip(names, arrays):
            if arr.shape[0] != rows:
                raise WireError(f"input {name!r} has {arr.shape[0]} rows but input {names[0]!r} "
                                f"has {rows}; all inputs need the same batch size")
        if rows == 0:
            raise WireError("the request has 0 rows; send at least one row")
        if self.arity is not None:
            for spec, arr in zip(self.inputs, arrays):
                self._check_spec(spec, arr)
        return names, arrays

    def _check_spec(self, spec: TensorSpec, arr: np.ndarray) -> None:
        if spec.datatype is not None and datatype_of(arr) != spec.datatype:
            raise WireError(f"input {spec.name!r} is {datatype_of(arr)} but model {self.name!r} "
                            f"expects {spec.datatype}")
        if spec.shape is not None:
            ok = len(spec.shape) == arr.ndim and all(d in (-1, a) for d, a in zip(spec.shape, arr.shape))
            if not ok:
                raise WireError(f"input {spec.name!r} has shape {list(arr.shape)} but model "
                                f"{self.name!r} expects {list(spec.shape)} (-1: any)")

    def nonfinite(self, names: list[str], arrays: list[np.ndarray]) -> tuple[np.ndarray | None, str]:
        """Mask ``[N]`` of rows with NaN/Inf in any float input (None if all finite or allowed)."""
        if self.allow_nonfinite:
            return None, ""
        mask, where = None, ""
        for name, arr in zip(names, arrays):
            bad = nonfinite_rows(arr)
            if bad is not None and bad.any():
                where = where or name
                mask = bad if mask is None else mask | bad
        return mask, where

    def call(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the callable on ``arrays`` (each ``[N, ...]``); return its outputs ``[N, ...]``.

        Raises:
            CallError: the callable raised, or answered with the wrong number of rows.
        """
        rows = arrays[0].shape[0]
        # Hand the callable writable copies: it may modify its inputs, and the decoded
        # arrays are read-only views of the request bytes.
        args = [a if a.flags.writeable else a.copy() for a in arrays]
        if not self.numpy:
            args = [torch.from_numpy(a) for a in args]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                answer = self.fn(*args)
        except ValueError as e:
            raise CallError("INVALID_ARGUMENT", f"black box {self.name!r} rejected the input: "
                            f"{type(e).__name__}: {e}") from e
        except Exception as e:  # the callable's own bug: report, keep serving
            log.exception("black box %r raised", self.name)
            raise CallError("INTERNAL", f"black box {self.name!r} raised {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - start
        answers = answer if isinstance(answer, tuple) else (answer,)
        outs = []
        for i, a in enumerate(answers):
            try:
                arr = to_numpy(a, what=f"output {i}")
                datatype_of(arr)
            except (WireError, TypeError, ValueError) as e:
                raise CallError("INTERNAL", f"black box {self.name!r} output {i}: {e}") from e
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise CallError("INTERNAL", f"black box {self.name!r} returned shape {list(arr.shape)} "
                                f"for {rows} input rows; it must return one row per input row")
            outs.append(arr)
        with self._lock:
            self.seconds += elapsed
            self.rows += rows
            self._seen_inputs = _observed([s.name for s in self.inputs], arrays)
            self._seen_outputs = _observed(self.output_names(len(outs)), outs)
        return outs

    def output_names(self, count: int) -> list[str]:
        """Wire names of ``count`` outputs: the declared ones, else ``output_0``, ``output_1``..."""
        if self.outputs is not None and len(self.outputs) == count:
            return [s.name for s in self.outputs]
        return [f"output_{i}" for i in range(count)]


def _observed(names: list[str], arrays: list[np.ndarray]) -> list[TensorSpec]:
    """What one call showed of its tensors: names, datatypes and shapes with the batch as -1."""
    return [TensorSpec(n, datatype_of(a), (-1,) + a.shape[1:]) for n, a in zip(names, arrays)]


def _completed(declared: list[TensorSpec], seen: list[TensorSpec] | None) -> list[TensorSpec]:
    """Declared specs with the fields they leave open (None) taken from observation."""
    if seen is None or len(seen) != len(declared):
        return list(declared)
    return [TensorSpec(d.name, d.datatype or o.datatype, d.shape if d.shape is not None else o.shape)
            for d, o in zip(declared, seen)]


def _positional_names(fn: Callable) -> tuple[list[str], int | None]:
    """Names and count of ``fn``'s required positional parameters (None count: any)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ["input_0"], None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return ["input_0"], None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty]
    if not names:
        return ["input_0"], None
    return names, len(names)
