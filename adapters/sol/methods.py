"""The four SOL methods, each trained by the engine's one ``Trainer``, and the test metric.

- SRC: the source solver alone (nothing to train).
- NON: the corrector trained supervised on precomputed pairs ``(P_s(ref_t), ref_{t+1})``: the
  one-step SOL loss with the solver's step looked up, back-propagated through the corrector.
- FO-SOL: the n-step unrolled loss, back-propagated through a differentiable torch solver.
- ZO-SOL: the same loss, its gradient estimated from queries of the black-box solver only
  (``SOLOracle``): sparse forward-difference CGE by default, or RGE (``estimator="rge"``); the
  solver runs in-process or behind any black-box spec.

Each method is an (oracle, estimator) pair handed to ``Trainer`` with random training windows
(`training_windows` in a ``SampledBatches``), Adam, an optional warm-up and cosine schedule
(`lr_factor`); checkpoints, resume, progress and the per-step log (``steps.csv``) are the Trainer's.

Test metric (`evaluate`): mean |s_t - ref_t| over cells and channels, for t = 1..T', of a corrected
rollout through the solver from the test trajectories' initial states; per simulation averaged over
time, then mean +- std over simulations.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from deepzero_oracle import CGE, RGE, Autograd, MaskSchedule, SampledBatches, Trainer
from deepzero_oracle.parallel import InlineExecutor, executor_slots, parallelize
from deepzero_oracle.pruning import uniform_ratios
from deepzero_oracle.runs import RunFolder, write_json
from deepzero_oracle.theta import parameter_slots

from .corrector import check_corrector, load_factory, make_corrector
from .data import SOLConfig, SOLData
from .oracle import SOLOracle
from .solver import Solver, SolverDiverged, solve_checked
from .trajectories import Trajectories

__all__ = ["METHODS", "build_corrector", "check_resumable", "evaluate", "load_corrector", "lr_factor",
           "method_settings", "method_trainer", "rollout", "train_method", "training_windows", "zo_estimator"]

METHODS = ("src", "non", "fo-sol", "zo-sol")


def build_corrector(cfg: SOLConfig, data: SOLData) -> nn.Module:
    """The comparison's float64 corrector, seeded by ``cfg.seed``: the default CNN sized from C and F
    (F = K params as constant fields, unless the data carries fields), or ``cfg.corrector``'s
    ``factory(channels, n_params)``, checked once on two training states (ValueError if unfit)."""
    traj = data.trajectories
    if not cfg.corrector:
        return make_corrector(traj.channels, data.train_fields.shape[1], data.stats, periodic=traj.periodic,
                              hidden=cfg.hidden, depth=cfg.depth, kernel=cfg.kernel, seed=cfg.seed)
    factory = load_factory(cfg.corrector)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        module = factory(traj.channels, data.train_fields.shape[1])
    if isinstance(module, nn.Module):
        module = module.to(torch.float64)
    return check_corrector(module, torch.from_numpy(traj.train_states[:2, 0]),
                           torch.from_numpy(data.train_fields[:2]), f"--corrector {cfg.corrector}")


def training_windows(data: SOLData, *, unroll: int, batch_size: int,
                     pairs: bool = False) -> Callable[[torch.Generator], tuple]:
    """``draw(generator) -> SOLOracle.bind arguments`` for one step's random training windows.

    Args:
        data: `SOLData`.
        unroll: solver steps per window; batch_size: windows per step.
        pairs: NON's one-step pairs instead (the same data volume: ``batch_size * unroll`` pairs, each
            with its precomputed solver step).
    Returns:
        ``draw`` for ``SampledBatches``: ``(start [B, C, H, W], params [B, K], fields [B, F, H, W],
        targets [B, n, C, H, W][, first_step [B, C, H, W]])``.
    """
    traj = data.trajectories.check_unroll(unroll)
    ref, pf, params, n_sims = traj.train_states, data.train_fields, traj.train_params, traj.train_states.shape[0]

    def sol_windows(gen):
        i = torch.randint(n_sims, (batch_size,), generator=gen).numpy()
        t0 = torch.randint(ref.shape[1] - unroll, (batch_size,), generator=gen).numpy()
        targets = np.stack([ref[i, t0 + k + 1] for k in range(unroll)], axis=1)
        return torch.from_numpy(ref[i, t0]), params[i], torch.from_numpy(pf[i]), torch.from_numpy(targets)

    def non_pairs(gen):
        n = batch_size * unroll
        j = torch.randint(n_sims, (n,), generator=gen).numpy()
        t = torch.randint(data.train_src_next.shape[1], (n,), generator=gen).numpy()
        return (torch.from_numpy(ref[j, t]), params[j], torch.from_numpy(pf[j]),
                torch.from_numpy(ref[j, t + 1])[:, None], torch.from_numpy(data.train_src_next[j, t]))

    return non_pairs if pairs else sol_windows


def method_trainer(cfg: SOLConfig, method: str, data: SOLData, run_dir, *, solver,
                   progress: bool | None = None, executor=None) -> tuple[Trainer, SampledBatches]:
    """The ``Trainer`` and the window source of one trained method (``non``, ``fo-sol``, ``zo-sol``).

    Args:
        cfg: the comparison's recipe.
        data: the comparison's data (`prepare_data`).
        run_dir: the method's folder (checkpoint, logs).
        solver: a `Solver` (or a plain callable): ZO-SOL's black box, FO-SOL's torch step.
        executor: where ZO-SOL's queries run (``open_executor``; None: here). Each step's
            ``active + 1`` rollouts are split into one block per worker slot, each rolled out by
            its own solver calls padded to the block: the loss of a row does not depend on the
            other rows of its call (independent simulations), so the results equal inline ones.
    Raises:
        ValueError: FO-SOL with a solver that has no gradient path; an unfit ``--corrector``.
    """
    solver = Solver.of(solver)
    corr = build_corrector(cfg, data)
    masks = None
    if method == "non":
        oracle, estimator = SOLOracle(corr, None, 1), Autograd()
    elif method == "fo-sol":
        step = solver.gradient_step(data.trajectories)
        oracle, estimator = SOLOracle(corr, None, cfg.unroll, differentiable_solver=step), Autograd()
    elif method == "zo-sol":
        slots = parameter_slots(corr)
        masks = (MaskSchedule(slots, uniform_ratios(slots, cfg.sparsity), redraw_every=cfg.redraw_every, unit="step")
                 if cfg.sparsity > 0 or cfg.estimator == "cge" else None)
        estimator = zo_estimator(cfg)
        # f(theta) rides in the same solver calls as its perturbations (CGE joint=True), so a
        # solver whose batch members interact cannot bias the differences
        rows = cfg.q if cfg.estimator == "rge" else masks.active + 1  # thetas per oracle request
        fanned = executor is not None and not isinstance(executor, InlineExecutor)
        block = -(-rows // executor_slots(executor)) if fanned else rows
        # the workers' solver calls reach SOLOracle.solver_calls through its counters()
        oracle = parallelize(SOLOracle(corr, solver, cfg.unroll, max_batch=block), executor, block=block)
    else:
        raise ValueError(f"method must be one of {METHODS[1:]} to train, got {method!r}")
    opt = torch.optim.Adam(corr.parameters(), lr=cfg.zo_rate if method == "zo-sol" else cfg.lr)
    # a closed-form factor of the step index: a resumed run follows the schedule of its --steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(cfg, t))
    settings = method_settings(cfg, method, data.trajectories, solver)
    trainer = Trainer(oracle, estimator, opt, scheduler=schedule, scheduler_interval="step", mask_schedule=masks,
                      clip_norm=cfg.clip if method == "zo-sol" and cfg.clip > 0 else None,
                      out_dir=run_dir, checkpoint_every=cfg.checkpoint_every, settings=settings,
                      seed=cfg.seed, progress=progress, desc=f"{data.trajectories.label} {method}")
    windows = training_windows(data, unroll=cfg.unroll, batch_size=cfg.batch_size, pairs=method == "non")
    return trainer, SampledBatches(windows, seed=cfg.seed)


def zo_estimator(cfg: SOLConfig):
    """ZO-SOL's estimator: ``CGE(mu, joint=True)`` or ``RGE(q, mu, distribution, antithetic)``."""
    if cfg.estimator == "rge":
        return RGE(q=cfg.q, mu=cfg.mu, distribution=cfg.distribution, antithetic=cfg.antithetic)
    return CGE(mu=cfg.mu, joint=True)


