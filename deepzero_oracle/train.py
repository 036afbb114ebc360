"""One training loop for any oracle: batch -> ``oracle.bind(*batch)`` -> estimate ->
``param.grad`` -> a stock ``torch.optim`` step.

Checkpoints hold the learner, optimizer, scheduler, mask schedule, oracle counters, RNG states,
the batch source's position, the callbacks' state and the run's settings, so an interrupted run
resumes on the same trajectory as an uninterrupted one, bit for bit, and a resume with other
settings is refused.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from deepzero_oracle.callbacks import STEP_FIELDS, Callback, CSVLogger, StopTraining, TensorBoardLogger
from deepzero_oracle.errors import NonFiniteLossError, TrainingDiverged
from deepzero_oracle.estimators.base import Estimator
from deepzero_oracle.oracle import Oracle
from deepzero_oracle.pruning import MaskSchedule
from deepzero_oracle.runs import RunFolder, save_torch
from deepzero_oracle.stops import StopRequested, shielded, signal_name, stop_on_signals
from deepzero_oracle.theta import assign_gradient, flatten

class Trainer:
    """Trains the tensors theta lives in from gradient estimates with a stock optimizer.

    theta is a learner's trainable parameters for a ``LearnerOracle``; for any other oracle
    (a ``CallableOracle`` of a plain function, a ``ParallelOracle`` around one) it is the
    tensors given as ``params`` or, by default, the ones the optimizer holds, flattened in
    order: e.g. ``x = nn.Parameter(torch.zeros(d))`` with ``torch.optim.Adam([x])``.

    Args:
        oracle: any ``Oracle``: a ``LearnerOracle`` (``ModuleOracle``, an adapter's oracle, or
            a ``ParallelOracle`` around one) or an oracle of a flat theta ``[dim]`` such as a
            ``CallableOracle``. Each step calls ``bind(*batch)`` (when there is a batch),
            estimates, then ``end_step()``.
        estimator: ``CGE``, ``RGE``, ``Autograd`` or any ``Estimator``.
        optimizer: any ``torch.optim`` optimizer holding theta's tensors (the learner's
            trainable parameters, or ``params``).
        params: for an oracle without a learner: the tensors theta lives in, in theta order
            (their sizes sum to ``oracle.dim``); None: all tensors of the optimizer's
            ``param_groups``. Not allowed with a ``LearnerOracle``.
        scheduler: optional LR scheduler, stepped per ``scheduler_interval`` ("step"/"epoch").
        mask_schedule: optional ``MaskSchedule`` for sparse gradients (its ``unit`` says whether
            ``redraw_every`` counts epochs or steps).
        clip_norm: optional largest Euclidean norm of the step's gradient estimate; a longer
            estimate is scaled down to it (``torch.nn.utils.clip_grad_norm_``) before the
            optimizer sees it, which keeps one noisy estimate from throwing theta far. The
            logged ``grad_norm`` is the estimate's own.
        evaluate: ``evaluate(learner) -> {name: float}`` in eval mode without gradients (for an
            oracle without a learner: ``evaluate(theta [dim])``, a copy), run before training,
            after each epoch and every ``eval_every`` steps.
        eval_every: steps between evaluations (None: at epoch ends only).
        callbacks: more ``Callback`` objects (TensorBoard, yours); one may raise
            ``StopTraining`` to end training after a step.
        out_dir: where ``checkpoint.pt``, ``metrics.csv`` (evaluations) and ``steps.csv`` (one
            row per step) go; None keeps nothing on disk.
        checkpoint_every: steps between checkpoints (None: at epoch ends only); a checkpoint is
            also written when training stops for any reason but an error.
        settings: a JSON-like dict of what defines the run (recipe, data, method); saved in
            the checkpoint, and a resume with different settings is refused
            (``SettingsMismatch`` naming each difference; ``trainer.run`` is the
            ``deepzero_oracle.runs.RunFolder`` that checks it).
        seed: seeds the generator used for random directions and masks.
        progress: a tqdm progress bar on stderr: None (default) shows it when stderr is a
            terminal, True always, False never; ``desc`` labels it.
    """

    def __init__(self, oracle: Oracle, estimator: Estimator, optimizer: torch.optim.Optimizer,
                 *, params: Iterable[torch.Tensor] | None = None, scheduler=None, scheduler_interval: str = "epoch",
                 mask_schedule: MaskSchedule | None = None, clip_norm: float | None = None,
                 evaluate: Callable[..., dict] | None = None, eval_every: int | None = None,
                 callbacks: Iterable[Callback] = (), out_dir=None, checkpoint_every: int | None = None,
                 settings: dict | None = None, seed: int = 0, progress: bool | None = None, desc: str | None = None):
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive number of steps or None, got {value}")
        if clip_norm is not None and not float(clip_norm) > 0:
            raise ValueError(f"clip_norm must be a positive norm or None, got {clip_norm}")
        self.oracle, self.estimator, self.optimizer = oracle, estimator, optimizer
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self._params = self._theta_tensors(params)  # None: the learner's parameters
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.mask_schedule, self.evaluate, self.eval_every = mask_schedule, evaluate, eval_every
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every, self.settings = checkpoint_every, settings
        # the run's folder: where its checkpoint lives, and what a resume's settings must match
        # (without an out_dir it only checks the settings of a state_dict given to load_state_dict)
        self.run = RunFolder(self.out_dir if self.out_dir is not None else ".", settings)
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

    # -- theta ----------------------------------------------------------------------------------

    @property
    def has_learner(self) -> bool:
        """Whether theta is a learner's trainable parameters (a ``LearnerOracle``)."""
        return self._params is None

    @property
    def params(self) -> list[torch.Tensor]:
        """The tensors theta lives in, in theta order (where estimates go as ``.grad``)."""
        return self.oracle.parameters() if self._params is None else self._params

    def theta(self) -> torch.Tensor:
        """A copy of theta ``[dim]``: the tensors of ``params`` flattened."""
        return self.oracle.theta() if self._params is None else flatten(self._params)

    def _theta_tensors(self, params) -> list[torch.Tensor] | None:
        """None for a learner's oracle, else the tensors theta lives in (checked against dim)."""
        if callable(getattr(self.oracle, "parameters", None)) and getattr(self.oracle, "learner", None) is not None:
            if params is not None:
                raise ValueError("params= is for oracles without a learner: a learner's oracle "
                                 "trains the learner's trainable parameters; leave params out")
            return None
        if not isinstance(getattr(self.oracle, "dim", None), int):
            raise TypeError(f"Trainer needs an Oracle (dim, bind, queries), got {type(self.oracle).__name__}")
        where = "params=" if params is not None else "the optimizer's param_groups"
        if params is None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        bad = [type(p).__name__ if not isinstance(p, torch.Tensor) else str(p.dtype)
               for p in params if not (isinstance(p, torch.Tensor) and p.is_floating_point())]
        if bad:
            raise TypeError(f"theta's tensors must be floating-point torch tensors; {where} holds "
                            f"{', '.join(bad)}")
        total = sum(p.numel() for p in params)
        if total != self.oracle.dim:
            raise ValueError(
                f"{where} holds {total} numbers but the oracle's theta has dim={self.oracle.dim}; "
                f"give params= the tensor(s) theta lives in (sizes summing to dim, in theta order) "
                f"and an optimizer built on them, e.g. torch.optim.Adam([x])")
        return params

    # -- training -------------------------------------------------------------------------------

    def fit(self, batches: Iterable | None = None, *, epochs: int | None = None, max_steps: int | None = None,
            max_queries: int | None = None, resume: bool = True, handle_signals: bool = True) -> list[dict]:
        """Train on ``batches`` until ``epochs`` passes, ``max_steps`` steps or ``max_queries``
        queries (whichever comes first; at least one must be given); returns the evaluation
        history.

        ``batches``: any re-iterable of tuples, each passed as ``oracle.bind(*batch)`` (a
        ``DataLoader``, a ``TensorBatches``, an endless ``SampledBatches`` with ``max_steps``),
        or None: no data, every step queries the oracle as it is (a plain function of theta, or
        an oracle bound once), until ``max_steps`` or ``max_queries``.
        With ``resume`` and a checkpoint in ``out_dir``, training continues from it on the same
        trajectory (sources with ``state_dict`` are restored, others replayed from the global
        RNG of the epoch's start). ``max_queries`` stops before a step that would exceed it.

        With ``handle_signals`` (called from the main thread), SIGINT (Ctrl-C) and SIGTERM stop
        training between steps: the step in flight completes and is counted, the checkpoint is
        written (with an ``out_dir``), and ``deepzero_oracle.stops.StopRequested`` (a
        ``KeyboardInterrupt``) is raised; ``fit`` again with the same ``out_dir`` continues on the
        same trajectory. A second signal aborts the step in flight without saving (the last
        checkpoint stays); a signal during a save waits for it. ``handle_signals=False`` leaves
        signal handling to the caller.
        """
        if batches is None:
            if epochs is not None:
                raise ValueError("epochs= counts passes over batches; without batches give "
                                 "max_steps= or max_queries= to say when training ends")
            if max_steps is None and max_queries is None:
                raise ValueError("give max_steps= or max_queries= (or both) to say when training ends")
            batches = itertools.repeat(())  # endless, stateless: one step per item
        elif epochs is None and max_steps is None and max_queries is None:
            raise ValueError("give epochs=, max_steps= or max_queries= to say when training ends")
        if max_queries is not None and int(max_queries) < 0:
            raise ValueError(f"max_queries must be >= 0 or None, got {max_queries}")
        if (epochs is not None and int(epochs) < 0) or (max_steps is not None and int(max_steps) < 0):
            raise ValueError(f"epochs and max_steps must be >= 0, got {epochs} and {max_steps}")
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            self._resumed = self._rng_state is not None
        elif self.out_dir is not None:
            for log in self.logs:  # a fresh run owns its logs
                log.rewind(-1)
        self.stopped_reason = None
        with stop_on_signals(enabled=handle_signals) as stop:
            try:
                if not self.history:
                    self._evaluate()  # where training starts
                bar = self._progress_bar(batches, epochs, max_steps)
                try:
                    while not self._finished(epochs, max_steps):
                        if not self._run_epoch(batches, epochs, max_steps, max_queries, bar, stop):
                            break
                finally:
                    bar.close()
            except StopRequested as exc:  # a second signal: the step in flight is abandoned, unsaved
                raise exc.annotate(where=f"during step {self.step + 1}", run_dir=self.out_dir,
                                   checkpoint=self._kept())
            except Exception as exc:
                if not stop.requested:
                    raise
                # the signal also reached the step's workers (a scheduler signals the whole job)
                raise stop.stop(where=f"during step {self.step + 1}, which failed ({type(exc).__name__})",
                                run_dir=self.out_dir, checkpoint=self._kept()) from exc
            if stop.requested:  # the first signal: stopped between steps (or after the last one)
                with stop.shielded():
                    self.stopped_reason = f"stopped by {signal_name(stop.signum)}"
                    self.save_checkpoint()
                    raise stop.stop(where=self._where(epochs, max_steps), run_dir=self.out_dir,
                                    saved=self.out_dir is not None)
            if self.stopped_reason is not None or self._finished(epochs, max_steps):
                self.save_checkpoint()
        return self.history

    def _kept(self) -> str | None:
        """The checkpoint left on disk, for a stop message."""
        return None if self.checkpoint_step is None else f"the checkpoint of step {self.checkpoint_step}"

    def _where(self, epochs, max_steps) -> str:
        """Where training stands, for a stop message: ``after step 12 of 40 (epoch 1, ...)``."""
        if self._finished(epochs, max_steps):
            return f"after step {self.step}, the last (training is done)"
        total = f" of {max_steps}" if max_steps is not None else ""
        epoch = (f" (epoch {self.epoch + 1} of {epochs}, {self.step_in_epoch} steps into it)"
                 if epochs is not None else "")
        return f"after step {self.step}{total}{epoch}"

    def _finished(self, epochs, max_steps) -> bool:
        return ((epochs is not None and self.epoch >= epochs)
                or (max_steps is not None and self.step >= max_steps))

    def _run_epoch(self, batches, epochs, max_steps, max_queries, bar, stop) -> bool:
        """One pass (or what is left of it); False when training stopped inside it (the query
        budget, or a signal seen by ``stop``, checked between steps)."""
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
            if (max_steps is not None and self.step >= max_steps) or stop.requested:
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
        """One optimizer step on ``batch`` (empty: the oracle as it is); its metrics, or None if
        the query budget stops it or a callback raised ``StopTraining`` after it."""
        started = time.perf_counter()
        oracle = self.oracle.bind(*batch) if batch else self.oracle
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
            grad, loss = self.estimator.estimate_and_loss(oracle, self.theta(), mask, self.generator)
            if not torch.isfinite(grad).all() or (loss is not None and not torch.isfinite(loss)):
                raise NonFiniteLossError("the gradient estimate or the loss is NaN or Inf")
        except NonFiniteLossError as exc:
            raise self._diverged(exc) from exc
        self.optimizer.zero_grad(set_to_none=True)
        assign_gradient(self.params, grad)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
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
        stop = None
        for cb in self.callbacks:
            try:
                cb.on_step_end(self, metrics)
            except StopTraining as exc:  # the other callbacks still see the step
                stop = stop or exc
        if stop is not None:
            self.stopped_reason = str(stop) or f"stopped by {type(stop).__name__}"
            return None
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
        if self.evaluate is not None and not self.has_learner:
            with torch.no_grad():
                metrics.update(self.evaluate(self.theta()))
        elif self.evaluate is not None:
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
        return tqdm(total=min(totals) if totals else None, initial=self.step,
                    disable=progress_disabled(self.progress), desc=self.desc, unit="step")

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt`` (None without an out_dir)."""
        return None if self.out_dir is None else self.run.file("checkpoint.pt")

    def state_dict(self) -> dict:
        """Everything needed to continue on the same trajectory."""
        return {
            **({"learner": self.oracle.learner.state_dict()} if self.has_learner
               else {"params": [p.detach().clone() for p in self.params]}),
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
        self.run.check(state.get("settings"), where=self.checkpoint_path)
        self._load_theta(state)
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
        with shielded():  # a signal during the save waits for it
            save_torch(self.state_dict(), path)
        self.checkpoint_step = self.step

    def load_checkpoint(self, path) -> None:
        """Load a checkpoint written by ``save_checkpoint`` (tensors and plain data only)."""
        self.load_state_dict(torch.load(path, weights_only=True))

    def _load_theta(self, state: dict) -> None:
        """theta from a ``state_dict``: the learner's state, or the values of ``params``."""
        if self.has_learner:
            if "learner" not in state:
                raise ValueError(f"{self.checkpoint_path or 'the state'} holds a plain function's "
                                 "parameters, not a learner's: resume it with the same kind of oracle")
            self.oracle.learner.load_state_dict(state["learner"])
            return
        saved = state.get("params")
        shapes = [tuple(p.shape) for p in self.params]
        if saved is None or [tuple(t.shape) for t in saved] != shapes:
            found = "a learner's state" if saved is None else [tuple(t.shape) for t in saved]
            raise ValueError(f"{self.checkpoint_path or 'the state'} holds {found}, but this trainer's "
                             f"theta lives in tensors shaped {shapes}: resume with the same parameters")
        with torch.no_grad():
            for p, t in zip(self.params, saved):
                p.copy_(t)

    def _check_optimizer(self):
        theirs = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        ours = {id(p) for p in self.params}
        if not ours <= theirs:
            raise ValueError(
                "the optimizer does not hold all of the learner's trainable parameters; build it "
                "from learner.parameters()" if self.has_learner else
                "the optimizer does not hold all of the tensors given as params=; build it from "
                "them, e.g. torch.optim.Adam(params)"
            )


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` setting: None (off when stderr is not a terminal,
    tqdm's own convention), True (always on) or False (off)."""
    return None if progress is None else not progress


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


__all__ = ["CSVLogger", "Callback", "STEP_FIELDS", "StopTraining", "TensorBoardLogger", "Trainer",
           "progress_disabled"]
