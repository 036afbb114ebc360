"""``minimize(f, x0)``: minimise a function you can only evaluate, in the spirit of
``scipy.optimize.minimize``.

It is the ``Trainer`` over a ``CallableOracle`` of ``f`` with the parameter vector as one tensor:
one training loop, the same estimators, optimizers, query budget and stop rules as training a
network. The query budget is the oracle's own (its ledger refuses a request that would exceed it
before spending anything), so ``max_queries`` is never overshot.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from scipy.optimize import OptimizeResult

from deepzero_oracle.errors import NonFiniteLossError, QueryBudgetExceeded, TrainingDiverged
from deepzero_oracle.estimators import CGE
from deepzero_oracle.estimators.base import Estimator
from deepzero_oracle.oracle import CallableOracle
from deepzero_oracle.train import Callback, StopTraining, Trainer

DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor max_queries is given
DEFAULT_LR = 0.05  # Adam's step per coordinate, for parameters of order one


class MinimizeResult(OptimizeResult):
    """What ``minimize`` found; a ``scipy.optimize.OptimizeResult`` (a dict with attribute
    access) with:

    Attributes:
        x: the best point seen, NumPy ``[d]`` (with ``batches``: the last iterate, since
            losses on different batches do not compare).
        fun: ``f(x)`` (with ``batches``: on the last batch).
        success: whether it stopped as asked (see ``minimize``); ``message`` says why it stopped.
        queries: evaluations of ``f`` spent, as counted by the oracle's ledger (alias ``nfev``).
        steps: optimizer steps taken (alias ``nit``).
        history: one dict per step: ``step``, ``queries`` (spent after it) and ``loss`` (``f``
            at the point the step started from; None if the estimator did not compute it).
    """

    def __repr__(self):
        shown = OptimizeResult(self)
        if isinstance(shown.get("history"), list):
            shown["history"] = f"<{len(shown['history'])} steps>"
        return repr(shown)


class _Record(Callback):
    """Keeps the history, the best point seen, and runs ``gtol`` and the user's callback."""

    def __init__(self, x: torch.Tensor, gtol: float | None, callback: Callable | None):
        self.x, self.gtol, self.callback = x, gtol, callback
        self.start = x.detach().clone()  # where the next step starts: its loss is that point's
        self.best_x, self.best_fun = None, math.inf
        self.history: list[dict] = []
        self.stopped_by: str | None = None  # "gtol" or "callback"

    def on_step_end(self, trainer, metrics):
        loss = metrics["loss"]
        self.history.append({"step": metrics["step"], "queries": metrics["queries"], "loss": loss})
        if loss is not None and loss < self.best_fun:
            self.best_x, self.best_fun = self.start, loss
        self.start = self.x.detach().clone()
        if self.gtol is not None and metrics["grad_norm"] < self.gtol:
            self.stopped_by = "gtol"
            raise StopTraining(f"the gradient estimate's norm {metrics['grad_norm']:.3g} fell "
                               f"below gtol={self.gtol:g}")
        if self.callback is not None:
            info = MinimizeResult(x=_numpy(self.x), step=metrics["step"], queries=metrics["queries"],
                                  loss=loss, grad_norm=metrics["grad_norm"])
            try:
                stop = self.callback(info)
            except StopIteration:
                stop = True
            if stop is True:
                self.stopped_by = "callback"
                raise StopTraining("the callback asked to stop")


