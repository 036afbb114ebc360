"""The four SOL methods (SRC, NON, FO-SOL, ZO-SOL), the unrolled loss and the test metric.

- SRC: the source solver alone.
- NON: corrector trained supervised (autograd) on pre-computed pairs (source_step(ref_t), ref_{t+1}).
- FO-SOL: the n-step unrolled loss, back-propagated through the differentiable torch solver.
- ZO-SOL: the same loss, estimated by sparse forward-difference CGE from solver queries only
  (`SOLOracle`); the solver runs in-process or behind `GrpcBlackBox`.

Unrolled loss of one window (case i, start t0):  s_0 = ref[i, t0];  s_k = P_s(s_{k-1}) + c(P_s(s_{k-1}));
``loss = mean_k mean |s_k - ref[i, t0 + k]|^2`` (k = 1..n), averaged over the windows.
Test metric: mean |s_t - ref_t| over cells and channels, for t = 1..T, of a corrected rollout from the
test cases' initial source states; per simulation averaged over time, then mean +- std over simulations.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deepzero_oracle import CGE, MaskSchedule, NonFiniteLossError, Oracle, assign_gradient
from deepzero_oracle.theta import parameter_slots
from deepzero_oracle.pruning import uniform_ratios

from .corrector import Corrector, make_corrector
from .data import SOLConfig, SOLData, scenario_for

__all__ = ["METHODS", "SolverDiverged", "SOLOracle", "BatchedCGE", "train_method", "evaluate_method",
           "unrolled_loss", "source_solver", "load_corrector"]

METHODS = ("src", "non", "fo-sol", "zo-sol")


class SolverDiverged(RuntimeError):
    """The solver produced (or was about to receive) non-finite states during training."""


def source_solver(scenario) -> Callable:
    """The in-process black box: ``f(state [N, C, H, W] ndarray, params [N, K]) -> [N, C, H, W]``."""
    def solve(state, params):
        return np.asarray(scenario.source_step(np.asarray(state, np.float64), np.asarray(params, np.float64)))
    return solve


def _solve_checked(solver: Callable, state: torch.Tensor, params: np.ndarray, where: str) -> torch.Tensor:
    """Call the black-box solver on float64 arrays; non-finite in or out -> SolverDiverged."""
    s = state.detach().numpy()
    if not np.isfinite(s).all():
        raise SolverDiverged(f"{where}: the corrected state became NaN/Inf before the solver call")
    res = solver(s, params)
    # Always a fresh torch allocation: numpy buffers and wire buffers have other alignments, and torch's
    # vectorized reductions then sum in another order (last-bit differences between in-process and gRPC).
    out = torch.as_tensor(np.asarray(res) if not isinstance(res, torch.Tensor) else res.detach())
    out = out.to(torch.float64).clone(memory_format=torch.contiguous_format)
    if not torch.isfinite(out).all():
        raise SolverDiverged(f"{where}: the solver returned NaN/Inf")
    return out


class SOLOracle(Oracle):
    """theta -> n-step unrolled SOL loss, using only queries of the source solver.

    All P thetas of one call are rolled out together: per time step, the P x B states go to the
    solver in *one* call (padded to a fixed ``rows`` so a JIT-compiled solver sees one shape).

    Args:
        corrector: the `Corrector` (its parameters define theta's layout; never back-propagated).
        solver: ``f(state [N, C, H, W], params [N, K]) -> [N, C, H, W]`` (in-process or GrpcBlackBox).
        unroll: n.
        max_batch: thetas per solver call (the base class splits larger requests).
        budget: optional query budget.
    """

    def __init__(self, corrector: Corrector, solver: Callable, unroll: int, *, max_batch: int = 64,
                 budget: int | None = None):
        self.corrector = corrector
        self.slots = parameter_slots(corrector)
        super().__init__(sum(s.numel for s in self.slots), budget=budget, max_batch=max_batch)
        self.solver, self.unroll = solver, int(unroll)
        self.solver_calls = 0
        self._bound = None

    def bind(self, start: torch.Tensor, params: np.ndarray, param_fields: torch.Tensor,
             targets: torch.Tensor) -> "SOLOracle":
        """Set the training windows.

        Args:
            start: ``[B, C, H, W]`` initial states (reference at t0).
            params: ``[B, K]`` physics parameters.
            param_fields: ``[B, P_f, H, W]``.
            targets: ``[B, n, C, H, W]`` reference states at t0+1..t0+n.
        Returns:
            self.
        """
        self._bound = (start, np.asarray(params, np.float64), param_fields, targets)
        return self

    def theta(self) -> torch.Tensor:
        """Current flat parameters ``[dim]`` (float64)."""
        return torch.cat([p.detach().reshape(-1) for p in self.corrector.parameters()])

    def evaluate_losses(self, thetas: torch.Tensor) -> torch.Tensor:
        if self._bound is None:
            raise RuntimeError("SOLOracle: call bind(...) before querying")
        start, params, pf, targets = self._bound
        P, B = thetas.shape[0], start.shape[0]
        rows = self.max_batch * B
        pdict = {s.name: thetas[:, s.offset:s.offset + s.numel].reshape(P, *s.shape).to(torch.float64)
                 for s in self.slots}
        p_rep = np.tile(params, (self.max_batch, 1))  # fixed shape: padded rows repeat real cases
        state = start.expand(P, *start.shape)
        loss = torch.zeros(P, dtype=torch.float64)
        with torch.no_grad():
            for k in range(self.unroll):
                flat = state.reshape(P * B, *state.shape[2:])
                if P * B < rows:
                    flat = torch.cat([flat, flat[:B].repeat(rows // B - P, 1, 1, 1)])
                nxt = _solve_checked(self.solver, flat, p_rep, f"ZO-SOL query, unroll step {k + 1}")
                self.solver_calls += 1
                nxt = nxt[:P * B].reshape(P, B, *start.shape[1:])
                state = nxt + self.corrector.batched(nxt, pf, pdict)
                loss += ((state - targets[:, k]) ** 2).mean(dim=(1, 2, 3, 4))
        return loss / self.unroll


class BatchedCGE(CGE):
    """Sparse forward-difference CGE that asks for f(theta) and all perturbations in ONE request.

    Same estimate as ``CGE(mu, "forward")`` (``g_i = (l(theta + mu e_i) - l(theta)) / mu``, C + 1
    queries) but f(theta) rides in the same solver calls as its perturbations, so a solver whose batch
    members interact (iterative solves) cannot bias the differences.
    """

    def estimate(self, oracle, theta, mask=None, generator=None):
        """``theta [dim]``, optional bool ``mask [dim]`` -> estimate ``[dim]`` (zeros off the mask)."""
        coords = torch.arange(oracle.dim) if mask is None else torch.nonzero(mask).flatten()
        thetas = theta.repeat(len(coords) + 1, 1)
        thetas[torch.arange(1, len(coords) + 1), coords] += self.mu
        values = oracle.losses(thetas)
        self.last_base = values[0]  # the loss at theta itself, for logging
        grad = torch.zeros_like(theta)
        grad[coords] = (values[1:] - values[0]) / self.mu
        return grad


def unrolled_loss(corrector: Corrector, scenario, start, params, param_fields, targets, unroll: int) -> torch.Tensor:
    """The SOL-n loss with autograd through the torch solver (FO-SOL; also the reference for tests).

    Args: as `SOLOracle.bind` (torch float64 tensors; params ``[B, K]`` ndarray/tensor).
    Returns: 0-d tensor.
    """
    p = torch.as_tensor(np.asarray(params), dtype=torch.float64)
    state, loss = start, 0.0
    for k in range(unroll):
        if not torch.isfinite(state).all():
            raise SolverDiverged(f"FO-SOL: the corrected state became NaN/Inf at unroll step {k + 1}")
        nxt = scenario.source_step(state, p)
        state = nxt + corrector(nxt, param_fields)
        loss = loss + ((state - targets[:, k]) ** 2).mean()
    return loss / unroll


def _windows(cfg: SOLConfig, data: SOLData, gen: torch.Generator):
    """Random windows: (case index [B], start time [B])."""
    i = torch.randint(cfg.n_train, (cfg.batch,), generator=gen)
    t0 = torch.randint(data.train_ref.shape[1] - cfg.unroll, (cfg.batch,), generator=gen)
    return i.numpy(), t0.numpy()


def _window_tensors(cfg, data, i, t0):
    ref = data.train_ref
    start = torch.from_numpy(ref[i, t0])
    targets = torch.from_numpy(np.stack([ref[i, t0 + k + 1] for k in range(cfg.unroll)], axis=1))
    return start, data.train_cases.params[i], torch.from_numpy(data.train_pf[i]), targets


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_corrector(cfg: SOLConfig, data: SOLData, run_dir) -> Corrector:
    """The corrector saved by `train_method` in ``run_dir/checkpoint.pt``."""
    corr = make_corrector(scenario_for(cfg), data.stats, hidden=cfg.hidden, depth=cfg.depth, kernel=cfg.kernel,
                          seed=cfg.seed)
    ck = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)
    corr.load_state_dict(ck["corrector"])
    return corr


def train_method(cfg: SOLConfig, method: str, data: SOLData, run_dir, *, solver: Callable | None = None,
                 progress: bool = True, restart: bool = False) -> dict:
    """Train one method's corrector; resumes from ``run_dir/checkpoint.pt``.

    Args:
        cfg: config; method: one of ``non``, ``fo-sol``, ``zo-sol`` (``src`` trains nothing).
        data: from `prepare_data`.
        run_dir: where ``checkpoint.pt`` and ``train.json`` go.
        solver: ZO-SOL's black box ``f(state, params)`` (default: the in-process source step).
        progress: tqdm bar.
        restart: ignore an existing checkpoint.
    Returns:
        ``{"method", "steps", "queries", "solver_calls", "seconds", "history": [loss per step]}``.
    Raises:
        SolverDiverged: the rollout became non-finite; the last good checkpoint stays in run_dir.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.set_num_threads(1)  # the solver is slower with 2 threads on a shared machine
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sc = scenario_for(cfg)
    corr = make_corrector(sc, data.stats, hidden=cfg.hidden, depth=cfg.depth, kernel=cfg.kernel, seed=cfg.seed)
    state = {"step": 0, "queries": 0, "solver_calls": 0, "seconds": 0.0, "history": []}
    if method == "src":
        _save_atomic({"corrector": corr.state_dict(), "config": cfg.to_dict(), **state}, run_dir / "checkpoint.pt")
        return {"method": method, **state}
    opt = torch.optim.Adam(corr.parameters(), lr=cfg.lr)
    # Closed-form factor of the step index, so a resumed run follows the schedule of its --steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps)))
        if cfg.lr_schedule == "cosine" else (lambda t: 1.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    oracle = masks = None
    if method == "zo-sol":
        solver = solver or source_solver(sc)
        masks = MaskSchedule(parameter_slots(corr), uniform_ratios(parameter_slots(corr), cfg.sparsity),
                             redraw_every=cfg.redraw_every)
        dim = sum(p.numel() for p in corr.parameters())
        active = int(masks.mask_for(0, torch.Generator().manual_seed(0)).sum())
        masks = MaskSchedule(masks.slots, masks.ratios, redraw_every=cfg.redraw_every)  # fresh, unseeded draw
        oracle = SOLOracle(corr, solver, cfg.unroll, max_batch=active + 1)
        estimator = BatchedCGE(mu=cfg.mu)
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists() and not restart:
        ck = torch.load(ckpt, weights_only=False)
        if ck.get("method") == method:
            corr.load_state_dict(ck["corrector"])
            opt.load_state_dict(ck["optimizer"])
            if ck.get("schedule"):
                schedule.load_state_dict(ck["schedule"])
            gen.set_state(ck["generator"])
            if masks is not None and ck.get("masks"):
                masks.load_state_dict(ck["masks"])
            state = {k: ck[k] for k in state}
            if oracle is not None:
                oracle.queries, oracle.solver_calls = state["queries"], state["solver_calls"]

    def save():
        _save_atomic({"method": method, "corrector": corr.state_dict(), "optimizer": opt.state_dict(),
                      "schedule": schedule.state_dict(),
                      "generator": gen.get_state(), "masks": masks.state_dict() if masks else None,
                      "config": cfg.to_dict(), **state}, ckpt)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{cfg.scenario} {method}", disable=not progress)
    last_good = state["step"]
    while state["step"] < cfg.steps:
        t_start = time.perf_counter()
        i, t0 = _windows(cfg, data, gen)
        try:
            if method == "non":
                # NON: the same data volume as SOL (batch * unroll pairs), one solver step each, precomputed
                j = torch.randint(cfg.n_train, (cfg.batch * cfg.unroll,), generator=gen).numpy()
                t = torch.randint(data.train_src_next.shape[1], (cfg.batch * cfg.unroll,), generator=gen).numpy()
                x = torch.from_numpy(data.train_src_next[j, t])
                y = torch.from_numpy(data.train_ref[j, t + 1])
                opt.zero_grad()
                loss = ((x + corr(x, torch.from_numpy(data.train_pf[j])) - y) ** 2).mean()
                loss.backward()
            elif method == "fo-sol":
                opt.zero_grad()
                loss = unrolled_loss(corr, sc, *_window_tensors(cfg, data, i, t0), cfg.unroll)
                loss.backward()
                state["solver_calls"] += cfg.unroll
            else:
                oracle.bind(*_window_tensors(cfg, data, i, t0))
                mask = masks.mask_for(state["step"], gen)
                theta = oracle.theta()
                grad = estimator.estimate(oracle, theta, mask)
                assign_gradient(corr.parameters(), grad)
                state["queries"], state["solver_calls"] = oracle.queries, oracle.solver_calls
                loss = estimator.last_base  # l(theta) came with the perturbations
            if not torch.isfinite(loss):
                raise SolverDiverged(f"{method}: loss became NaN/Inf")
            opt.step()
            schedule.step()
        except (SolverDiverged, NonFiniteLossError) as e:
            bar.close()
            raise SolverDiverged(
                f"{cfg.scenario} {method}: training diverged at step {state['step'] + 1} ({e}). Stopped; the last "
                f"good checkpoint (step {last_good}) is kept at {ckpt}. Lower --lr or --mu, or shorten --unroll."
            ) from e
        state["step"] += 1
        state["seconds"] += time.perf_counter() - t_start
        state["history"].append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
            save()
            last_good = state["step"]
    bar.close()
    if not ckpt.exists():
        save()
    summary = {"method": method, **state}
    (run_dir / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def evaluate_method(cfg: SOLConfig, method: str, data: SOLData, run_dir=None, *, corrector: Corrector | None = None) -> dict:
    """Test MAE of one method: corrected source rollouts of the test cases vs the down-sampled reference.

    Args:
        cfg, data: as for training; method: one of `METHODS`.
        run_dir: where the trained corrector is (not needed for ``src`` or with ``corrector``).
        corrector: use this corrector instead of loading one.
    Returns:
        ``{"mae_mean", "mae_std", "mae_per_sim" [N_test], "mae_over_time" [T], "snapshot": {"reference",
        "source", "corrected"} (each ``[C, H, W]`` of test case 0 at the last step), "diverged"}``.
    """
    torch.set_num_threads(1)
    sc = scenario_for(cfg)
    ref = torch.from_numpy(data.test_ref)
    params = torch.from_numpy(data.test_cases.params)
    pf = torch.from_numpy(data.test_pf)
    if method != "src" and corrector is None:
        corrector = load_corrector(cfg, data, run_dir)
    correct = None
    if method != "src":
        def correct(s, p, t):
            return s + corrector(s, pf)
    diverged = False
    with torch.no_grad():
        try:
            traj = sc.rollout(ref[:, 0], params, cfg.test_steps, correct=correct)
        except ValueError as e:  # NaN state passed to the solver: the corrected rollout blew up
            if "NaN" not in str(e):
                raise
            diverged = True
            traj = torch.full_like(ref, float("inf"))
        src = sc.rollout(ref[:, 0], params, cfg.test_steps) if method != "src" else traj
    err = (traj[:, 1:] - ref[:, 1:]).abs().mean(dim=(2, 3, 4))  # [N, T]
    per_sim = err.mean(dim=1)
    last = cfg.test_steps
    return {"mae_mean": float(per_sim.mean()), "mae_std": float(per_sim.std(unbiased=False)),
            "mae_per_sim": per_sim.tolist(), "mae_over_time": err.mean(dim=0).tolist(), "diverged": diverged,
            "snapshot": {"reference": sc.to_centered(ref[:1, last])[0].numpy(),
                         "source": sc.to_centered(src[:1, last])[0].numpy(),
                         "corrected": sc.to_centered(traj[:1, last])[0].numpy()}}