def lr_factor(cfg: SOLConfig, step: int) -> float:
    """The learning rate's factor at ``step``: a linear warm-up over ``cfg.warmup`` steps (from
    1 / warmup), times the cosine decay to 0 over ``cfg.steps`` (``lr_schedule="cosine"``) or 1."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_schedule != "cosine":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))


# recipe fields added after run folders existed: left out of the settings at their defaults, so
# such a folder still resumes
_LATER_FIELDS = {k: getattr(SOLConfig(), k) for k in ("estimator", "q", "distribution", "antithetic", "warmup", "clip")}


def method_settings(cfg: SOLConfig, method: str, trajectories: Trajectories, solver) -> dict:
    """What a resumed run must share (the Trainer's ``settings``): the method, the recipe, the data's
    content (digest) and the solver's identity (spec)."""
    recipe = {k: v for k, v in cfg.to_dict().items()
              if k != "checkpoint_every" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    return {"method": method, **recipe, "data": trajectories.digest(), "solver": Solver.of(solver).spec}


def check_resumable(cfg: SOLConfig, method: str, trajectories: Trajectories, solver, run_dir) -> None:
    """Raise ``SettingsMismatch`` (naming each difference) if ``run_dir`` holds a run of other settings,
    before anything is computed or written; nothing to check for a new run."""
    RunFolder(run_dir, method_settings(cfg, method, trajectories, solver)).check_checkpoint()


def train_method(cfg: SOLConfig, method: str, data: SOLData | None, run_dir, *, solver,
                 progress: bool | None = None, restart: bool = False, executor=None,
                 max_queries: int | None = None) -> dict:
    """Train one method's corrector (``src`` trains nothing, and needs no data); resumes from ``run_dir``.

    Args:
        cfg: the recipe.
        data: the `SOLData`.
        run_dir: the method's folder.
        solver: a `Solver` (or a plain callable ``f(state, params)``).
        restart: start over instead of continuing a checkpoint in ``run_dir``.
        executor: where ZO-SOL's queries run (`method_trainer`); None: here.
        max_queries: stop before the method's oracle queries (all runs of ``run_dir`` together)
            would exceed it; the checkpoint is kept and ``stopped_reason`` says so. A later call
            with a larger budget continues the run.
    Returns:
        ``{"method", "solver" (its spec), "step", "queries" (of the black-box solver: ZO-SOL only),
        "solver_calls", "seconds", "history": [loss per step], "stopped_reason" (None when
        training finished), "oracle_queries" (what ``max_queries`` counts)}``; also written to ``run_dir/train.json``.
    Raises:
        TrainingDiverged: the rollout became non-finite; the last good checkpoint stays in run_dir.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.set_num_threads(1)  # the solver is slower with 2 threads on a shared machine
    run_dir = Path(run_dir)
    solver = Solver.of(solver)
    if method == "src":
        summary = {"method": method, "step": 0, "queries": 0, "solver_calls": 0, "seconds": 0.0, "history": [],
                   "stopped_reason": None}
    else:
        trainer, windows = method_trainer(cfg, method, data, run_dir, solver=solver, progress=progress,
                                          executor=executor)
        trainer.fit(windows, max_steps=cfg.steps, max_queries=max_queries, resume=not restart)
        # queries of the black-box solver: NON and FO-SOL evaluate their loss in process (by
        # autograd, one engine query per step) and never query the black box
        black_box = trainer.oracle.solver is not None
        summary = {"method": method, "step": trainer.step, "queries": trainer.oracle.queries if black_box else 0,
                   "solver_calls": trainer.oracle.solver_calls, "seconds": trainer.seconds,
                   "history": step_losses(run_dir), "stopped_reason": trainer.stopped_reason,
                   "oracle_queries": trainer.oracle.queries}
    summary["solver"] = solver.spec
    write_json(run_dir / "train.json", summary, indent=1)
    return summary


def step_losses(run_dir) -> list[float]:
    """The training loss of every step, from the Trainer's ``steps.csv`` in ``run_dir``."""
    path = Path(run_dir) / "steps.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def load_corrector(cfg: SOLConfig, data: SOLData, run_dir) -> nn.Module:
    """The corrector trained by `train_method`, from ``run_dir/checkpoint.pt``, built by the recipe the
    checkpoint records (``cfg`` for older checkpoints), whatever the folder's recipe is now."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained corrector in {run_dir}: run `sol train` for this method first")
    checkpoint = torch.load(path, weights_only=True)
    recipe = SOLConfig.from_dict({**cfg.to_dict(), **(checkpoint.get("settings") or {})})
    corr = build_corrector(recipe, data)
    corr.load_state_dict(checkpoint["learner"])
    return corr


def rollout(solver: Callable, start: torch.Tensor, params: np.ndarray, steps: int, *,
            correct: Callable | None = None) -> torch.Tensor:
    """``steps`` solver steps from ``start [N, C, H, W]`` with ``params [N, K]``, each followed by
    ``correct(state) -> state`` if given. Returns ``[N, steps + 1, C, H, W]`` float64; raises
    `SolverDiverged` when a state becomes NaN/Inf."""
    states = [start]
    for t in range(int(steps)):
        nxt = solve_checked(solver, states[-1], params, f"rollout step {t + 1}")
        states.append(correct(nxt) if correct is not None else nxt)
    return torch.stack(states, dim=1)


def evaluate(trajectories: Trajectories, solver, corrector: nn.Module | None = None, *,
             test_fields: np.ndarray | None = None) -> dict:
    """Test MAE: rollouts of the solver (corrected, with ``corrector``) from the test trajectories'
    initial states, against the test trajectories.

    Args:
        trajectories: the data; solver: ``f(state, params)`` (a `Solver` or any callable).
        corrector: ``corrector(state [N, C, H, W], fields [N, F, H, W]) -> correction``; None: SRC.
        test_fields: the corrector's test fields (default: ``trajectories.corrector_fields("test")``).
    Returns:
        ``{"mae_mean", "mae_std", "mae_per_sim" [S'], "mae_over_time" [T'], "mae_per_sim_over_time"
        [S', T'] (each simulation's MAE at each step), "snapshot": {"reference",
        "source", "corrected"} (each ``[C, H, W]`` of test simulation 0 at the last step; velocities at
        cell centres for built-in scenarios), "diverged"}``.
    """
    from .builtin import scenario_of

    torch.set_num_threads(1)
    ref = torch.from_numpy(trajectories.test_states)
    params, steps = trajectories.test_params, ref.shape[1] - 1
    correct = None
    if corrector is not None:
        pf = torch.from_numpy(trajectories.corrector_fields("test") if test_fields is None else test_fields)

        def correct(s):
            return s + corrector(s, pf)
    diverged = False
    with torch.no_grad():
        try:
            traj = rollout(solver, ref[:, 0], params, steps, correct=correct)
        except SolverDiverged:  # the corrected rollout blew up
            diverged = True
            traj = torch.full_like(ref, float("inf"))
        src = rollout(solver, ref[:, 0], params, steps) if corrector is not None else traj
    err = (traj[:, 1:] - ref[:, 1:]).abs().mean(dim=(2, 3, 4))  # [N, T]
    per_sim = err.mean(dim=1)
    scenario = scenario_of(trajectories)
    centered = scenario.to_centered if scenario is not None else (lambda s: s)
    return {"mae_mean": float(per_sim.mean()), "mae_std": float(per_sim.std(unbiased=False)),
            "mae_per_sim": per_sim.tolist(), "mae_over_time": err.mean(dim=0).tolist(),
            "mae_per_sim_over_time": err.tolist(), "diverged": diverged,
            "snapshot": {"reference": centered(ref[:1, steps])[0].numpy(),
                         "source": centered(src[:1, steps])[0].numpy(),
                         "corrected": centered(traj[:1, steps])[0].numpy()}}
