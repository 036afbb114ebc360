"""The source solver of a SOL comparison, whatever it is: a Python function in this process, a
server behind any black-box spec, or a built-in scenario's step.

The solver contract: ``f(state [N, C, H, W], params [N, K]) -> [N, C, H, W]``, float64, one output
row per input row; with K = 0 only the state is sent, ``f(state)``. `Solver` wraps one, checks it
once with a probe call before anything is trained (`Solver.probe`), and hands FO-SOL a torch
version with a gradient path when there is one (`Solver.gradient_step`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch

from deepzero_oracle import NonFiniteLossError
from deepzero_oracle.blackbox import BlackBoxTimeout, BlackBoxUnavailable
from deepzero_oracle.blackbox.spec import SPEC_FORMS, BlackBoxSpec, load_callable, open_blackbox

from .trajectories import Trajectories

__all__ = ["BUILTIN", "Solver", "SolverDiverged", "builtin_solver", "open_solver", "solve_checked", "solver_inputs"]

BUILTIN = "builtin"  # the spec recorded for a built-in scenario's in-process source step

_CONTRACT = "f(state [N, C, H, W], params [N, K]) -> [N, C, H, W] float64 (with K = 0: f(state))"


class SolverDiverged(NonFiniteLossError):
    """The solver produced (or was about to receive) non-finite states."""


def solver_inputs(state, params) -> tuple:
    """The arguments of one solver call: ``(state, params)``, or ``(state,)`` when K = 0."""
    return (state, params) if params.shape[-1] else (state,)


def solve_checked(solver: Callable, state: torch.Tensor, params: np.ndarray, where: str) -> torch.Tensor:
    """Call a black-box solver on float64 arrays ``state [N, C, H, W]``, ``params [N, K]`` (state only
    when K = 0); non-finite in or out raises ``SolverDiverged``. Returns a fresh float64 tensor."""
    s = state.detach().numpy()
    if not np.isfinite(s).all():
        raise SolverDiverged(f"{where}: the corrected state became NaN/Inf before the solver call")
    res = solver(*solver_inputs(s, params))
    # Always a fresh torch allocation: numpy buffers and wire buffers have other alignments, and torch's
    # vectorized reductions then sum in another order (last-bit differences between in-process and gRPC).
    out = torch.as_tensor(np.asarray(res) if not isinstance(res, torch.Tensor) else res.detach())
    out = out.to(torch.float64).clone(memory_format=torch.contiguous_format)
    if not torch.isfinite(out).all():
        raise SolverDiverged(f"{where}: the solver returned NaN/Inf")
    return out


class Solver:
    """A source solver and what is known about it.

    Args:
        box: the black box ``f(state [N, C, H, W], params [N, K]) -> [N, C, H, W]`` (NumPy arrays in;
            ``f(state)`` when K = 0), e.g. a plain function or an ``open_blackbox`` result.
        spec: its name in run settings and messages (a black-box spec, or `BUILTIN`).
        torch_step: the same step callable on torch tensors, if it may be differentiable (checked
            by `gradient_step` when FO-SOL asks); None for solvers that can only be queried.
        remote: True for solvers reached over the network.
        close: releases the connection (called by `close` / on leaving a ``with`` block).
    """

    def __init__(self, box: Callable, *, spec: str | None = None, torch_step: Callable | None = None,
                 remote: bool = False, close: Callable[[], None] | None = None):
        if not callable(box):
            raise TypeError(f"the solver must be callable, got {type(box).__name__}")
        self.box, self.torch_step, self.remote = box, torch_step, remote
        self.spec = spec or getattr(box, "__name__", type(box).__name__)
        self._close = close
        self._gradient_checked = False

    @classmethod
    def of(cls, solver) -> "Solver":
        """``solver`` if it is a `Solver`, else a plain callable wrapped as one (also its torch step)."""
        return solver if isinstance(solver, Solver) else cls(solver, torch_step=solver)

    def __call__(self, *inputs) -> np.ndarray | torch.Tensor:
        return self.box(*inputs)

    def probe(self, trajectories: Trajectories) -> None:
        """One call on (up to) two training states: the answer must be float64, finite, of the states'
        shape. Raises ValueError saying what was wrong; BlackBoxUnavailable / BlackBoxTimeout when a
        remote solver cannot be reached."""
        state, params = trajectories.train_states[:2, 0], trajectories.train_params[:2]
        sent = f"state {list(state.shape)}" + (f" and params {list(params.shape)}" if params.shape[1] else " only (K = 0)")
        try:
            out = self.box(*solver_inputs(state, params))
        except (BlackBoxUnavailable, BlackBoxTimeout):
            raise
        except Exception as e:  # noqa: BLE001 - the user's solver may raise anything: report it as bad input
            raise ValueError(f"solver {self.spec} failed on a probe call with {sent}: {type(e).__name__}: {e}. "
                             f"The solver contract: {_CONTRACT}") from e
        out = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
        if tuple(out.shape) != state.shape:
            raise ValueError(f"solver {self.spec} returned shape {list(out.shape)} for {sent}; it must return "
                             f"the next states, {list(state.shape)}. The solver contract: {_CONTRACT}")
        if out.dtype != torch.float64:
            raise ValueError(f"solver {self.spec} returned {str(out.dtype).replace('torch.', '')}; it must "
                             f"return float64 (cast the result, e.g. .astype(numpy.float64))")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"solver {self.spec} returned NaN/Inf for finite training states ({sent}); "
                             "check the solver and the data's units")

    def gradient_step(self, trajectories: Trajectories) -> Callable:
        """The torch step FO-SOL back-propagates through, checked once on two training states.

        Raises:
            ValueError: the solver is remote, or its function does not return a torch tensor with a
                gradient path when called with torch tensors.
        """
        if self.remote or self.torch_step is None:
            why = "is reached over the network and can only be queried" if self.remote else "has no torch version"
            raise ValueError(f"fo-sol back-propagates the unrolled loss through the solver, so it needs the "
                             f"solver in this process, written with torch operations (--solver MODULE:FUNCTION); "
                             f"{self.spec} {why}. Use --method zo-sol (solver queries only) or non, or pass a "
                             f"differentiable --solver MODULE:FUNCTION (for data from `sol generate`: leave --solver "
                             f"out, the built-in step is differentiable)")
        if not self._gradient_checked:
            state = torch.from_numpy(trajectories.train_states[:2, 0].copy()).requires_grad_(True)
            params = torch.from_numpy(trajectories.train_params[:2].copy())
            try:
                out = self.torch_step(*solver_inputs(state, params))
            except Exception as e:  # noqa: BLE001 - a NumPy-only solver fails on tensors in many ways
                raise ValueError(f"fo-sol: solver {self.spec} failed when called with torch tensors "
                                 f"({type(e).__name__}: {e}); fo-sol needs a step written with torch operations. "
                                 f"Use --method zo-sol or non for a solver that can only be queried") from e
            if not isinstance(out, torch.Tensor) or out.grad_fn is None:
                got = type(out).__name__ if not isinstance(out, torch.Tensor) else "a tensor without a gradient path"
                raise ValueError(f"fo-sol: solver {self.spec}, called with torch tensors that require grad, returned "
                                 f"{got}, so the loss cannot be back-propagated through it (a NumPy solver converts "
                                 f"its inputs and cuts the gradient). Use --method zo-sol or non, or write the "
                                 f"step with torch operations")
            if tuple(out.shape) != tuple(state.shape):
                raise ValueError(f"fo-sol: solver {self.spec} returned shape {list(out.shape)} for torch states "
                                 f"{list(state.shape)}")
            self._gradient_checked = True
        return self.torch_step

    def close(self) -> None:
        """Release the connection of a remote solver (nothing for in-process ones)."""
        if self._close is not None:
            self._close()

    def __enter__(self) -> "Solver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def builtin_solver(trajectories: Trajectories) -> Solver:
    """The in-process source step of the built-in scenario that produced ``trajectories`` (spec `BUILTIN`;
    differentiable with torch tensors). ValueError for data that is not from ``sol generate``."""
    from .builtin import scenario_of, source_solver

    scenario = scenario_of(trajectories)
    if scenario is None:
        raise ValueError(f"{trajectories.label} is not from a built-in scenario: name its solver with "
                         f"--solver, one of {', '.join(SPEC_FORMS)}")
    return Solver(source_solver(scenario), spec=BUILTIN, torch_step=scenario.source_step)


@contextlib.contextmanager
def open_solver(spec: str | None, trajectories: Trajectories, *, timeout: float = 120.0,
                probe: bool = True) -> Iterator[Solver]:
    """The `Solver` a ``--solver`` value names, probed once on ``trajectories`` (closed on exit).

    Args:
        spec: one of ``SPEC_FORMS`` (grpc[s]://, kserve[s]://, kserve+http[s]://, MODULE:FUNCTION), or None for
            the built-in scenario's in-process source step (only for data made by ``sol generate``).
        trajectories: the comparison's data (probe states; the built-in scenario).
        timeout: deadline of each remote call, in seconds.
        probe: call `Solver.probe` before yielding.
    Raises:
        ValueError: a malformed spec, no spec for data that is not built in, or a failed probe.
        BlackBoxUnavailable: a remote solver that cannot be reached.
    """
    if not spec:
        solver = builtin_solver(trajectories)
    else:
        parsed = BlackBoxSpec.parse(spec)
        try:
            box = open_blackbox(parsed, timeout=timeout, numpy=True)
            torch_step = None if parsed.remote else load_callable(str(parsed))
        except (ImportError, AttributeError, TypeError) as e:
            raise ValueError(f"--solver {spec}: cannot load it ({type(e).__name__}: {e})") from e
        solver = Solver(box, spec=str(parsed), torch_step=torch_step, remote=parsed.remote, close=box.close)
    with solver:
        if probe:
            solver.probe(trajectories)
        yield solver