def minimize(f: Callable, x0, *, estimator: Estimator | None = None, optimizer=None,
             max_queries: int | None = None, max_steps: int | None = None,
             batches: Iterable | None = None, mu: float | None = None, callback: Callable | None = None,
             gtol: float | None = None, numpy: bool = True, batched: bool = False,
             dtype: torch.dtype | None = None, seed: int = 0, progress: bool = False) -> MinimizeResult:
    """Minimise ``f`` from ``x0`` with gradient estimates from evaluations of ``f`` only.

    Args:
        f: ``f(x [d]) -> float`` (a float, or a 0-d array/tensor). With ``batches``,
            ``f(x, *batch)``; with ``batched=True``, ``f(xs [P, d]) -> [P]`` (P points at once).
        x0: the starting point, array-like ``[d]`` (1-D; flatten a matrix and reshape in ``f``).
        estimator: ``CGE`` (default: forward differences, d + 1 queries per step), ``RGE(q, mu)``
            (q + 1 queries per step, for large d) or any ``Estimator``.
        optimizer: a ``torch.optim`` class (``torch.optim.SGD``) or a factory
            ``lambda params: torch.optim.Adam(params, lr=1e-2)``; default Adam with
            ``lr=0.05`` (a step of about 0.05 per coordinate: scale it to your parameters).
        max_queries: the query budget: evaluations of ``f`` never exceed it (one is kept for
            ``f`` at the last iterate). A step that would exceed it is not started.
        max_steps: optimizer steps at most. Neither this nor ``max_queries``: 1000 steps.
        batches: optional re-iterable of tuples passed to ``f`` after x, one per step, cycled
            (a stochastic objective over data); None: ``f(x)``.
        mu: the default estimator's finite-difference step; None: the square root of the
            dtype's machine epsilon (1.5e-8 in float64, as scipy's finite differences), right
            for a smooth, noise-free ``f``; raise it (e.g. 1e-3) for a noisy one. Give the step
            to the estimator instead when you give one.
        callback: ``callback(intermediate_result)`` after each step, with ``x`` (the new iterate,
            NumPy ``[d]``), ``step``, ``queries``, ``loss`` and ``grad_norm``; returning True
            or raising ``StopIteration`` stops (``success`` False, as in scipy).
        gtol: stop (``success`` True) once the gradient estimate's norm falls below it; when
            given, running out of steps or queries first is not a success.
        numpy: ``f`` receives NumPy arrays (default) or, False, torch tensors.
        batched: ``f`` takes ``[P, d]`` and returns ``[P]`` (one call per estimate).
        dtype: torch dtype of x; None: x0's floating dtype, else float64.
        seed: seeds the random directions of a randomized estimator.
        progress: show a progress bar.

    Returns:
        a ``MinimizeResult``: ``x``, ``fun``, ``success``, ``message``, ``queries`` (``nfev``),
        ``steps`` (``nit``), ``history``. ``success`` is False when ``f`` became NaN or Inf
        (``x`` is then the best point before it), when ``gtol`` was not reached, or when the
        budget allowed no step.

    Raises:
        ValueError: bad ``x0`` (not 1-D, empty, non-finite) or settings.
        NonFiniteLossError: ``f`` is NaN or Inf at ``x0`` or within ``mu`` of it.
        BlackBoxError: ``f`` returned something other than one number.
    """
    x = _start(x0, dtype)
    d = x.numel()
    if estimator is None:
        estimator = CGE(mu=math.sqrt(torch.finfo(x.dtype).eps) if mu is None else mu)
    elif mu is not None:
        raise ValueError("mu= sets the default estimator's step; with estimator= give the step "
                         "to it instead, e.g. estimator=CGE(mu=1e-4)")
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be an Estimator such as CGE() or RGE(), "
                        f"got {type(estimator).__name__}")
    for name, value, least in (("max_queries", max_queries, 1), ("max_steps", max_steps, 0)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < least):
            raise ValueError(f"{name} must be an integer >= {least} or None, got {value!r}")
    if gtol is not None and not gtol > 0:
        raise ValueError(f"gtol must be positive or None, got {gtol}")
    if max_steps is None and max_queries is None:
        max_steps = DEFAULT_MAX_STEPS
    opt = _optimizer(optimizer, x)

    oracle = CallableOracle(f, d, numpy=numpy, batched=batched, budget=max_queries)
    record = _Record(x, gtol, callback)
    trainer = Trainer(oracle, estimator, opt, params=[x], callbacks=[record], seed=seed,
                      progress=progress, desc="minimize")
    diverged = None
    try:  # one query is kept back for f at the last iterate
        trainer.fit(batches, max_steps=max_steps,
                    max_queries=None if max_queries is None else max_queries - 1)
    except TrainingDiverged as exc:
        if trainer.step == 0:
            raise NonFiniteLossError(
                f"f is NaN or Inf at x0 or within mu of it ({exc.__cause__}); start from a point "
                f"where f and its neighbourhood are finite") from exc
        diverged = exc.__cause__

    final = _value_at(oracle, x)
    if batches is not None or record.best_x is None or final <= record.best_fun:
        best_x, fun = x.detach(), final
    else:  # a point seen earlier is better (or f is not finite at the last iterate)
        best_x, fun = record.best_x, record.best_fun

    steps = trainer.step
    if diverged is not None:
        success = False
        message = (f"f became NaN or Inf in step {steps + 1} ({diverged}); x is the best point "
                   f"before it. Lower the learning rate, or make f finite everywhere (e.g. a large "
                   f"value outside its domain)")
    elif record.stopped_by == "gtol":
        success, message = True, trainer.stopped_reason
    elif record.stopped_by == "callback":
        success, message = False, "the callback asked to stop (returned True or raised StopIteration)"
    elif max_steps is not None and steps >= max_steps:
        success = gtol is None
        message = f"max_steps={max_steps} reached" + ("" if success else " before gtol")
    elif steps == 0:
        success = False
        message = (f"max_queries={max_queries} allows no step: one costs "
                   f"{estimator.queries_per_estimate(oracle)} queries, plus one for f at the end")
    else:
        success = gtol is None
        message = (f"max_queries={max_queries} reached: another step would exceed it"
                   + ("" if success else " (before gtol)"))
    return MinimizeResult(x=_numpy(best_x), fun=fun, success=success, message=message,
                          queries=oracle.queries, nfev=oracle.queries, steps=steps, nit=steps,
                          history=record.history)


