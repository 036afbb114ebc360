"""The in-process black box and the conversions every black box shares."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class BlackBoxError(RuntimeError):
    """A black box failed to answer a query, or answered with something unusable."""


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
        fn: ``fn(inputs [N, ...]) -> outputs [N, ...]``.
        numpy: if True, ``fn`` receives a ``numpy.ndarray`` (a detached copy), otherwise a
            ``torch.Tensor`` without gradient tracking.
    Calling it returns a ``torch.Tensor`` shaped ``[N, ...]``.
    """

    def __init__(self, fn: Callable, *, numpy: bool = False):
        if not callable(fn):
            raise TypeError(f"LocalBlackBox needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.numpy = numpy
        self.calls = 0
        self.rows = 0

    def __call__(self, inputs) -> torch.Tensor:
        inputs = as_tensor(inputs).detach()
        self.calls += 1
        self.rows += int(inputs.shape[0]) if inputs.ndim else 1
        with torch.no_grad():
            answer = self.fn(inputs.cpu().numpy() if self.numpy else inputs)
        out = as_tensor(answer)
        if out.ndim == 0 or out.shape[0] != inputs.shape[0]:
            raise BlackBoxError(
                f"black box {getattr(self.fn, '__name__', self.fn)!r} returned shape "
                f"{tuple(out.shape)} for {inputs.shape[0]} input rows; it must return one row per input row"
            )
        return out
