"""Trainer: estimate -> ``param.grad`` -> a stock ``torch.optim`` step.

Checkpoints hold learner, optimizer, scheduler, mask schedule, RNG states and the query count,
so an interrupted run resumes on the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from deepzero_oracle.estimators.base import Estimator, mask_coordinates
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.pruning import MaskSchedule
from deepzero_oracle.theta import assign_gradient


class Callback:
    """Hooks called by ``Trainer.fit``; override what you need."""

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each optimizer step; ``metrics`` has step, epoch, queries, lr, grad_norm."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each epoch (and once before training, epoch 0) with evaluation results."""


class CSVLogger(Callback):
    """Appends epoch metrics to ``path`` (a header is written with the first row)."""

    def __init__(self, path):
        self.path = Path(path)

    def on_epoch_end(self, trainer, metrics):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(metrics))
            if new:
                writer.writeheader()
            writer.writerow(metrics)


class TensorBoardLogger(Callback):
    """Writes step and epoch metrics to TensorBoard; a no-op (with a note) if it is not installed."""

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer, metrics):
        if self.writer:
            for k in ("lr", "grad_norm"):
                self.writer.add_scalar(f"step/{k}", metrics[k], metrics["queries"])

    def on_epoch_end(self, trainer, metrics):
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "queries"):
                    self.writer.add_scalar(f"epoch/{k}", v, metrics["queries"])
            self.writer.flush()


class Trainer:
    """Trains ``oracle.learner`` from gradient estimates with a stock optimizer.

    Args:
        oracle: a ``ModuleOracle`` (learner + optional black box + loss).
        estimator: ``CGE``, ``RGE`` or ``Autograd``.
        optimizer: any ``torch.optim`` optimizer over the learner's trainable parameters.
        scheduler: optional LR scheduler, stepped per epoch or per step (``scheduler_interval``).
        mask_schedule: optional ``MaskSchedule`` for sparse gradients.
        evaluate: ``evaluate(learner) -> {name: float}``, run before training and after each epoch.
        callbacks: ``Callback`` objects (CSV, TensorBoard, yours).
        out_dir: where ``checkpoint.pt`` and ``metrics.csv`` go (None: keep nothing on disk).
        seed: seeds the generator used for shuffling, random directions and masks.
        progress: show a tqdm progress bar.
    """

    def __init__(self, oracle: ModuleOracle, estimator: Estimator, optimizer: torch.optim.Optimizer,
                 *, scheduler=None, scheduler_interval: str = "epoch",
                 mask_schedule: MaskSchedule | None = None,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 callbacks: Iterable[Callback] = (), out_dir=None, seed: int = 0,
                 progress: bool = True):
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.oracle, self.estimator, self.optimizer = oracle, estimator, optimizer
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.mask_schedule, self.evaluate = mask_schedule, evaluate
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        if self.out_dir is not None:
            self.callbacks.insert(0, CSVLogger(self.out_dir / "metrics.csv"))
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self.epoch = 0  # epochs completed
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.stopped_reason: str | None = None
        self._check_optimizer()

    # -- training -------------------------------------------------------------------------------

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int = 256,
            max_queries: int | None = None, resume: bool = True) -> list[dict]:
        """Train for ``epochs`` epochs on ``x [N, ...]``, ``y [N]``; returns the epoch history.

        With ``resume`` and an ``out_dir`` holding a checkpoint, training continues from it.
        ``max_queries`` stops training before a step that would exceed it.
        """
        if epochs < 0 or batch_size < 1:
            raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        if not self.history:
            self._end_epoch()  # epoch 0: where training starts
        steps_per_epoch = math.ceil(len(x) / batch_size)
        bar = tqdm(total=epochs * steps_per_epoch, initial=self.epoch * steps_per_epoch,
                   disable=not self.progress, desc=f"{self.estimator.name} training", unit="step")
        try:
            while self.epoch < epochs and self.stopped_reason is None:
                order = torch.randperm(len(x), generator=self.generator)
                started = time.perf_counter()
                for start in range(0, len(x), batch_size):
                    idx = order[start : start + batch_size]
                    if not self._step(x[idx], y[idx], max_queries):
                        break
                    bar.update(1)
                    bar.set_postfix(queries=self.oracle.queries, refresh=False)
                self.seconds += time.perf_counter() - started
                if self.stopped_reason is None:
                    self.epoch += 1
                    if self.scheduler is not None and self.scheduler_interval == "epoch":
                        self.scheduler.step()
                    metrics = self._end_epoch()
                    bar.set_postfix({k: v for k, v in metrics.items() if k in ("test_accuracy", "queries")})
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    def _step(self, x, y, max_queries) -> bool:
        oracle = self.oracle.bind(x, y)
        theta = oracle.theta()
        mask = None if self.mask_schedule is None else self.mask_schedule.mask_for(self.epoch, self.generator)
        if max_queries is not None:
            cost = self.estimator.queries_per_estimate(oracle, mask)
            if oracle.queries + cost > max_queries:
                self.stopped_reason = f"query budget of {max_queries} reached"
                return False
        grad = self.estimator.estimate(oracle, theta, mask=mask, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        assign_gradient(oracle.parameters(), grad)
        oracle.end_step()
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        self.step += 1
        metrics = {"step": self.step, "epoch": self.epoch, "queries": oracle.queries,
                   "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad.norm())}
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)
        return True

    def _end_epoch(self) -> dict:
        metrics = {"epoch": self.epoch, "step": self.step, "queries": self.oracle.queries,
                   "seconds": round(self.seconds, 3), "lr": self.optimizer.param_groups[0]["lr"]}
        if self.evaluate is not None:
            learner = self.oracle.learner
            was_training = learner.training
            learner.eval()
            with torch.no_grad():
                metrics.update(self.evaluate(learner))
            learner.train(was_training)
        self.history.append(metrics)
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        """Everything needed to continue on the same trajectory."""
        return {
            "learner": self.oracle.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "mask_schedule": None if self.mask_schedule is None else self.mask_schedule.state_dict(),
            "oracle": self.oracle.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``."""
        self.oracle.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.mask_schedule is not None and state["mask_schedule"] is not None:
            self.mask_schedule.load_state_dict(state["mask_schedule"])
        self.oracle.load_state_dict(state["oracle"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        self.history = list(state["history"])

    def save_checkpoint(self, path=None) -> None:
        """Write the state atomically (a crash mid-write never corrupts the last checkpoint)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path) -> None:
        """Load a checkpoint written by ``save_checkpoint`` (tensors and plain data only)."""
        self.load_state_dict(torch.load(path, weights_only=True))

    def _check_optimizer(self):
        theirs = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        ours = {id(p) for p in self.oracle.parameters()}
        if not ours <= theirs:
            raise ValueError(
                "the optimizer does not hold all of the learner's trainable parameters; build it "
                "from learner.parameters()"
            )
