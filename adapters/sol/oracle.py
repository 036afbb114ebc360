"""The SOL oracle: corrector parameters -> the n-step unrolled loss, from solver calls only.

One training window (simulation i, start t0), for a corrector c with parameters theta::

    s_0 = ref[i, t0];   s_k = P_s(s_{k-1}) + c(P_s(s_{k-1}); theta)   (k = 1..n)
    loss = mean_k mean |s_k - ref[i, t0 + k]|^2

averaged over the bound windows. ZO-SOL queries the black-box source solver P_s;
FO-SOL back-propagates the same arithmetic through a differentiable torch solver; NON is the
one-step loss with P_s(s_0) looked up from precomputed pairs (no solver call at all).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from deepzero_oracle import LearnerOracle
from deepzero_oracle.theta import unflatten

from .corrector import corrections
from .solver import SolverDiverged, solve_checked, solver_inputs

__all__ = ["SOLOracle", "SolverDiverged", "unrolled_loss"]


def unroll(step: Callable, correct: Callable, start: torch.Tensor, targets: torch.Tensor,
           first_step: torch.Tensor | None = None) -> torch.Tensor:
    """The unrolled loss of P corrector copies at once.

    Args:
        step: ``step(states [P, B, C, H, W], k) -> next [P, B, C, H, W]`` (the source solver).
        correct: ``correct(states [P, B, C, H, W]) -> corrections`` of the same shape.
        start: ``[P, B, C, H, W]`` (or broadcastable) initial states.
        targets: ``[B, n, C, H, W]`` reference states after each step.
        first_step: optional precomputed ``P_s(start)`` ``[B, C, H, W]`` (then no first solver call).
    Returns:
        ``[P]`` losses.
    """
    state, loss = start, 0.0
    for k in range(targets.shape[1]):
        nxt = first_step.expand_as(state) if k == 0 and first_step is not None else step(state, k)
        state = nxt + correct(nxt)
        loss = loss + ((state - targets[:, k]) ** 2).mean(dim=(1, 2, 3, 4))
    return loss / targets.shape[1]


class SOLOracle(LearnerOracle):
    """theta (the corrector's parameters) -> SOL-n loss on the bound windows: a user's solver and
    trajectories become an oracle the engine's ``Trainer`` trains.

    All P thetas of one request are rolled out together: per unroll step, the P x B states go to
    the black-box solver in *one* call, padded to ``max_batch * B`` rows so a JIT-compiled solver
    sees one shape (the rows are independent simulations, so padding never changes an answer).
    ``autograd_gradient`` back-propagates the same loss through ``differentiable_solver``
    (FO-SOL), or through the corrector alone when the bound windows carry their first solver
    step (NON).

    Args:
        corrector: any ``nn.Module`` with ``forward(state [B, C, H, W], param_fields [B, F, H, W]) ->
            correction [B, C, H, W]`` (theta = its trainable parameters); the default `Corrector`
            evaluates P copies by grouped convolutions, others by ``functional_call`` + ``vmap``.
        solver: the black box ``f(state [N, C, H, W], params [N, K]) -> [N, C, H, W]`` (float64
            NumPy arrays in; ``f(state)`` when K = 0), local or remote; None when only precomputed
            steps are used (NON).
        unroll: n, the solver steps per window.
        differentiable_solver: ``g(state tensor, params tensor) -> next state``, differentiable
            by torch (an in-process solver); needed for ``autograd_gradient`` with n > 1.
        max_batch: thetas per solver call (the base class splits larger requests).
        budget: optional query budget.

    Example (ZO-SOL, windows from `deepzero_oracle.adapters.sol.methods.training_windows`)::

        oracle = SOLOracle(corrector, my_step, unroll=4)
        trainer = Trainer(oracle, CGE(mu=1e-4, joint=True), torch.optim.Adam(corrector.parameters(), 3e-3))
        trainer.fit(SampledBatches(training_windows(data, unroll=4, batch_size=4)), max_steps=100)
    """

    def __init__(self, corrector: nn.Module, solver: Callable | None = None, unroll: int = 1, *,
                 differentiable_solver: Callable | None = None, max_batch: int = 64, budget: int | None = None):
        super().__init__(corrector, budget=budget, max_batch=max_batch)
        if int(unroll) < 1:
            raise ValueError(f"unroll must be at least 1 solver step, got {unroll}")
        self.solver, self.unroll = solver, int(unroll)
        self.differentiable_solver = differentiable_solver
        self.solver_calls = 0
        self._bound = None

    def bind(self, start, params, param_fields, targets, first_step=None) -> "SOLOracle":
        """Set the training windows.

        Args:
            start: ``[B, C, H, W]`` initial states (reference at t0).
            params: ``[B, K]`` physical parameters (K may be 0).
            param_fields: ``[B, F, H, W]`` (the corrector's extra inputs).
            targets: ``[B, n, C, H, W]`` reference states at t0+1..t0+n.
            first_step: optional ``[B, C, H, W]``, the solver's step from ``start``, precomputed.
        Returns:
            self.
        """
        targets = torch.as_tensor(targets)
        if targets.dim() != 5 or targets.shape[1] != self.unroll:
            raise ValueError(f"targets must be [B, {self.unroll}, C, H, W] (one reference state per unroll "
                             f"step), got {tuple(targets.shape)}")
        self._bound = (torch.as_tensor(start), np.asarray(params, np.float64), torch.as_tensor(param_fields),
                       targets, None if first_step is None else torch.as_tensor(first_step))
        return self

    def _windows(self):
        if self._bound is None:
            raise RuntimeError("SOLOracle: call bind(...) before querying")
        return self._bound

    def evaluate_losses(self, thetas: torch.Tensor) -> torch.Tensor:
        start, params, pf, targets, first = self._windows()
        P, B = thetas.shape[0], start.shape[0]
        rows = self.max_batch * B
        p_rep = np.tile(params, (self.max_batch, 1))  # fixed shape: padded rows repeat real cases
        weights = unflatten(thetas.to(torch.float64), self.slots)

        def step(state, k):
            if self.solver is None:
                raise ValueError("this SOLOracle has no solver: every window needs its first step "
                                 "precomputed and unroll = 1")
            flat = state.reshape(P * B, *state.shape[2:])
            if P * B < rows:
                flat = torch.cat([flat, flat[:B].repeat(rows // B - P, 1, 1, 1)])
            nxt = solve_checked(self.solver, flat, p_rep, f"SOL query, unroll step {k + 1}")
            self.solver_calls += 1
            return nxt[: P * B].reshape(P, B, *start.shape[1:])

        with torch.no_grad():
            return unroll(step, lambda s: corrections(self.learner, s, pf, weights), start.expand(P, *start.shape),
                          targets, first)

    def evaluate_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, params, pf, targets, first = self._windows()
        theta = theta.clone().requires_grad_(True)
        p = torch.as_tensor(params)
        needs_solver = first is None or self.unroll > 1
        if needs_solver and self.differentiable_solver is None:
            raise NotImplementedError(
                "back-propagating the SOL loss needs a differentiable in-process solver "
                "(differentiable_solver=); a black-box solver is only queried: use a ZO estimator")

        def step(state, k):
            if not torch.isfinite(state).all():
                raise SolverDiverged(f"FO-SOL: the corrected state became NaN/Inf at unroll step {k + 1}")
            self.solver_calls += 1
            return self.differentiable_solver(*solver_inputs(state[0], p))[None]

        weights = unflatten(theta[None], self.slots)
        loss = unroll(step, lambda s: corrections(self.learner, s, pf, weights), start[None], targets, first)[0]
        return torch.autograd.grad(loss, theta)[0], loss

    def counters(self) -> dict[str, int]:
        """Work counted besides queries: ``{"solver_calls": n}`` (on an executor, each worker's
        copy counts its own calls and ``ParallelOracle`` adds them here)."""
        return {"solver_calls": self.solver_calls}

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add worker copies' ``counters()`` growth to this oracle's totals."""
        self.solver_calls += int(counts.get("solver_calls", 0))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "solver_calls": self.solver_calls}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.solver_calls = int(state.get("solver_calls", 0))


def unrolled_loss(corrector: nn.Module, solver: Callable, start, params, param_fields, targets,
                  unroll_steps: int) -> torch.Tensor:
    """The SOL-n loss with autograd through a differentiable torch ``solver(state, params)`` (``solver(state)``
    when K = 0): FO-SOL's loss, and the reference the tests hold the ZO oracle to. Returns a 0-d tensor."""
    p = torch.as_tensor(np.asarray(params), dtype=torch.float64)
    targets = torch.as_tensor(targets)[:, :unroll_steps]

    def step(state, k):
        if not torch.isfinite(state).all():
            raise SolverDiverged(f"FO-SOL: the corrected state became NaN/Inf at unroll step {k + 1}")
        return solver(*solver_inputs(state[0], p))[None]

    return unroll(step, lambda s: corrector(s[0], param_fields)[None], torch.as_tensor(start)[None], targets)[0]
