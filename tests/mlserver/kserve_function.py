"""The black boxes served by MLServer in tests/serving/test_kserve.py, and run in-process there too.

Pure NumPy and element-wise (+, -, *, one rounding each; np.roll only moves values), so two
NumPy builds in two virtual environments give bit-identical answers.
"""

import numpy as np


def affine(x: np.ndarray) -> np.ndarray:
    """``x [N, ...]`` (float) -> ``x * x * 0.5 - 3 * x + 1`` of the same shape and dtype."""
    x = np.asarray(x)
    return x * x * x.dtype.type(0.5) - x.dtype.type(3) * x + x.dtype.type(1)


def step(state: np.ndarray, params: np.ndarray) -> np.ndarray:
    """A solver step: ``state [N, C, H, W]`` float64, ``params [N, 2]`` (diffusion, decay) ->
    the next state ``[N, C, H, W]`` (explicit periodic diffusion with a quadratic decay)."""
    state, params = np.asarray(state), np.asarray(params)
    diffusion, decay = params[:, 0, None, None, None], params[:, 1, None, None, None]
    laplacian = (np.roll(state, 1, -1) + np.roll(state, -1, -1) + np.roll(state, 1, -2)
                 + np.roll(state, -1, -2) - 4.0 * state)
    return state + diffusion * laplacian - decay * state * state
