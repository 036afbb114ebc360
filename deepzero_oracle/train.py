"""One training loop for any oracle: batch -> ``oracle.bind(*batch)`` -> estimate ->
``param.grad`` -> a stock ``torch.optim`` step.

Checkpoints hold the learner, optimizer, scheduler, mask schedule, oracle counters, RNG states,
the batch source's position, the callbacks' state and the run's settings, so an interrupted run
resumes on the same trajectory as an uninterrupted one, bit for bit, and a resume with other
settings is refused.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from deepzero_oracle.atomic import atomic_write, save_torch
from deepzero_oracle.errors import NonFiniteLossError, SettingsMismatch, TrainingDiverged
from deepzero_oracle.estimators.base import Estimator
from deepzero_oracle.oracle import LearnerOracle
from deepzero_oracle.pruning import MaskSchedule
from deepzero_oracle.theta import assign_gradient

STEP_FIELDS = ("step", "epoch", "queries", "lr", "loss", "grad_norm", "seconds")


class Callback:
    """Hooks called by ``Trainer.fit``; override what you need. A callback with
    ``state_dict`` / ``load_state_dict`` is checkpointed with the trainer."""

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each optimizer step; ``metrics`` has the fields of ``STEP_FIELDS``."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each evaluation (once before training, then after each epoch or every
        ``eval_every`` steps): epoch, step, queries, seconds, lr and the evaluation's results."""


class CSVLogger(Callback):
    """Appends metrics rows to a CSV file: evaluation rows (``on="eval"``) or step rows
    (``on="step"``). A resumed run first drops rows written after its checkpoint, so every
    step appears once."""

    def __init__(self, path, on: str = "eval"):
        if on not in ("eval", "step"):
            raise ValueError(f"on must be 'eval' or 'step', got {on!r}")
        self.path, self.on = Path(path), on

    def on_step_end(self, trainer, metrics):
        if self.on == "step":
            self._append({k: metrics.get(k) for k in STEP_FIELDS})

    def on_epoch_end(self, trainer, metrics):
        if self.on == "eval":
            self._append(metrics)

    def rewind(self, step: int) -> None:
        """Keep only rows of steps ``<= step`` (what a checkpoint at ``step`` had seen)."""
        rows, fields = self._read()
        kept = [r for r in rows if int(float(r["step"])) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept, fields)

    def _read(self) -> tuple[list[dict], list[str]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])

    def _rewrite(self, rows, fields) -> None:
        def write(tmp):
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path, write)

    def _append(self, row: dict) -> None:
        row = {k: ("" if v is None else v) for k, v in row.items()}
        rows, fields = self._read()
        if fields and not set(row) <= set(fields):  # a new column: rewrite with the union
            self._rewrite(rows + [row], fields + [k for k in row if k not in fields])
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields or list(row))
            if not fields:
                writer.writeheader()
            writer.writerow(row)


class TensorBoardLogger(Callback):
    """Writes step and evaluation metrics to TensorBoard (x axis: queries); a no-op if
    tensorboard is not installed (``pip install deepzero-oracle[tensorboard]``)."""

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer, metrics):
        if self.writer:
            for k in ("lr", "grad_norm", "loss"):
                if metrics.get(k) is not None:
                    self.writer.add_scalar(f"step/{k}", metrics[k], metrics["queries"])

    def on_epoch_end(self, trainer, metrics):
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "queries"):
                    self.writer.add_scalar(f"eval/{k}", v, metrics["queries"])
            self.writer.flush()


