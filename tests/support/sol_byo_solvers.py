"""A user's own solver, data and corrector, defined only for tests/sol/test_sol_byo.py (never the built-in
scenarios): served by ``deepzero-oracle serve sol_byo_solvers:numpy_step`` or imported in process.

The PDE: advection-diffusion with decay on a periodic 8 x 8 grid, one channel,
``du/dt = D lap(u) - c du/dx - k u`` with per-simulation params ``[D, k]`` (K = 2); the coarse solver
takes one explicit step of ``DT``, the reference four steps of ``DT / 4``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from deepzero_oracle.adapters.sol.trajectories import Trajectories

GRID = 8
DT = 0.2
SPEED = 1.0


def _step(state, params, dt: float):
    """One explicit step; NumPy in -> NumPy out, torch in -> torch out (differentiable)."""
    xp = torch if isinstance(state, torch.Tensor) else np
    d, k = params[:, 0, None, None, None], params[:, 1, None, None, None]
    east, west = xp.roll(state, -1, -1), xp.roll(state, 1, -1)
    lap = east + west + xp.roll(state, -1, -2) + xp.roll(state, 1, -2) - 4 * state
    return state + dt * (d * lap - SPEED * 0.5 * (east - west) - k * state)


def coarse_step(state, params):
    """The source solver ``[N, 1, 8, 8], [N, 2] -> [N, 1, 8, 8]``, NumPy or torch (FO-SOL can use it)."""
    return _step(state, params, DT)


def numpy_step(state, params):
    """The same source solver written for NumPy only (a typical user's solver: no gradient path)."""
    state, params = np.asarray(state, np.float64), np.asarray(params, np.float64)
    return _step(state, params, DT)


def reference_step(state, params):
    """The reference: four steps of DT / 4."""
    for _ in range(4):
        state = _step(state, params, DT / 4)
    return state


def state_only_step(state):
    """A K = 0 solver: it receives the state only (diffusion, D = 0.1, no decay)."""
    state = np.asarray(state, np.float64)
    return _step(state, np.tile([0.1, 0.0], (state.shape[0], 1)), DT)


def wrong_shape_step(state, params):
    """A broken solver: drops a row of cells."""
    return np.asarray(state)[..., :-1, :]


def float32_step(state, params):
    """A broken solver: answers in float32."""
    return numpy_step(state, params).astype(np.float32)


def nan_step(state, params):
    """A broken solver: NaN everywhere."""
    return np.full(np.shape(state), np.nan)


def make_trajectories(*, n_train: int = 3, n_test: int = 2, steps: int = 5, n_params: int = 2,
                      seed: int = 0) -> Trajectories:
    """Reference trajectories of smooth random initial states; ``n_params = 0`` gives data without
    params (diffusion D = 0.1, no decay, as `state_only_step`)."""
    rng = np.random.default_rng(seed)
    x = np.arange(GRID) * 2 * np.pi / GRID

    def split(n):
        params = np.stack([rng.uniform(0.05, 0.2, n), rng.uniform(0.0, 0.3, n)], axis=1)
        kx, ky = rng.integers(1, 3, (2, n))
        phase = rng.uniform(0, 2 * np.pi, n)
        u = np.sin(kx[:, None, None] * x[None, None, :] + ky[:, None, None] * x[None, :, None] + phase[:, None, None])
        states = [u[:, None]]
        run = params if n_params else np.tile([0.1, 0.0], (n, 1))
        for _ in range(steps):
            states.append(reference_step(states[-1], run))
        return np.stack(states, axis=1), (params if n_params else None)

    train, train_params = split(n_train)
    test, test_params = split(n_test)
    meta = {"channels": ["u"], "dt": DT, "periodic": True}
    if n_params:
        meta["param_names"] = ["D", "k"]
    return Trajectories(train, test, train_params, test_params, metadata=meta)


class TinyCorrector(nn.Module):
    """A user's corrector that is not the built-in CNN: two circular convolutions with a GELU."""

    def __init__(self, channels: int, n_params: int):
        super().__init__()
        self.first = nn.Conv2d(channels + n_params, 3, 3, padding=1, padding_mode="circular")
        self.last = nn.Conv2d(3, channels, 3, padding=1, padding_mode="circular")

    def forward(self, state, param_fields):
        return 0.01 * self.last(nn.functional.gelu(self.first(torch.cat([state, param_fields], dim=1))))


def tiny_corrector(channels: int, n_params: int) -> nn.Module:
    """``--corrector sol_byo_solvers:tiny_corrector``."""
    return TinyCorrector(channels, n_params)


class WideCorrector(nn.Module):
    """A broken corrector: one output channel too many."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels + 1, 1)

    def forward(self, state, param_fields):
        return self.conv(state)


def wide_corrector(channels: int, n_params: int) -> nn.Module:
    """``--corrector sol_byo_solvers:wide_corrector`` (refused before training)."""
    return WideCorrector(channels)
