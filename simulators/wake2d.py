"""Unsteady wake flow behind a cylinder (Um et al. 2020, the scenario of DeepZero's SOL experiment).

Incompressible Navier-Stokes in a channel ``x in [0, 100], y in [0, 200]``; a cylinder of radius 10 at
(50, 50); inflow ``v = (0, 1)`` through the bottom, no-slip side walls, open (zero-gradient) top.
Viscosity ``nu = U D / Re = 20 / Re``; the Reynolds number is the only physics parameter (params
``[N, 1]``). One step: semi-Lagrangian self-advection, explicit diffusion, pressure projection (as in
Um et al.'s code; ``dt = 1``).

State layout ``[N, 2, H, W]`` (H = y rows, W = x columns): the staggered (MAC) velocity stored per cell
at the cell's *upper* faces:
- channel 0, ``v_x[j, i]`` = x-velocity on the face between cells i and i+1 (its right face); the last
  column ``i = W-1`` is the right wall, always 0 (a padding column, ignored on input);
- channel 1, ``v_y[j, i]`` = y-velocity on the top face of cell (i, j); row ``H-1`` is the outflow.
The inflow faces (bottom) and the left wall are boundary conditions, not state. This is exactly the
set of values PhiFlow stores for this boundary configuration, so state <-> StaggeredGrid is lossless
(no interpolation per step, the output is divergence-free to solver precision), while still being a
regular ``[N, 2, H, W]`` array a CNN can consume. `to_centered` gives cell-centred velocity for plots.

Pressure solve: a direct sparse LU (SciPy SuperLU) of the masked Poisson matrix, factorized once per
grid and applied to all batch members in one call. Why not PhiFlow's batched CG: its iterations run
until *all* members converge, so one member's result depends on the rest of the batch (float32, tol
1e-3: ~5e-4 cross-talk, larger than a finite-difference signal); float64 CG at tol 1e-8 removes that
but took ~250 iterations per solve. The LU solve makes members independent (to round-off), is exact,
and was several times faster here. It is a torch autograd Function (the matrix is symmetric, the
backward pass is another solve), so the step stays differentiable for FO-SOL.

Source: 32 x 64 cells. Reference: 64 x 128 with 2 substeps of ``dt/2`` (Um et al. used 128 x 256,
which costs ~4x more per step; on 2 CPU cores the data generation would take ~35 min instead of
minutes). Down-sampling is flux-preserving: each coarse face takes the mean of the fine faces it
covers, so a divergence-free fine field stays divergence-free on coarse fluid cells.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse.linalg as spla
import torch

from .base import Scenario, torch_or_numpy
from .phiflow import batch, field, math, phi_context, wrap_b

from phi.field import CenteredGrid, Field, StaggeredGrid
from phi.geom import Box, Sphere
from phi.physics import advect, diffuse
from phi.physics.fluid import (
    _accessible_extrapolation,
    _pressure_extrapolation,
    masked_laplace,
)
from phiml.math import dual, extrapolation, vec


class _LUSolve(torch.autograd.Function):
    """``x = A^-1 b`` for each row of ``b [N, n]`` with a prefactorized SuperLU of ``A``."""

    @staticmethod
    def forward(ctx, rhs, lu):
        ctx.lu = lu
        x = lu.solve(np.ascontiguousarray(rhs.detach().cpu().numpy().T))
        return torch.from_numpy(np.ascontiguousarray(x.T)).to(rhs.device)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.lu.solve(np.ascontiguousarray(grad.detach().cpu().numpy().T), trans="T")
        return torch.from_numpy(np.ascontiguousarray(g.T)).to(grad.device), None


class _Grid:
    """Everything fixed for one resolution: geometry, masks, the LU factorization, the JIT'd halves."""

    def __init__(self, sc: "Wake2DScenario", nx: int, substeps: int):
        self.nx, self.ny, self.substeps = nx, 2 * nx, substeps
        self.dt = float(sc.dt) / substeps
        self.bounds = Box(x=sc.width, y=sc.height)
        self.boundary = {"x": 0, "y-": vec(x=0, y=sc.inflow), "y+": extrapolation.ZERO_GRADIENT}
        cyl = Sphere(center=vec(x=sc.cylinder_x, y=sc.cylinder_y), radius=sc.cylinder_radius)
        with phi_context(), math.NUMPY:
            v = StaggeredGrid(0, self.boundary, x=self.nx, y=self.ny, bounds=self.bounds)
            self.extrapolation = v.extrapolation
            # The same masks PhiFlow's make_incompressible builds, computed once instead of per step.
            accessible = Field(v.geometry, ~cyl, _accessible_extrapolation(v.extrapolation))
            self.hard_bcs = field.stagger(accessible, math.minimum, v.boundary, at=v.sampled_at,
                                          dims=v.vector.item_names)
            self.active = accessible.with_extrapolation(extrapolation.NONE)
            self.keep = 1 - field.resample(cyl, v, soft=True, balance=1)  # zero velocity inside the cylinder
            self.pressure_extrapolation = _pressure_extrapolation(v.extrapolation)
            p0 = CenteredGrid(0, self.pressure_extrapolation, x=self.nx, y=self.ny, bounds=self.bounds)
            matrix, bias = math.matrix_from_function(masked_laplace, p0, v.boundary, self.hard_bcs, self.active,
                                                     wide_stencil=False, order=2)
            bias = bias.values if isinstance(bias, Field) else bias
            assert float(math.max(abs(bias), bias.shape)) == 0, "pressure operator is not linear"
            a = matrix.native()  # scipy sparse, rows/cols ordered (x, y) row-major
            self.fluid = self.active.values.numpy("y,x") > 0.5  # [H, W] cells outside the cylinder
            self.keep_x = self.keep.vector["x"].values.numpy("y,x")  # [H, W-1]
            self.keep_y = self.keep.vector["y"].values.numpy("y,x")  # [H, W]
        self.lu = spla.splu(a.tocsc())
        self._pre = self._post = None

    # -- phiml halves of the step (JIT-compiled once per input shape by PhiFlow) --
    def _to_field(self, vx, vy):
        values = math.stack([vx, vy], dual(vector="x,y"))
        return StaggeredGrid(values, self.boundary, x=self.nx, y=self.ny, bounds=self.bounds)

    def pre(self, vx, vy, nu):
        v = self._to_field(vx, vy)
        v = advect.semi_lagrangian(v, v, self.dt)
        v = diffuse.explicit(v, nu, self.dt)
        v = v.with_values(v.values * self.keep.values)  # obstacle: as fluid.apply_boundary_conditions
        div = field.divergence(v, order=2) * self.active
        return v.vector["x"].values, v.vector["y"].values, div.values

    def post(self, vx, vy, p_values):
        v = self._to_field(vx, vy)
        p = CenteredGrid(p_values, self.pressure_extrapolation, x=self.nx, y=self.ny, bounds=self.bounds)
        grad_p = field.spatial_gradient(p, self.extrapolation, at="face", order=2, scheme="green-gauss")
        v = v.with_values(v.values - (grad_p * self.hard_bcs).values)  # values only: keep v's boundary
        return v.vector["x"].values, v.vector["y"].values

    def project_pressure(self, div: torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` divergence -> ``[N, H, W]`` pressure (matrix ordered x-major)."""
        n = div.shape[0]
        rhs = div.transpose(1, 2).reshape(n, -1)
        p = _LUSolve.apply(rhs, self.lu)
        return p.reshape(n, self.nx, self.ny).transpose(1, 2)

    def step(self, state: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """float64 ``[N, 2, H, W]`` state, ``[N]`` viscosity -> next state."""
        with phi_context():
            if self._pre is None:
                self._pre, self._post = math.jit_compile(self.pre), math.jit_compile(self.post)
            vx = wrap_b(state[:, 0, :, :-1])  # drop the right-wall padding column
            vy = wrap_b(state[:, 1])
            nu_t = math.tensor(nu, batch("b"))
            for _ in range(self.substeps):
                vx, vy, div = self._pre(vx, vy, nu_t)
                p = self.project_pressure(div.native(["b", "y", "x"]))
                vx, vy = self._post(vx, vy, wrap_b(p))
            vx_n, vy_n = vx.native(["b", "y", "x"]), vy.native(["b", "y", "x"])
        wall = torch.zeros_like(vx_n[:, :, :1])
        return torch.stack([torch.cat([vx_n, wall], dim=2), vy_n], dim=1)


def _mac_downsample(state, f: int):
    """Flux-preserving down-sampling of upper-face MAC states by an integer factor ``f``."""
    x, back = torch_or_numpy(state)
    n, c, h, w = x.shape
    if c != 2 or h % f or w % f:
        raise ValueError(f"wake2d.downsample: expected [N, 2, H, W] with H, W divisible by {f}, got {tuple(x.shape)}")
    vx = x[:, 0, :, f - 1::f].reshape(n, h // f, f, w // f).mean(dim=2)   # the f fine faces along y
    vy = x[:, 1, f - 1::f, :].reshape(n, h // f, w // f, f).mean(dim=3)   # the f fine faces along x
    return back(torch.stack([vx, vy], dim=1))


@dataclasses.dataclass(eq=False)
class Wake2DScenario(Scenario):
    """Um et al.'s unsteady wake flow (see module docstring). All fields are part of the cache key.

    Attributes:
        source_resolution: source cells along x (the source grid is ``[2R, R]``, H = y).
        factor: reference/source resolution ratio.
        reference_substeps: reference time substeps per step.
        dt: physical time per step.
        re_range: Reynolds numbers drawn log-uniformly from this range.
        warmup_steps: reference steps run by `generate_cases` from the start-up state so that vortex
            shedding has developed.
        width, height, cylinder_x, cylinder_y, cylinder_radius, inflow: geometry (Um et al.'s).
        poke: amplitude range of the seeded sideways velocity blob behind the cylinder that breaks
            the symmetry (otherwise shedding starts late and at the same phase in every case).
    """

    source_resolution: int = 32
    factor: int = 2
    reference_substeps: int = 2
    dt: float = 1.0
    re_range: tuple = (150.0, 2000.0)
    warmup_steps: int = 500
    width: float = 100.0
    height: float = 200.0
    cylinder_x: float = 50.0
    cylinder_y: float = 50.0
    cylinder_radius: float = 10.0
    inflow: float = 1.0
    poke: tuple = (0.5, 1.0)

    name = "wake2d"
    channels = ("v_x", "v_y")
    param_names = ("Re",)

    def __post_init__(self):
        Scenario.__init__(self)
        if self.source_resolution < 8 or self.factor < 1 or self.reference_substeps < 1:
            raise ValueError("wake2d: need source_resolution >= 8, factor >= 1, reference_substeps >= 1")
        self.re_range = tuple(float(v) for v in self.re_range)
        self.poke = tuple(float(v) for v in self.poke)
        self._grids: dict = {}

    # ------------------------------------------------------------------ grid facts
    @property
    def source_grid(self) -> tuple[int, int]:
        """(H, W) = (y cells, x cells) of source states."""
        return (2 * self.source_resolution, self.source_resolution)

    @property
    def reference_grid(self) -> tuple[int, int]:
        """(H, W) of reference states."""
        r = self.source_resolution * self.factor
        return (2 * r, r)

    def viscosity(self, params) -> np.ndarray:
        """``nu = inflow * 2 radius / Re`` for params ``[N, 1]`` -> ``[N]``."""
        return self.inflow * 2 * self.cylinder_radius / np.asarray(params, np.float64)[:, 0]

    def _grid(self, which: str) -> _Grid:
        if which not in self._grids:
            if which == "source":
                self._grids[which] = _Grid(self, self.source_resolution, 1)
            else:
                self._grids[which] = _Grid(self, self.source_resolution * self.factor, self.reference_substeps)
        return self._grids[which]

    # ------------------------------------------------------------------ public helpers
    def downsample(self, state_hi):
        """Flux-preserving MAC down-sampling ``[N, 2, fH, fW] -> [N, 2, H, W]`` (array or tensor).

        A coarse face is the mean of the ``f`` fine faces that tile it (right faces for v_x, top faces
        for v_y, so the coarse upper face coincides with every f-th fine upper face)."""
        return _mac_downsample(state_hi, self.factor)

    def to_centered(self, state):
        """Velocity at cell centres ``[N, 2, H, W]`` (mean of opposite faces, boundary faces included)."""
        x, back = torch_or_numpy(state)
        vx, vy = x[:, 0], x[:, 1]
        left = torch.cat([torch.zeros_like(vx[:, :, :1]), vx[:, :, :-1]], dim=2)   # left wall = 0
        below = torch.cat([torch.full_like(vy[:, :1, :], self.inflow), vy[:, :-1, :]], dim=1)  # inflow
        vx_right = torch.cat([vx[:, :, :-1], torch.zeros_like(vx[:, :, :1])], dim=2)  # padding -> wall
        return back(torch.stack([(left + vx_right) / 2, (below + vy) / 2], dim=1))

    def divergence(self, state, which: str = "source") -> np.ndarray:
        """Discrete divergence per cell, ``[N, H, W]`` float64, NaN inside the cylinder.

        Args:
            state: ``[N, 2, H, W]`` on the grid named by ``which`` (``"source"`` or ``"reference"``)."""
        x = np.asarray(state.detach().cpu().numpy() if isinstance(state, torch.Tensor) else state, np.float64)
        g = self._grid(which)
        dx, dy = self.width / g.nx, self.height / g.ny
        vx = x[:, 0].copy()
        vx[:, :, -1] = 0  # right wall
        vy = x[:, 1]
        left = np.concatenate([np.zeros_like(vx[:, :, :1]), vx[:, :, :-1]], axis=2)
        below = np.concatenate([np.full_like(vy[:, :1, :], self.inflow), vy[:, :-1, :]], axis=1)
        div = (vx - left) / dx + (vy - below) / dy
        return np.where(g.fluid[None], div, np.nan)

    def fluid_mask(self, which: str = "source") -> np.ndarray:
        """``[H, W]`` bool, True for cells outside the cylinder, on the named grid."""
        return self._grid(which).fluid.copy()

    def param_fields(self, params) -> np.ndarray:
        """``[N, 2, H, W]``: channels (Re, fluid mask) on the source grid, raw values."""
        p = np.asarray(params, np.float64)
        h, w = self.source_grid
        re = np.broadcast_to(p[:, :1, None, None], (p.shape[0], 1, h, w))
        mask = np.broadcast_to(self.fluid_mask("source")[None, None].astype(np.float64), (p.shape[0], 1, h, w))
        return np.concatenate([re, mask], axis=1)

    # ------------------------------------------------------------------ generator
    def startup_states(self, params, seed: int) -> np.ndarray:
        """Seeded start-up states on the reference grid (before warm-up); row k depends on (seed, k).

        Uniform flow ``v_y = inflow`` plus a sideways blob behind the cylinder (random sign, amplitude
        and position), made divergence-free by one projection. Returns ``[N, 2, H_ref, W_ref]``."""
        p = np.asarray(params, np.float64)
        n = p.shape[0]
        h, w = self.reference_grid
        dx, dy = self.width / w, self.height / h
        xf = (np.arange(w) + 1) * dx          # v_x faces (right faces)
        yc = (np.arange(h) + 0.5) * dy        # their y
        state = np.zeros((n, 2, h, w))
        state[:, 1] = self.inflow
        r = self.cylinder_radius
        for k in range(n):
            rng = np.random.default_rng([int(seed), k, 1])  # case k depends only on (seed, k)
            amp = rng.uniform(*self.poke) * rng.choice([-1.0, 1.0])
            cx = self.cylinder_x + rng.uniform(-0.5, 0.5) * r
            cy = self.cylinder_y + rng.uniform(1.5, 2.5) * r
            blob = (np.abs(xf[None, :] - cx) < 0.5 * r) & (np.abs(yc[:, None] - cy) < 0.5 * r)
            state[k, 0] = amp * blob
        state[:, 0, :, -1] = 0
        g = self._grid("reference")
        keep = np.concatenate([g.keep_x, np.zeros_like(g.keep_x[:, :1])], axis=1)
        state[:, 0] *= keep
        state[:, 1] *= g.keep_y
        return self._project(state, "reference")

    def _project(self, state: np.ndarray, which: str) -> np.ndarray:
        """Pressure projection only (no advection/diffusion) of a NumPy state."""
        g = self._grid(which)
        x = torch.from_numpy(np.asarray(state, np.float64))
        with self._lock, phi_context():
            vx, vy = wrap_b(x[:, 0, :, :-1]), wrap_b(x[:, 1])
            v = g._to_field(vx, vy)
            v = v.with_values(v.values * g.keep.values)
            div = (field.divergence(v, order=2) * g.active).values.native(["b", "y", "x"])
            p = g.project_pressure(div)
            vx, vy = g.post(v.vector["x"].values, v.vector["y"].values, wrap_b(p))
            vx_n, vy_n = vx.native(["b", "y", "x"]), vy.native(["b", "y", "x"])
        out = torch.stack([torch.cat([vx_n, torch.zeros_like(vx_n[:, :, :1])], dim=2), vy_n], dim=1)
        return out.numpy()

    def _initial_states(self, n: int, seed: int):
        lo, hi = np.log(self.re_range[0]), np.log(self.re_range[1])
        params = np.array([[np.exp(np.random.default_rng([seed, i, 0]).uniform(lo, hi))] for i in range(n)])
        state = self.startup_states(params, seed)
        for _ in range(int(self.warmup_steps)):
            state = self.reference_step(state, params)
        return params, state

    # ------------------------------------------------------------------ solver
    def _check_params(self, params: np.ndarray) -> None:
        re = params[:, 0]
        if np.any(re <= 0):
            raise ValueError(f"{self.name}.step: Reynolds number (params[:, 0]) must be > 0, got min {re.min():g}")
        # explicit diffusion is stable for nu * dt / dx^2 <= 1/4 in 2D (PhiFlow only warns above 1/2)
        g_dx = self.width / (self.source_resolution * self.factor)
        nu_max = 0.25 * g_dx ** 2 / (self.dt / self.reference_substeps)
        re_min = self.inflow * 2 * self.cylinder_radius / nu_max
        if np.any(re < re_min):
            raise ValueError(f"{self.name}.step: Re must be >= {re_min:.3g} (explicit diffusion stability on the "
                             f"reference grid), got min {re.min():g}")

    def _step_torch(self, state: torch.Tensor, params: torch.Tensor, which: str) -> torch.Tensor:
        nu = self.inflow * 2 * self.cylinder_radius / params[:, 0]
        return self._grid(which).step(state, nu)

    def _solver_at(self, nx: int, substeps: int):
        """Uncached solver on an ``[2 nx, nx]`` grid (refinement studies in tests/benchmarks).

        Returns ``step(state [N, 2, 2nx, nx] float64 torch, params [N, 1] float64 torch)``."""
        g = _Grid(self, nx, substeps)

        def step(state, params):
            with self._lock:
                return g.step(state, self.inflow * 2 * self.cylinder_radius / params[:, 0])
        return step
