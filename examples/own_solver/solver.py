"""A user's own solver: 2D advection-diffusion with logistic growth on a periodic unit square,

    du/dt + a (cos 30deg, sin 30deg) . grad u = D lap(u) + u (1 - u),      params [a, D] (K = 2)

- ``source_step``: the cheap solver, 16 x 16 cells, one explicit step of DT, first-order upwind
  advection (whose numerical diffusion is the error a corrector can learn);
- ``reference_step``: the same scheme on 64 x 64 cells with 4 substeps of DT / 4; ``downsample``
  averages 4 x 4 blocks onto the source grid.

Plain NumPy, written with operations NumPy and torch share: NumPy arrays in give NumPy arrays out
(what ``deepzero-oracle serve solver:source_step`` serves), torch tensors in give torch tensors out
with a gradient path (what FO-SOL needs in process).
"""

from __future__ import annotations

import numpy as np

SOURCE_CELLS, FACTOR, DT = 16, 4, 0.02
DIRECTION = (np.cos(np.pi / 6), np.sin(np.pi / 6))  # (x, y): both positive, so upwind looks west/south


def _step(u, params, cells: int, dt: float):
    """One explicit step of ``u [N, 1, cells, cells]`` (H along y, W along x) with ``params [N, 2]``."""
    try:  # torch tensors keep their gradient path; NumPy arrays stay NumPy
        import torch
        xp = torch if isinstance(u, torch.Tensor) else np
    except ImportError:
        xp = np
    dx = 1.0 / cells
    a, d = params[:, 0, None, None, None], params[:, 1, None, None, None]
    west, south = xp.roll(u, 1, -1), xp.roll(u, 1, -2)
    east, north = xp.roll(u, -1, -1), xp.roll(u, -1, -2)
    advection = a * (DIRECTION[0] * (u - west) + DIRECTION[1] * (u - south)) / dx
    laplacian = (east + west + north + south - 4 * u) / dx ** 2
    return u + dt * (d * laplacian - advection + u * (1 - u))


def source_step(state, params):
    """The solver to correct: ``[N, 1, 16, 16]``, ``[N, 2] -> [N, 1, 16, 16]`` float64."""
    return _step(state, params, SOURCE_CELLS, DT)


def reference_step(state, params):
    """The reference on the fine grid: ``[N, 1, 64, 64]``, ``[N, 2] -> [N, 1, 64, 64]``."""
    for _ in range(FACTOR):
        state = _step(state, params, SOURCE_CELLS * FACTOR, DT / FACTOR)
    return state


def downsample(fine):
    """``[N, C, 64, 64] -> [N, C, 16, 16]`` by 4 x 4 block averages."""
    n, c, h, w = fine.shape
    return fine.reshape(n, c, h // FACTOR, FACTOR, w // FACTOR, FACTOR).mean(axis=(3, 5))


def initial_cases(n: int, seed: int):
    """``(params [n, 2], fine states [n, 1, 64, 64])``: a in [0.5, 1], D in [0.002, 0.006], and a few
    random Gaussian blobs with values in [0, 1]."""
    rng = np.random.default_rng(seed)
    params = np.stack([rng.uniform(0.5, 1.0, n), rng.uniform(0.002, 0.006, n)], axis=1)
    cells = SOURCE_CELLS * FACTOR
    x = (np.arange(cells) + 0.5) / cells
    states = np.zeros((n, 1, cells, cells))
    for i in range(n):
        for _ in range(3):
            cx, cy, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.12)
            dx = np.minimum(np.abs(x - cx), 1 - np.abs(x - cx))  # periodic distance
            dy = np.minimum(np.abs(x - cy), 1 - np.abs(x - cy))
            states[i, 0] += 0.8 * np.exp(-(dx[None, :] ** 2 + dy[:, None] ** 2) / (2 * width ** 2))
    return params, np.clip(states, 0.0, 1.0)
