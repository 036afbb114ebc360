"""Forced viscous Burgers' equation on a periodic 2D square (Um et al.'s forced advection-diffusion case).

    du/dt + (u . grad) u = nu * laplace(u) + f(x, y),     u = (u_x, u_y), periodic, side ``length``

State ``[N, 2, H, W]``: cell-centred (u_x, u_y), rows along y, columns along x.
Params ``[N, 1 + 5 M]``: ``nu`` then, per forcing mode m, ``(k_x, k_y, a_x, a_y, phase)``:
``f(x, y) = sum_m (a_x, a_y)_m * sin(2 pi (k_x x + k_y y) / length + phase_m)`` with integer wave numbers
(periodic, zero-mean, constant in time).

One step, operator-split (as in PhiFlow's Burgers examples): semi-Lagrangian self-advection, then
exact Fourier diffusion, then ``+ dt * f``. Fourier diffusion is exact and unconditionally stable, needs
no linear solve (so batch members cannot interact), and conserves the mean exactly.

Source: ``source_resolution``^2 cells, one step of ``dt``. Reference: ``factor`` x finer in each
direction and ``reference_substeps`` substeps of ``dt / reference_substeps`` (same CFL number), so the
reference refines space and time together. Down-sampling is the exact cell average over
``factor x factor`` blocks (conserves the mean).

1D would be cheaper, but PhiFlow 3.4's 1D semi-Lagrangian advection fails on the torch backend
(grid_sampler expects 5-D input), so the scenario is 2D.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import Scenario, torch_or_numpy
from .phiflow import batch, channel, math, phi_context, wrap_bchw

from phi.field import CenteredGrid
from phi.geom import Box
from phi.physics import advect, diffuse
from phiml.math import extrapolation


@dataclasses.dataclass(eq=False)
class BurgersScenario(Scenario):
    """Forced periodic 2D Burgers (see module docstring). All fields are part of the cache key.

    Attributes:
        source_resolution: source cells per side (source grid is ``[R, R]``).
        factor: reference/source resolution ratio (reference grid ``[factor R, factor R]``).
        reference_substeps: reference time substeps per step.
        length: domain side.
        dt: physical time per step (source and reference).
        nu_range: viscosity drawn log-uniformly from this range.
        forcing_modes: M, sine modes in the forcing.
        forcing_max_wavenumber: |k_x|, |k_y| <= this for forcing modes.
        forcing_amplitude: a_x, a_y drawn uniformly from [-A, A].
        init_max_wavenumber: initial states are random Fourier series with |k_x|, |k_y| <= this.
        init_rms: RMS velocity of initial states.
    """

    source_resolution: int = 32
    factor: int = 4
    reference_substeps: int = 4
    length: float = 32.0
    dt: float = 0.5
    nu_range: tuple = (0.05, 0.2)
    forcing_modes: int = 4
    forcing_max_wavenumber: int = 2
    forcing_amplitude: float = 0.1
    init_max_wavenumber: int = 3
    init_rms: float = 0.7

    name = "burgers"
    channels = ("u_x", "u_y")
    transient = {**Scenario.transient, "_jit": dict}  # PhiFlow's compiled steps do not pickle

    def __post_init__(self):
        Scenario.__init__(self)
        if self.source_resolution < 4 or self.factor < 1 or self.reference_substeps < 1:
            raise ValueError("burgers: need source_resolution >= 4, factor >= 1, reference_substeps >= 1")
        self.nu_range = tuple(float(v) for v in self.nu_range)
        self._jit = {}

    # ------------------------------------------------------------------ grid facts
    @property
    def source_grid(self) -> tuple[int, int]:
        """(H, W) of source states."""
        return (self.source_resolution, self.source_resolution)

    @property
    def reference_grid(self) -> tuple[int, int]:
        """(H, W) of reference states."""
        r = self.source_resolution * self.factor
        return (r, r)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Column names of params: ``nu`` then ``f{m}_kx, f{m}_ky, f{m}_ax, f{m}_ay, f{m}_phase``."""
        cols = ["nu"]
        for m in range(self.forcing_modes):
            cols += [f"f{m}_kx", f"f{m}_ky", f"f{m}_ax", f"f{m}_ay", f"f{m}_phase"]
        return tuple(cols)

    # ------------------------------------------------------------------ public helpers
    def downsample(self, state_hi):
        """Block average ``[N, C, fR, fR] -> [N, C, R, R]`` (ndarray or tensor; differentiable)."""
        x, back = torch_or_numpy(state_hi)
        n, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"burgers.downsample: spatial shape {(h, w)} is not divisible by factor {f}")
        return back(x.reshape(n, c, h // f, f, w // f, f).mean(dim=(3, 5)))

    def forcing(self, params, resolution: int | None = None) -> np.ndarray:
        """The forcing field ``f`` at cell centres.

        Args:
            params: ``[N, K]``.
            resolution: cells per side (default: the source grid).
        Returns:
            ``[N, 2, R, R]`` float64 ndarray (f_x, f_y).
        """
        p = np.asarray(params, dtype=np.float64)
        r = self.source_resolution if resolution is None else int(resolution)
        centres = (np.arange(r) + 0.5) * (self.length / r)
        yy, xx = np.meshgrid(centres, centres, indexing="ij")  # [y, x]
        out = np.zeros((p.shape[0], 2, r, r))
        for m in range(self.forcing_modes):
            kx, ky, ax, ay, ph = (p[:, 1 + 5 * m + i, None, None] for i in range(5))
            s = np.sin(2 * np.pi * (kx * xx + ky * yy) / self.length + ph)
            out[:, 0] += ax * s
            out[:, 1] += ay * s
        return out

    def param_fields(self, params) -> np.ndarray:
        """``[N, 3, R, R]``: channels (nu, f_x, f_y) on the source grid, raw physical values."""
        p = np.asarray(params, dtype=np.float64)
        f = self.forcing(p)
        nu = np.broadcast_to(p[:, :1, None, None], (p.shape[0], 1) + f.shape[2:])
        return np.concatenate([nu, f], axis=1)

    # ------------------------------------------------------------------ generator
    def _initial_states(self, n: int, seed: int):
        # One generator per case: case i depends only on (seed, i), so a small run's cases are the
        # first cases of a larger run with the same seed.
        params = np.stack([self._draw_params(np.random.default_rng([seed, i, 0])) for i in range(n)])
        r = self.reference_grid[0]
        states = np.stack([self._draw_state(np.random.default_rng([seed, i, 1]), r) for i in range(n)])
        return params, states

    def _draw_params(self, rng: np.random.Generator) -> np.ndarray:
        p = np.zeros(len(self.param_names))
        p[0] = np.exp(rng.uniform(np.log(self.nu_range[0]), np.log(self.nu_range[1])))
        km = self.forcing_max_wavenumber
        wavevectors = [(kx, ky) for kx in range(-km, km + 1) for ky in range(-km, km + 1) if (kx, ky) != (0, 0)]
        for m in range(self.forcing_modes):
            p[1 + 5 * m: 3 + 5 * m] = wavevectors[rng.integers(len(wavevectors))]
            p[3 + 5 * m: 5 + 5 * m] = rng.uniform(-self.forcing_amplitude, self.forcing_amplitude, 2)
            p[5 + 5 * m] = rng.uniform(0, 2 * np.pi)
        return p

    def _draw_state(self, rng: np.random.Generator, resolution: int) -> np.ndarray:
        """Random band-limited Fourier series evaluated exactly at the cell centres of a
        ``resolution``^2 grid (smooth, periodic, zero mean, spectrum ~ |k|^-1.5): ``[2, R, R]``."""
        centres = (np.arange(resolution) + 0.5) * (self.length / resolution)
        yy, xx = np.meshgrid(centres, centres, indexing="ij")
        ki = self.init_max_wavenumber
        state = np.zeros((2, resolution, resolution))
        for kx in range(0, ki + 1):
            for ky in range(-ki, ki + 1):
                if kx == 0 and ky <= 0:
                    continue  # half-plane: cos(k.x + phi) already covers -k
                amp = rng.normal(size=(2, 1, 1)) * (kx * kx + ky * ky) ** -0.75
                phase = rng.uniform(0, 2 * np.pi, (2, 1, 1))
                state += amp * np.cos(2 * np.pi * (kx * xx + ky * yy) / self.length + phase)
        # exact for any resolution > 2 * init_max_wavenumber (discrete orthogonality of the modes)
        rms = np.sqrt((state ** 2).mean())
        return state * (self.init_rms / max(rms, 1e-12))

    # ------------------------------------------------------------------ solver
    def _check_params(self, params: np.ndarray) -> None:
        where = f"{self.name}.step"
        if np.any(params[:, 0] <= 0):
            raise ValueError(f"{where}: viscosity nu (params[:, 0]) must be > 0, got min {params[:, 0].min():g}")
        k = params[:, 1:].reshape(len(params), self.forcing_modes, 5)[:, :, :2]
        if np.any(np.abs(k - np.round(k)) > 1e-9):
            raise ValueError(f"{where}: forcing wave numbers (f*_kx, f*_ky) must be integers so the forcing is "
                             f"periodic; got non-integer values")

    def _physics(self, resolution: int, substeps: int):
        """Build the PhiFlow step on a ``resolution``^2 grid as a function of phiml tensors."""
        length, dt = float(self.length), float(self.dt) / substeps
        modes = self.forcing_modes

        def step(v_values, p):
            v = CenteredGrid(v_values, extrapolation.PERIODIC, x=resolution, y=resolution,
                             bounds=Box(x=length, y=length))
            pts = v.points  # cell centres, (x, y, vector)
            f = 0
            for m in range(modes):
                kx, ky, ax, ay, ph = (p.param[5 * m + 1 + i] for i in range(5))
                s = math.sin(2 * np.pi / length * (kx * pts.vector["x"] + ky * pts.vector["y"]) + ph)
                f = f + math.stack([ax * s, ay * s], channel(vector="x,y"))
            nu = p.param[0]
            for _ in range(substeps):
                v = advect.semi_lagrangian(v, v, dt)
                v = diffuse.fourier(v, nu, dt)
                v = v.with_values(v.values + dt * f)  # add to values: Field + Field would add boundaries
            return v.values

        return step

    def _step_torch(self, state: torch.Tensor, params: torch.Tensor, which: str) -> torch.Tensor:
        if which not in self._jit:
            if which == "source":
                fn = self._physics(self.source_resolution, 1)
            else:
                fn = self._physics(self.source_resolution * self.factor, self.reference_substeps)
            with phi_context():
                self._jit[which] = math.jit_compile(fn)
        with phi_context():
            v = wrap_bchw(state)
            p = math.tensor(params, batch("b"), channel("param"))
            out = self._jit[which](v, p)
            return out.native(["b", "vector", "y", "x"])

    def _solver_at(self, resolution: int, substeps: int):
        """Non-cached eager solver at any resolution (for refinement studies in tests/benchmarks).

        Returns ``step(state [N, 2, R, R] torch float64, params [N, K] torch float64) -> [N, 2, R, R]``."""
        fn = self._physics(resolution, substeps)
        with phi_context():
            jit = math.jit_compile(fn)

        def step(state, params):
            with phi_context():
                out = jit(wrap_bchw(state), math.tensor(params, batch("b"), channel("param")))
                return out.native(["b", "vector", "y", "x"])
        return step

    def _initial_state_at(self, cases_seed: int, n: int, resolution: int) -> np.ndarray:
        """The initial states of ``generate_cases(n, cases_seed)`` sampled exactly on another grid.

        Returns ``[n, 2, resolution, resolution]`` (used for refinement studies)."""
        return np.stack([self._draw_state(np.random.default_rng([cases_seed, i, 1]), resolution) for i in range(n)])
