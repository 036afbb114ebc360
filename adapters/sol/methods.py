"""The four SOL methods, each trained by the engine's one ``Trainer``, and the test metric.

- SRC: the source solver alone (nothing to train).
- NON: the corrector trained supervised on precomputed pairs ``(P_s(ref_t), ref_{t+1})``: the
  one-step SOL loss with the solver's step looked up, back-propagated through the corrector.
- FO-SOL: the n-step unrolled loss, back-propagated through the differentiable torch solver.
- ZO-SOL: the same loss, estimated by sparse forward-difference CGE from queries of the black-box
  solver only (``SOLOracle``); the solver runs in-process or behind a gRPC server.

Each method is an (oracle, estimator) pair handed to ``Trainer`` with random training windows
(``SampledBatches``), Adam and an optional cosine schedule; checkpoints, resume, progress and the
per-step log (``steps.csv``) are the Trainer's.

Test metric: mean |s_t - ref_t| over cells and channels, for t = 1..T, of a corrected rollout from
the test cases' initial source states; per simulation averaged over time, then mean +- std over
simulations.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deepzero_oracle import CGE, Autograd, MaskSchedule, SampledBatches, Trainer
from deepzero_oracle.atomic import write_json
from deepzero_oracle.pruning import uniform_ratios
from deepzero_oracle.theta import parameter_slots

from .corrector import Corrector, make_corrector
from .data import SOLConfig, SOLData, scenario_for
from .oracle import SOLOracle

__all__ = ["METHODS", "train_method", "evaluate_method", "source_solver", "load_corrector", "method_trainer"]

METHODS = ("src", "non", "fo-sol", "zo-sol")


def source_solver(scenario) -> Callable:
    """The in-process black box: ``f(state [N, C, H, W] ndarray, params [N, K]) -> [N, C, H, W]``."""
    def solve(state, params):
        return np.asarray(scenario.source_step(np.asarray(state, np.float64), np.asarray(params, np.float64)))
    return solve


def _window_draw(cfg: SOLConfig, data: SOLData, method: str) -> Callable[[torch.Generator], tuple]:
    """``draw(generator) -> SOLOracle.bind arguments`` for one step's random windows.

    SOL methods: ``batch_size`` windows of ``unroll`` steps. NON: the same data volume as
    ``batch_size * unroll`` one-step pairs, each with its precomputed solver step.
    """
    ref, pf, params = data.train_ref, data.train_pf, data.train_cases.params

    def sol_windows(gen):
        i = torch.randint(cfg.n_train, (cfg.batch_size,), generator=gen).numpy()
        t0 = torch.randint(ref.shape[1] - cfg.unroll, (cfg.batch_size,), generator=gen).numpy()
        targets = np.stack([ref[i, t0 + k + 1] for k in range(cfg.unroll)], axis=1)
        return torch.from_numpy(ref[i, t0]), params[i], torch.from_numpy(pf[i]), torch.from_numpy(targets)

    def non_pairs(gen):
        n = cfg.batch_size * cfg.unroll
        j = torch.randint(cfg.n_train, (n,), generator=gen).numpy()
        t = torch.randint(data.train_src_next.shape[1], (n,), generator=gen).numpy()
        return (torch.from_numpy(ref[j, t]), params[j], torch.from_numpy(pf[j]),
                torch.from_numpy(ref[j, t + 1])[:, None], torch.from_numpy(data.train_src_next[j, t]))

    return non_pairs if method == "non" else sol_windows


def method_trainer(cfg: SOLConfig, method: str, data: SOLData, run_dir, *, solver: Callable | None = None,
                   progress: bool = True) -> tuple[Trainer, SampledBatches]:
    """The ``Trainer`` and the window source of one trained method (``non``, ``fo-sol``, ``zo-sol``).

    Args:
        cfg, data: the comparison's config and data (`prepare_data`).
        run_dir: the method's folder (checkpoint, logs).
        solver: ZO-SOL's black box ``f(state, params)`` (default: the in-process source step).
    """
    sc = scenario_for(cfg)
    corr = make_corrector(sc, data.stats, hidden=cfg.hidden, depth=cfg.depth, kernel=cfg.kernel, seed=cfg.seed)
    masks = None
    if method == "non":
        oracle, estimator = SOLOracle(corr, None, 1), Autograd()
    elif method == "fo-sol":
        oracle, estimator = SOLOracle(corr, None, cfg.unroll, differentiable_solver=sc.source_step), Autograd()
    elif method == "zo-sol":
        slots = parameter_slots(corr)
        masks = MaskSchedule(slots, uniform_ratios(slots, cfg.sparsity), redraw_every=cfg.redraw_every, unit="step")
        # f(theta) rides in the same solver calls as its perturbations (CGE joint=True), so a
        # solver whose batch members interact cannot bias the differences
        oracle = SOLOracle(corr, solver or source_solver(sc), cfg.unroll, max_batch=masks.active + 1)
        estimator = CGE(mu=cfg.mu, joint=True)
    else:
        raise ValueError(f"method must be one of {METHODS[1:]} to train, got {method!r}")
    opt = torch.optim.Adam(corr.parameters(), lr=cfg.lr)
    # a closed-form factor of the step index: a resumed run follows the schedule of its --steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps)))
        if cfg.lr_schedule == "cosine" else (lambda t: 1.0))
    settings = {"method": method, **{k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}}
    trainer = Trainer(oracle, estimator, opt, scheduler=schedule, scheduler_interval="step", mask_schedule=masks,
                      out_dir=run_dir, checkpoint_every=cfg.checkpoint_every, settings=settings, seed=cfg.seed,
                      progress=progress, desc=f"{cfg.scenario} {method}")
    return trainer, SampledBatches(_window_draw(cfg, data, method), seed=cfg.seed)


def train_method(cfg: SOLConfig, method: str, data: SOLData, run_dir, *, solver: Callable | None = None,
                 progress: bool = True, restart: bool = False) -> dict:
    """Train one method's corrector (``src`` trains nothing); resumes from ``run_dir``.

    Returns:
        ``{"method", "step", "queries" (of the black-box solver: ZO-SOL only), "solver_calls",
        "seconds", "history": [loss per step]}``.
    Raises:
        TrainingDiverged: the rollout became non-finite; the last good checkpoint stays in run_dir.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.set_num_threads(1)  # the solver is slower with 2 threads on a shared machine
    run_dir = Path(run_dir)
    if method == "src":
        summary = {"method": method, "step": 0, "queries": 0, "solver_calls": 0, "seconds": 0.0, "history": []}
    else:
        trainer, windows = method_trainer(cfg, method, data, run_dir, solver=solver, progress=progress)
        trainer.fit(windows, max_steps=cfg.steps, resume=not restart)
        # queries of the black-box solver: NON and FO-SOL evaluate their loss in process (by
        # autograd, one engine query per step) and never query the black box
        black_box = trainer.oracle.solver is not None
        summary = {"method": method, "step": trainer.step, "queries": trainer.oracle.queries if black_box else 0,
                   "solver_calls": trainer.oracle.solver_calls, "seconds": trainer.seconds,
                   "history": step_losses(run_dir)}
    write_json(run_dir / "train.json", summary, indent=1)
    return summary


def step_losses(run_dir) -> list[float]:
    """The training loss of every step, from the Trainer's ``steps.csv`` in ``run_dir``."""
    path = Path(run_dir) / "steps.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def load_corrector(cfg: SOLConfig, data: SOLData, run_dir) -> Corrector:
    """The corrector trained by `train_method` (from ``run_dir/checkpoint.pt``); for ``src``
    (no checkpoint) the untrained one, which `evaluate_method` does not use."""
    corr = make_corrector(scenario_for(cfg), data.stats, hidden=cfg.hidden, depth=cfg.depth, kernel=cfg.kernel,
                          seed=cfg.seed)
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained corrector in {run_dir}: run `sol train` for this method first")
    corr.load_state_dict(torch.load(path, weights_only=True)["learner"])
    return corr


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
