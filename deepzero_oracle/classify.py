"""Train an image classifier by zeroth-order estimates only (or the FO baseline, same recipe).

This is the engine's end-to-end example and what ``deepzero-oracle train`` runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deepzero_oracle.data import DATASETS, class_balanced_sample, load_dataset
from deepzero_oracle.estimators import CGE, RGE, Autograd
from deepzero_oracle.models import MODELS, build_model
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.pruning import (PRUNERS, MaskSchedule, is_bias_or_norm, load_ratios, random_ratios,
                                     ratios_from_scores, save_ratios, uniform_ratios, zo_grasp_scores)
from deepzero_oracle.train import TensorBoardLogger, Trainer

ESTIMATORS = ("cge", "rge", "fo")


@dataclass
class Recipe:
    """One training run's settings; the defaults are the ones the README reports."""

    dataset: str = "digits"
    model: str = "cnn"
    estimator: str = "cge"
    sparsity: float = 0.0
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
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def make_estimator(recipe: Recipe):
    """The estimator named by the recipe."""
    if recipe.estimator == "cge":
        return CGE(mu=recipe.mu)
    if recipe.estimator == "rge":
        return RGE(q=recipe.q, mu=recipe.mu)
    return Autograd()


def layer_ratios(recipe: Recipe, oracle: ModuleOracle, data, path: Path) -> dict[str, float]:
    """Layer-wise sparsity ratios for the recipe's pruner, computed once and kept in ``path``
    (a resumed run reuses them). ZO-GraSP's queries are counted by the oracle."""
    if path.exists():
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
    save_ratios(path, ratios, pruner=recipe.pruner, sparsity=recipe.sparsity, queries=oracle.queries)
    return ratios


def accuracy_and_loss(learner, x, y, batch: int = 1024) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``learner`` on ``x [N, ...]``, ``y [N]``."""
    correct, total_loss = 0, 0.0
    for s in range(0, len(x), batch):
        logits = learner(x[s : s + batch])
        correct += int((logits.argmax(1) == y[s : s + batch]).sum())
        total_loss += float(F.cross_entropy(logits, y[s : s + batch], reduction="sum"))
    return correct / len(x), total_loss / len(x)


def train_classifier(recipe: Recipe, out_dir, *, progress: bool = True, resume: bool = True) -> dict:
    """Train per ``recipe``; writes ``metrics.json``, ``metrics.csv``, ``checkpoint.pt`` and
    ``curves.png`` under ``out_dir`` and returns the metrics dict."""
    recipe.check()
    torch.manual_seed(recipe.seed)
    dtype = getattr(torch, recipe.dtype)
    data = load_dataset(recipe.dataset, seed=recipe.seed, dtype=dtype)
    learner = build_model(recipe.model, data.image_shape, data.classes).to(dtype)
    oracle = ModuleOracle(learner, F.cross_entropy)
    optimizer = torch.optim.SGD(learner.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(data.x_train) // recipe.batch_size)
    warmup = recipe.warmup_epochs * -(-len(data.x_train) // recipe.batch_size)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup))
    scheduler = cosine if warmup == 0 else torch.optim.lr_scheduler.SequentialLR(
        optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, total_iters=warmup), cosine], [warmup])
    out = Path(out_dir)
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

    trainer = Trainer(oracle, make_estimator(recipe), optimizer, scheduler=scheduler,
                      scheduler_interval="step", mask_schedule=masks, evaluate=evaluate,
                      callbacks=[TensorBoardLogger(out / "tensorboard")], out_dir=out,
                      seed=recipe.seed, progress=progress)
    started = time.perf_counter()
    history = trainer.fit(data.x_train, data.y_train, epochs=recipe.epochs,
                          batch_size=recipe.batch_size, max_queries=recipe.max_queries, resume=resume)
    final = history[-1]
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "train_accuracy": final["train_accuracy"],
        "test_loss": final["test_loss"],
        "queries": oracle.queries,
        "seconds": round(trainer.seconds, 2),
        "wall_seconds_this_run": round(time.perf_counter() - started, 2),
        "estimator": recipe.estimator,
        "sparsity": recipe.sparsity,
        "parameters": oracle.dim,
        "fast_path": oracle.fallback_reason is None,
        "stopped_reason": trainer.stopped_reason,
        "recipe": asdict(recipe),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves({recipe.estimator: history}, out / "curves.png")
    return metrics


def plot_curves(histories: dict[str, list[dict]], path) -> None:
    """Test accuracy against queries and against epochs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
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
    plt.close(fig)