class Trainer:
    """Trains ``oracle.learner`` from gradient estimates with a stock optimizer.

    Args:
        oracle: a ``LearnerOracle`` (``ModuleOracle``, an adapter's oracle, or a
            ``ParallelOracle`` around one): ``bind(*batch)``, ``theta()``, ``parameters()``,
            ``end_step()``.
        estimator: ``CGE``, ``RGE``, ``Autograd`` or any ``Estimator``.
        optimizer: any ``torch.optim`` optimizer holding the learner's trainable parameters.
        scheduler: optional LR scheduler, stepped per ``scheduler_interval`` ("step"/"epoch").
        mask_schedule: optional ``MaskSchedule`` for sparse gradients (its ``unit`` says whether
            ``redraw_every`` counts epochs or steps).
        evaluate: ``evaluate(learner) -> {name: float}`` in eval mode without gradients, run
            before training, after each epoch and every ``eval_every`` steps.
        eval_every: steps between evaluations (None: at epoch ends only).
        callbacks: more ``Callback`` objects (TensorBoard, yours).
        out_dir: where ``checkpoint.pt``, ``metrics.csv`` (evaluations) and ``steps.csv`` (one
            row per step) go; None keeps nothing on disk.
        checkpoint_every: steps between checkpoints (None: at epoch ends only); a checkpoint is
            also written when training stops for any reason but an error.
        settings: a JSON-like dict of what defines the run (recipe, data, method); saved in
            the checkpoint, and a resume with different settings is refused.
        seed: seeds the generator used for random directions and masks.
        progress: show a tqdm progress bar; ``desc`` labels it.
    """

    def __init__(self, oracle: LearnerOracle, estimator: Estimator, optimizer: torch.optim.Optimizer,
                 *, scheduler=None, scheduler_interval: str = "epoch",
                 mask_schedule: MaskSchedule | None = None,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, eval_every: int | None = None,
                 callbacks: Iterable[Callback] = (), out_dir=None, checkpoint_every: int | None = None,
                 settings: dict | None = None, seed: int = 0, progress: bool = True, desc: str | None = None):
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive number of steps or None, got {value}")
        if not callable(getattr(oracle, "parameters", None)) or getattr(oracle, "learner", None) is None:
            raise TypeError(f"Trainer trains a learner's parameters; {type(oracle).__name__} has none "
                            "(for a plain function of theta, call estimator.estimate directly)")
        self.oracle, self.estimator, self.optimizer = oracle, estimator, optimizer
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.mask_schedule, self.evaluate, self.eval_every = mask_schedule, evaluate, eval_every
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every, self.settings = checkpoint_every, settings
        self.logs = [] if self.out_dir is None else [CSVLogger(self.out_dir / "metrics.csv", "eval"),
                                                    CSVLogger(self.out_dir / "steps.csv", "step")]
        self.callbacks = self.logs + list(callbacks)
        self.generator = torch.Generator().manual_seed(seed)
        self.progress, self.desc = progress, desc or f"{getattr(estimator, 'name', 'estimator')} training"
        self.epoch = 0  # passes over the batches completed
        self.step = 0  # optimizer steps completed
        self.step_in_epoch = 0
        self.seconds = 0.0  # training time, summed over resumed runs
        self.history: list[dict] = []  # evaluation rows
        self.stopped_reason: str | None = None
        self.checkpoint_step: int | None = None  # step of the checkpoint on disk
        self._source_state = None  # the batch source at the start of the current epoch
        self._rng_state = None  # torch's global RNG at the start of the current epoch
        self._resumed = False  # loaded from a checkpoint: the next epoch restores the source
        self._check_optimizer()

    # -- training -------------------------------------------------------------------------------

    def fit(self, batches: Iterable, *, epochs: int | None = None, max_steps: int | None = None,
            max_queries: int | None = None, resume: bool = True) -> list[dict]:
        """Train on ``batches`` until ``epochs`` passes or ``max_steps`` steps (whichever comes
        first; at least one must be given); returns the evaluation history.

        ``batches``: any re-iterable of tuples, each passed as ``oracle.bind(*batch)`` (a
        ``DataLoader``, a ``TensorBatches``, an endless ``SampledBatches`` with ``max_steps``).
        With ``resume`` and a checkpoint in ``out_dir``, training continues from it on the same
        trajectory (sources with ``state_dict`` are restored, others replayed from the global
        RNG of the epoch's start). ``max_queries`` stops before a step that would exceed it.
        """
        if epochs is None and max_steps is None:
            raise ValueError("give epochs= or max_steps= (or both) to say when training ends")
        if (epochs is not None and int(epochs) < 0) or (max_steps is not None and int(max_steps) < 0):
            raise ValueError(f"epochs and max_steps must be >= 0, got {epochs} and {max_steps}")
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            self._resumed = self._rng_state is not None
        elif self.out_dir is not None:
            for log in self.logs:  # a fresh run owns its logs
                log.rewind(-1)
        self.stopped_reason = None
        if not self.history:
            self._evaluate()  # where training starts
        bar = self._progress_bar(batches, epochs, max_steps)
        try:
            while not self._finished(epochs, max_steps):
                if not self._run_epoch(batches, epochs, max_steps, max_queries, bar):
                    break
        finally:
            bar.close()
        if self.stopped_reason is not None or self._finished(epochs, max_steps):
            self.save_checkpoint()
        return self.history

    def _finished(self, epochs, max_steps) -> bool:
        return ((epochs is not None and self.epoch >= epochs)
                or (max_steps is not None and self.step >= max_steps))

    def _run_epoch(self, batches, epochs, max_steps, max_queries, bar) -> bool:
        """One pass (or what is left of it); False when training stopped inside it."""
        resumed, self._resumed = self._resumed, False
        if resumed:  # put the source and torch's RNG where this epoch started, skip what was done
            rng_now = torch.get_rng_state()
            _restore(batches, self._source_state)
            torch.set_rng_state(self._rng_state)
        else:
            self._mark_epoch_start(batches)
        iterator = iter(batches)
        for _ in range(self.step_in_epoch if resumed else 0):
            next(iterator)
        if resumed:
            torch.set_rng_state(rng_now)
        ran = self.step_in_epoch
        while True:
            if max_steps is not None and self.step >= max_steps:
                return False  # checked before drawing a batch, so the source is not advanced
            batch = next(iterator, None)
            if batch is None:
                break
            metrics = self._step(batch if isinstance(batch, (tuple, list)) else (batch,), max_queries)
            if metrics is None:
                return False
            ran += 1
            bar.update(1)
            bar.set_postfix({k: metrics[k] for k in ("loss", "queries") if metrics[k] is not None},
                            refresh=False)
            if self.eval_every and self.step % self.eval_every == 0:
                self._evaluate()
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save_checkpoint()
        if ran == 0:
            raise ValueError("the batches yielded nothing: give the Trainer a non-empty, re-iterable "
                             "source (a DataLoader, TensorBatches, or a list of tuples)")
        self.epoch += 1
        self.step_in_epoch = 0
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        if not (self.eval_every and self.step % self.eval_every == 0):
            metrics = self._evaluate()
            bar.set_postfix({k: v for k, v in metrics.items() if k not in ("epoch", "step", "seconds", "lr")},
                            refresh=False)
        self._mark_epoch_start(batches)  # where the next epoch starts, for the checkpoint
        self.save_checkpoint()
        return True

    def _mark_epoch_start(self, batches) -> None:
        self._source_state = _state_of(batches)
        self._rng_state = torch.get_rng_state()

    def _step(self, batch: tuple, max_queries) -> dict | None:
        """One optimizer step on ``batch``; its metrics, or None if the query budget stops it."""
        started = time.perf_counter()
        oracle = self.oracle.bind(*batch)
        mask = None
        if self.mask_schedule is not None:
            when = self.epoch if self.mask_schedule.unit == "epoch" else self.step
            mask = self.mask_schedule.mask_for(when, self.generator)
        if max_queries is not None:
            cost = self.estimator.queries_per_estimate(oracle, mask)
            if oracle.queries + cost > max_queries:
                self.stopped_reason = f"query budget of {max_queries} reached"
                return None
        try:
            grad, loss = self.estimator.estimate_and_loss(oracle, oracle.theta(), mask, self.generator)
            if not torch.isfinite(grad).all() or (loss is not None and not torch.isfinite(loss)):
                raise NonFiniteLossError("the gradient estimate or the loss is NaN or Inf")
        except NonFiniteLossError as exc:
            raise self._diverged(exc) from exc
        self.optimizer.zero_grad(set_to_none=True)
        assign_gradient(oracle.parameters(), grad)
        oracle.end_step()
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        self.step += 1
        self.step_in_epoch += 1
        self.seconds += time.perf_counter() - started
        metrics = {"step": self.step, "epoch": self.epoch, "queries": oracle.queries,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "loss": None if loss is None else float(loss), "grad_norm": float(grad.norm()),
                   "seconds": round(self.seconds, 3)}
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)
        return metrics


    def _diverged(self, exc: Exception) -> TrainingDiverged:
        where = (f"the last good checkpoint (step {self.checkpoint_step}) is kept at {self.checkpoint_path}"
                 if self.checkpoint_step is not None else "no checkpoint was written yet")
        return TrainingDiverged(
            f"training diverged at step {self.step + 1} ({exc}). Stopped; {where}. Lower the "
            f"learning rate or mu, or resume from the checkpoint with other settings",
            step=self.step + 1, checkpoint_step=self.checkpoint_step)

    def _evaluate(self) -> dict:
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

    def _progress_bar(self, batches, epochs, max_steps):
        try:
            per_epoch = len(batches)
        except TypeError:
            per_epoch = None
        totals = [t for t in (max_steps, None if epochs is None or per_epoch is None else epochs * per_epoch)
                  if t is not None]
        bar = tqdm(total=min(totals) if totals else None, initial=self.step, disable=not self.progress,
                   desc=self.desc, unit="step")
        return bar

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt`` (None without an out_dir)."""
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
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "seconds": self.seconds,
            "history": self.history,
            "source_state": self._source_state,
            "epoch_rng": self._rng_state,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
            "settings": self.settings,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; refuses one whose settings differ from this trainer's."""
        check_settings(state.get("settings"), self.settings, self.checkpoint_path)
        self.oracle.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.mask_schedule is not None and state["mask_schedule"] is not None:
            self.mask_schedule.load_state_dict(state["mask_schedule"])
        self.oracle.load_state_dict(state["oracle"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.step_in_epoch, self.seconds = state["step_in_epoch"], state["seconds"]
        self.history = list(state["history"])
        self._source_state, self._rng_state = state["source_state"], state["epoch_rng"]
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        self.checkpoint_step = self.step
        for log in self.logs:
            log.rewind(self.step)

    def save_checkpoint(self, path=None) -> None:
        """Write the state atomically (a crash mid-write never corrupts the last checkpoint)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return
        save_torch(self.state_dict(), path)
        self.checkpoint_step = self.step

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


def check_settings(saved: dict | None, wanted: dict | None, where=None) -> None:
    """Raise ``SettingsMismatch`` naming every setting whose value differs between a run on
    disk (``saved``) and the one asked for (``wanted``). Nothing is compared if either is None."""
    if saved is None or wanted is None:
        return
    keys = sorted(set(saved) | set(wanted))
    changed = [f"{k}: {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in keys
               if _normal(saved.get(k)) != _normal(wanted.get(k))]
    if changed:
        raise SettingsMismatch(
            f"{where or 'the run folder'} holds a run with other settings ({'; '.join(changed)}); "
            f"resume with the same settings, start over with --restart, or use another --out"
        )


def _normal(value):
    """Settings as JSON would give them back (tuples are lists, floats compare by value)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def _state_of(batches):
    if hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict"):
        return {"source": batches.state_dict()}
    generator = getattr(batches, "generator", None)  # a DataLoader's own generator, if any
    return {"generator": generator.get_state()} if isinstance(generator, torch.Generator) else None


def _restore(batches, state) -> None:
    if state is None:
        return
    if "source" in state:
        batches.load_state_dict(state["source"])
    else:
        batches.generator.set_state(state["generator"])


__all__ = ["CSVLogger", "Callback", "STEP_FIELDS", "TensorBoardLogger", "Trainer", "check_settings"]
