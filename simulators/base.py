"""What every scenario shares: array validation, rollouts, cases, and .npz caching.

Array conventions (all scenarios):
- A *state* is ``[N, C, H, W]``: N simulations, C channels, H rows along y (bottom to top), W columns
  along x. Plot a channel with ``imshow(state[n, c], origin="lower")``.
- *params* is ``[N, K]``: one row of physics parameters per simulation (``scenario.param_names``).
- NumPy in -> NumPy out, torch in -> torch out (same device), each with the input's float dtype.
  Computation is always float64; torch outputs are differentiable (autograd flows through the
  PhiFlow step).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes


@dataclasses.dataclass(frozen=True)
class Cases:
    """A seeded set of simulations: initial states on both grids plus physics parameters.

    Attributes:
        scenario: name of the scenario that generated them.
        seed: the generator seed.
        params: ``[N, K]`` float64 physics parameters.
        reference_states: ``[N, C, H_ref, W_ref]`` float64 initial states on the reference grid.
        source_states: ``[N, C, H_src, W_src]`` float64, ``downsample(reference_states)``.
    """

    scenario: str
    seed: int
    params: np.ndarray
    reference_states: np.ndarray
    source_states: np.ndarray

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def subset(self, index) -> "Cases":
        """Cases selected by an index/slice/boolean mask along N (same seed label)."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return Cases(self.scenario, self.seed, self.params[idx], self.reference_states[idx], self.source_states[idx])

    def save(self, path: str | os.PathLike) -> None:
        """Write the cases to an ``.npz`` file (no pickle)."""
        _save_npz(path, {"params": self.params, "reference_states": self.reference_states,
                         "source_states": self.source_states},
                  {"scenario": self.scenario, "seed": self.seed})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cases":
        """Read cases written by `save`."""
        arrays, meta = _load_npz(path)
        return cls(meta["scenario"], int(meta["seed"]), arrays["params"], arrays["reference_states"],
                   arrays["source_states"])


_COPIES_LOCK = threading.RLock()


