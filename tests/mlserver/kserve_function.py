"""The black box served by MLServer in tests/test_kserve.py, and run in-process there too.

Pure NumPy and element-wise (+, -, *, one rounding each), so two NumPy builds in two virtual
environments give bit-identical answers.
"""

import numpy as np


def affine(x: np.ndarray) -> np.ndarray:
    """``x [N, ...]`` (float) -> ``x * x * 0.5 - 3 * x + 1`` of the same shape and dtype."""
    x = np.asarray(x)
    return x * x * x.dtype.type(0.5) - x.dtype.type(3) * x + x.dtype.type(1)