def _start(x0, dtype) -> torch.Tensor:
    """x0 as a fresh 1-D floating tensor (the one the optimizer moves), or a clear error."""
    if isinstance(x0, torch.Tensor):
        t = x0.detach().clone()
    else:
        try:
            t = torch.from_numpy(np.array(x0))
        except TypeError:
            raise ValueError(f"x0 must be a 1-D array of numbers, got {type(x0).__name__} "
                             f"{np.asarray(x0, dtype=object).dtype}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"x0 must be a non-empty 1-D array [d], got shape {tuple(t.shape)}; "
                         "pass x0.ravel() and reshape inside f")
    if dtype is None:
        dtype = t.dtype if t.is_floating_point() else torch.float64
    elif not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"x0 must hold real numbers, got {t.dtype}")
    t = t.to(dtype)
    if not torch.isfinite(t).all():
        raise ValueError("x0 holds NaN or Inf: start from a finite point")
    return t


def _optimizer(optimizer, x: torch.Tensor) -> torch.optim.Optimizer:
    """The optimizer over ``[x]``: Adam by default, else a class or factory called with it."""
    if optimizer is None:
        return torch.optim.Adam([x], lr=DEFAULT_LR)
    if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
        raise TypeError("optimizer must be a torch.optim class (torch.optim.SGD) or a factory "
                        "such as lambda params: torch.optim.Adam(params, lr=1e-2): minimize makes "
                        f"the parameter tensor from x0; got {type(optimizer).__name__}")
    built = optimizer([x])
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, "
                        f"got {type(built).__name__}")
    return built


def _value_at(oracle: CallableOracle, x: torch.Tensor) -> float:
    """f at x for one query if the budget has one left; NaN if not (or if f is not finite there)."""
    try:
        return float(oracle.loss(x.detach()))
    except (NonFiniteLossError, QueryBudgetExceeded):
        return math.nan


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().copy()


__all__ = ["MinimizeResult", "minimize"]