class Scenario(abc.ABC):
    """A PDE with a cheap *source* solver and an expensive *reference* solver of the same physics.

    Subclasses set the class attributes below (or properties) and implement `_step_torch`,
    `downsample`, `_initial_states` and `param_fields`; `_check_params` and `to_centered` are optional.
    The public step functions are plain functions of arrays, so a scenario's ``source_step`` can be
    used directly as a black box ``f(state, params) -> next_state``.
    """

    name: str = "?"
    channels: tuple[str, ...] = ()       # state channel names, length C
    param_names: tuple[str, ...] = ()    # params column names, length K
    source_grid: tuple[int, int] = (0, 0)     # (H, W) of source states
    reference_grid: tuple[int, int] = (0, 0)  # (H, W) of reference states
    dt: float = 1.0                       # physical time advanced by one source or reference step

    def __init__(self):
        # PhiFlow's JIT caches and SuperLU factorizations are not known to be thread-safe, and
        # a gRPC server may call from several threads: one call at a time per scenario.
        self._lock = threading.RLock()

    #: Attributes a pickled copy (e.g. sent to an executor's worker) makes afresh: name -> factory.
    #: Copies in one process share a lock: PhiFlow's JIT tracing is process-wide state.
    transient = {"_lock": lambda: _COPIES_LOCK}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name, make in self.transient.items():
            setattr(self, name, make())

    # ------------------------------------------------------------------ public API
    def source_step(self, state, params) -> np.ndarray | torch.Tensor:
        """One step of the low-fidelity solver.

        Args:
            state: ``[N, C, H_src, W_src]`` ndarray or torch tensor on the source grid.
            params: ``[N, K]`` physics parameters (ndarray or tensor).
        Returns:
            ``[N, C, H_src, W_src]``, same array type and float dtype (torch: and device) as ``state``.
        Raises:
            ValueError: wrong shape, non-float dtype, NaN/inf, or physically invalid params.
        """
        return self._step(state, params, "source")

    def reference_step(self, state, params) -> np.ndarray | torch.Tensor:
        """One step of the high-fidelity solver (same physical time ``dt`` as `source_step`).

        Args:
            state: ``[N, C, H_ref, W_ref]`` on the reference grid.
            params: ``[N, K]``.
        Returns:
            ``[N, C, H_ref, W_ref]``, same array type as ``state``.
        """
        return self._step(state, params, "reference")

    @abc.abstractmethod
    def downsample(self, state_hi) -> np.ndarray | torch.Tensor:
        """Reference grid -> source grid: ``[N, C, H_ref, W_ref] -> [N, C, H_src, W_src]``.

        Works on ndarrays and torch tensors (linear, differentiable)."""

    @abc.abstractmethod
    def param_fields(self, params) -> np.ndarray:
        """Physics parameters as extra input channels for a corrector network.

        Args:
            params: ``[N, K]``.
        Returns:
            ``[N, P, H_src, W_src]`` float64 ndarray (raw physical values, not normalized).
        """

    def generate_cases(self, n: int, seed: int, *, cache_dir: str | os.PathLike | None = None) -> Cases:
        """Draw ``n`` seeded simulations (parameters and initial states).

        The same ``(n, seed)`` gives bit-identical cases; case i's parameters and start state depend only
        on ``(seed, i)`` (a smaller run's cases are a prefix of a larger one's). Use different seeds for
        train and test.
        Args:
            n: number of simulations.
            seed: generator seed.
            cache_dir: if given, the cases are stored there as ``.npz`` and reloaded next time
                (useful where initial states need a costly warm-up, e.g. ``wake2d``).
        Returns:
            `Cases` with ``params [n, K]``, ``reference_states [n, C, H_ref, W_ref]`` and
            ``source_states [n, C, H_src, W_src]``.
        """
        if int(n) < 1:
            raise ValueError(f"{self.name}.generate_cases: n must be >= 1, got {n}")
        n, seed = int(n), int(seed)

        def compute():
            params, hi = self._initial_states(n, seed)
            hi = np.asarray(hi, dtype=np.float64)
            return {"params": np.asarray(params, np.float64), "reference_states": hi,
                    "source_states": np.asarray(self.downsample(hi), np.float64)}

        arrays = _cached(cache_dir, f"{self.name}-cases", {"n": n, "seed": seed, **self.config()}, compute)
        return Cases(self.name, seed, arrays["params"], arrays["reference_states"], arrays["source_states"])

    def rollout(self, state, params, steps: int, *, solver: str = "source",
                correct: Callable | None = None) -> np.ndarray | torch.Tensor:
        """Run ``steps`` steps and return the whole trajectory.

        Args:
            state: ``[N, C, H, W]`` initial state on the solver's grid.
            params: ``[N, K]``.
            steps: number of steps (>= 0).
            solver: ``"source"`` or ``"reference"``.
            correct: optional ``correct(state [N,C,H,W], params, t) -> state`` applied after every
                solver step (a SOL corrector: ``s_{t+1} = correct(P(s_t))``).
        Returns:
            ``[N, steps + 1, C, H, W]`` (index 0 is the initial state), same array type as ``state``;
            with torch input it stays differentiable.
        """
        if solver not in ("source", "reference"):
            raise ValueError(f"{self.name}.rollout: solver must be 'source' or 'reference', got {solver!r}")
        step = self.source_step if solver == "source" else self.reference_step
        out = [state]
        for t in range(int(steps)):
            state = step(state, params)
            if correct is not None:
                state = correct(state, params, t)
            out.append(state)
        if isinstance(out[0], torch.Tensor):
            return torch.stack(out, dim=1)
        return np.stack([np.asarray(s) for s in out], axis=1)

    def reference_trajectory(self, cases: Cases, steps: int, *, batch_size: int | None = None,
                             cache_dir: str | os.PathLike | None = None, progress: bool | None = False) -> np.ndarray:
        """The reference solution of ``cases`` down-sampled to the source grid at every step.

        Args:
            cases: from `generate_cases`.
            steps: number of reference steps (each advances ``dt``).
            batch_size: simulations per solver call (default: all at once).
            cache_dir: if given, store/reload the result as ``.npz`` keyed by config + cases content.
            progress: a tqdm bar: True always, None when stderr is a terminal, False never.
        Returns:
            ``[N, steps + 1, C, H_src, W_src]`` float64; ``[:, 0] == cases.source_states``.
        """
        steps = int(steps)
        key = {"steps": steps, "cases": _digest(cases.params, cases.reference_states), **self.config()}

        def compute():
            n = len(cases)
            bs = n if batch_size is None else max(1, int(batch_size))
            out = np.empty((n, steps + 1) + cases.source_states.shape[1:], np.float64)
            bar = _progress(progress, n * steps, f"{self.name} reference")
            for lo in range(0, n, bs):
                hi_state, p = cases.reference_states[lo:lo + bs], cases.params[lo:lo + bs]
                out[lo:lo + bs, 0] = self.downsample(hi_state)
                for t in range(steps):
                    hi_state = self.reference_step(hi_state, p)
                    out[lo:lo + bs, t + 1] = self.downsample(hi_state)
                    if bar is not None:
                        bar.update(len(p))
            if bar is not None:
                bar.close()
            return {"trajectory": out}

        return _cached(cache_dir, f"{self.name}-reference", key, compute)["trajectory"]

    def to_centered(self, state) -> np.ndarray | torch.Tensor:
        """Velocity at cell centres ``[N, 2, H, W]`` for plots and cell-wise metrics.

        The default returns ``state`` unchanged (cell-centred scenarios); staggered ones override it."""
        return state

    def config(self) -> dict:
        """Everything that determines the numbers this scenario produces (used as cache key)."""
        cfg = {k: v for k, v in dataclasses.asdict(self).items()} if dataclasses.is_dataclass(self) else {}
        return {"scenario": self.name, "format": CACHE_FORMAT, **_versions(), **cfg}

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _initial_states(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(params [n, K], reference_states [n, C, H_ref, W_ref])`` (NumPy, float64)."""

    @abc.abstractmethod
    def _step_torch(self, state: torch.Tensor, params: torch.Tensor, which: str) -> torch.Tensor:
        """float64 torch ``[N, C, H, W]`` -> ``[N, C, H, W]`` on the grid named by ``which``."""

    def _check_params(self, params: np.ndarray) -> None:
        """Raise ValueError for physically invalid parameter values ([N, K] float64 NumPy)."""

    # ------------------------------------------------------------------ internals
    def _step(self, state, params, which: str):
        grid = self.source_grid if which == "source" else self.reference_grid
        where = f"{self.name}.{which}_step"
        x = _check_state(state, (len(self.channels),) + tuple(grid), where, self.channels)
        p = _check_params_shape(params, x.shape[0], len(self.param_names), where, self.param_names)
        self._check_params(p.detach().numpy())
        with self._lock:
            out = self._step_torch(x, p, which)
        return _like(out, state)


# ---------------------------------------------------------------------- validation / conversion
def _as_torch64(a, where: str, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a
    else:
        try:
            t = torch.from_numpy(np.asarray(a))
        except (TypeError, ValueError) as e:  # object arrays, ragged lists
            raise ValueError(f"{where}: {what} must be a numeric array, got {type(a).__name__}") from e
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{where}: {what} must be a real float array, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.float64)


def _check_state(state, expected: tuple, where: str, channels: Sequence[str]) -> torch.Tensor:
    x = _as_torch64(state, where, "state")
    c, h, w = expected
    if x.ndim != 4 or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
        raise ValueError(
            f"{where}: state must have shape [N, {c}, {h}, {w}] (N >= 1 simulations, channels "
            f"{tuple(channels)}, {h} rows along y, {w} columns along x); got {tuple(x.shape)}")
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"{where}: state contains NaN or inf in simulation(s) {idx[:10]}"
                         f"{' ...' if len(idx) > 10 else ''}; expected finite values")
    return x


def _check_params_shape(params, n: int, k: int, where: str, names: Sequence[str]) -> torch.Tensor:
    p = _as_torch64(params, where, "params")
    if p.ndim != 2 or tuple(p.shape) != (n, k):
        raise ValueError(f"{where}: params must have shape [N, {k}] = [{n}, {k}] (one row per simulation, "
                         f"columns {tuple(names)}); got {tuple(p.shape)}")
    if not bool(torch.isfinite(p.detach()).all()):
        raise ValueError(f"{where}: params contain NaN or inf; expected finite values")
    return p


def _like(out: torch.Tensor, template):
    """Return ``out`` (float64 torch) in the array type, float dtype and device of ``template``
    (float64 for integer templates)."""
    if isinstance(template, torch.Tensor):
        return out.to(dtype=template.dtype if template.dtype.is_floating_point else torch.float64,
                      device=template.device)
    dtype = np.asarray(template).dtype
    return out.detach().numpy().astype(dtype if dtype.kind == "f" else np.float64, copy=False)


def torch_or_numpy(a):
    """(array as torch tensor, converter back to the input's type) for pure array helpers."""
    if isinstance(a, torch.Tensor):
        return a, (lambda t: t)
    return torch.from_numpy(np.asarray(a, dtype=np.float64)), (lambda t: t.numpy())


# ---------------------------------------------------------------------- caching (.npz, never pickle)
def _versions() -> dict:
    import phi
    import phiml
    return {"phiflow": phi.__version__, "phiml": phiml.__version__}


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _save_npz(path, arrays: dict, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, __meta__=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache file


def _load_npz(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else {}
    return arrays, meta


def _cached(cache_dir, kind: str, key: dict, compute: Callable[[], dict]) -> dict:
    if cache_dir is None:
        return compute()
    blob = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        arrays, meta = _load_npz(path)
        if meta.get("key") == blob:
            return arrays
    arrays = compute()
    _save_npz(path, arrays, {"key": blob})
    return arrays


def _progress(enabled: bool | None, total: int, desc: str):
    """A tqdm bar: None shows it when stderr is a terminal (tqdm's convention), True always."""
    if enabled is False:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="sim-step", disable=None if enabled is None else False)
