"""The in-process black box and the conversions every black box shares (its errors are in
:mod:`deepzero_oracle.blackbox.errors`)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from deepzero_oracle.blackbox.errors import BlackBoxError


def as_tensor(value, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Convert a black box's answer (tensor, ndarray, list or scalar) to a tensor.

    NumPy arrays are wrapped without a copy where the dtype allows it.
    """
    if isinstance(value, torch.Tensor):
        out = value
    elif isinstance(value, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(value))
    else:
        out = torch.as_tensor(value)
    return out.to(dtype=dtype or out.dtype, device=device)


class LocalBlackBox:
    """An in-process callable used as a black box: only its outputs are ever seen.

    Args:
        fn: ``fn(*inputs [N, ...]) -> outputs [N, ...]`` (one input or several, e.g. a solver's
            ``state`` and ``params``).
        numpy: if True, ``fn`` receives ``numpy.ndarray`` inputs (detached copies), otherwise
            ``torch.Tensor`` inputs without gradient tracking.
    Calling it returns a ``torch.Tensor`` shaped ``[N, ...]``. ``calls`` and ``rows`` count what
    it was sent.
    """

    def __init__(self, fn: Callable, *, numpy: bool = False):
        if not callable(fn):
            raise TypeError(f"LocalBlackBox needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.numpy = numpy
        self.calls = 0
        self.rows = 0

    def __call__(self, *inputs) -> torch.Tensor:
        if not inputs:
            raise TypeError("a black box is called with at least one input [N, ...]")
        tensors = [as_tensor(x).detach() for x in inputs]
        n = int(tensors[0].shape[0]) if tensors[0].ndim else 1
        self.calls += 1
        self.rows += n
        with torch.no_grad():
            answer = self.fn(*(t.cpu().numpy() if self.numpy else t for t in tensors))
        out = as_tensor(answer)
        if out.ndim == 0 or out.shape[0] != n:
            raise BlackBoxError(
                f"black box {getattr(self.fn, '__name__', self.fn)!r} returned shape "
                f"{tuple(out.shape)} for {n} input rows; it must return one row per input row"
            )
        return out

    def metadata(self) -> None:
        """An in-process function declares no tensor metadata (remote black boxes do)."""
        return None

    def close(self) -> None:
        """Nothing to release (remote black boxes close their connection)."""

    def __enter__(self) -> "LocalBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["LocalBlackBox", "as_tensor"]
