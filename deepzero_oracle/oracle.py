"""Oracles: theta -> loss, the only thing the engine talks to. Every loss evaluation at one
theta is one *query*; oracles count them and can enforce a budget.

An oracle answers three kinds of request (public, validated, budgeted, counted):
``losses(thetas)``, ``coordinate_losses(theta, coords, mu)`` and
``direction_losses(theta, dirs, mu)``, plus ``autograd_gradient(theta)`` where the loss is
differentiable. Subclasses implement the matching *evaluation hooks*
(``evaluate_losses``, ``evaluate_coordinates``, ``evaluate_directions``,
``evaluate_gradient``): no validation, no budget, no count. The public methods call them;
so do ``ParallelOracle``'s workers, which is why worker copies never double count.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from deepzero_oracle.blackbox.errors import BlackBoxError
from deepzero_oracle.blackbox.local import as_tensor
from deepzero_oracle.errors import NonFiniteLossError, QueryBudgetExceeded
from deepzero_oracle.estimators.directions import direction_matrix
from deepzero_oracle.theta import flatten, load_theta, parameter_slots, trainable_parameters


class QueryLedger:
    """Queries spent and the budget they may not exceed.

    Oracles that answer for one another (an oracle and the sub-oracle it builds per step)
    share one ledger, so a budget covers them all and every query is counted once.
    """

    def __init__(self, budget: int | None = None):
        if budget is not None and int(budget) < 0:
            raise ValueError(f"budget must be a non-negative number of queries or None, got {budget}")
        self.budget = None if budget is None else int(budget)
        self.used = 0

    def check(self, count: int) -> None:
        """Raise ``QueryBudgetExceeded`` (spending nothing) if ``count`` more queries would
        exceed the budget."""
        if self.budget is not None and self.used + count > self.budget:
            raise QueryBudgetExceeded(
                f"this request needs {count} queries but only {self.budget - self.used} of the "
                f"budget of {self.budget} remain ({self.used} used); raise the oracle's budget "
                f"or ask for fewer coordinates/directions"
            )

    def spend(self, count: int) -> None:
        """Record ``count`` queries as spent."""
        self.used += int(count)


class Oracle:
    """Base oracle: ``theta [dim] -> loss``, batched, with a query counter and budget.

    Subclasses implement ``evaluate_losses(thetas [P, dim]) -> [P]``; they may override
    ``evaluate_coordinates`` / ``evaluate_directions`` when they know a faster way, and
    ``evaluate_gradient`` when the loss can be back-propagated. The public methods validate
    input, enforce the budget before spending anything, split work into ``max_batch``
    chunks, check the answers (one finite loss per query) and count.

    Args:
        dim: length of theta.
        budget: maximum number of queries, or None for no limit.
        max_batch: most queries handed to one ``evaluate_losses`` call (memory bound).
        ledger: a ``QueryLedger`` to share with another oracle (default: a new one).
    """

    def __init__(self, dim: int, *, budget: int | None = None, max_batch: int | None = 1024,
                 ledger: QueryLedger | None = None):
        if int(dim) <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.ledger = ledger if ledger is not None else QueryLedger(budget)
        self.max_batch = max_batch

    @property
    def queries(self) -> int:
        """Queries spent so far (on this oracle's ledger)."""
        return self.ledger.used

    @queries.setter
    def queries(self, value: int) -> None:
        self.ledger.used = int(value)

    @property
    def budget(self) -> int | None:
        """The ledger's query budget (None: no limit)."""
        return self.ledger.budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        self.ledger.budget = None if value is None else int(value)

    # -- public API -----------------------------------------------------------------------------

    def losses(self, thetas) -> torch.Tensor:
        """Loss at each row of ``thetas [P, dim]``; returns ``[P]``. Costs P queries."""
        thetas = self._as_vector(thetas, rows=True)
        size = self.dense_chunk(thetas[0]) if len(thetas) > 1 else None
        return self._chunked(len(thetas), lambda s: self.evaluate_losses(thetas[s]), size)

    def loss(self, theta) -> torch.Tensor:
        """Loss at ``theta [dim]`` as a 0-d tensor. Costs one query."""
        return self.losses(self._as_vector(theta)[None])[0]

    def coordinate_losses(self, theta, coords, mu: float) -> torch.Tensor:
        """``loss(theta + mu * e_i)`` for each ``i`` in ``coords [C]``; returns ``[C]``."""
        theta, coords = self._as_vector(theta), self._as_coords(coords)
        return self._chunked(
            coords.numel(), lambda s: self.evaluate_coordinates(theta, coords[s], float(mu))
        )

    def direction_losses(self, theta, dirs, mu: float) -> torch.Tensor:
        """``loss(theta + mu * u_j)`` for each row ``u_j`` of ``dirs``; returns ``[Q]``.

        ``dirs`` is a tensor ``[Q, dim]`` or a ``Directions`` recipe
        (``deepzero_oracle.estimators.directions``), which is made into its rows here.
        """
        theta = self._as_vector(theta)
        dirs = self._as_vector(direction_matrix(dirs), rows=True).to(theta.device)  # recipes draw on the CPU
        return self._chunked(len(dirs), lambda s: self.evaluate_directions(theta, dirs[s], float(mu)),
                             self.dense_chunk(theta))

    def autograd_gradient(self, theta, *, with_loss: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The exact gradient ``[dim]`` at ``theta [dim]`` by back-propagation, where the oracle
        allows it; with ``with_loss`` also the loss there, ``(grad, loss)``. Costs one query."""
        theta = self._as_vector(theta)
        self.ledger.check(1)
        grad, loss = self.evaluate_gradient(theta)
        self.ledger.spend(1)
        loss = self.check_answer(loss.detach(), 1)[0]
        return (grad, loss) if with_loss else grad

    def bind(self, *batch) -> "Oracle":
        """Use a data batch for the next queries (oracles that take data override this);
        returns the oracle."""
        if batch:
            raise TypeError(f"{type(self).__name__} takes no data batch; got {len(batch)} value(s)")
        return self

    def end_step(self) -> None:
        """Called by the Trainer once per step, after the estimate and before the optimizer
        moves theta: update what training by autograd would update during its forward
        (e.g. BatchNorm running statistics). Queries never do; the default does nothing."""

    def state_dict(self) -> dict:
        """Counters to checkpoint with the trainer."""
        return {"queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by ``state_dict``."""
        self.queries = int(state["queries"])

    # -- evaluation hooks (uncounted, unchecked; subclasses implement) ----------------------------

    def evaluate_losses(self, thetas: torch.Tensor) -> torch.Tensor:
        """Hook: loss at each row of ``thetas [P, dim]`` -> ``[P]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate_losses")

    def evaluate_coordinates(self, theta: torch.Tensor, coords: torch.Tensor, mu: float) -> torch.Tensor:
        """Hook: ``loss(theta + mu e_i)`` for ``coords [C]`` -> ``[C]`` (default: via
        ``evaluate_losses`` on moved copies of theta)."""
        thetas = theta.repeat(len(coords), 1)
        thetas[torch.arange(len(coords), device=coords.device), coords] += mu
        return self.evaluate_losses(thetas)

    def evaluate_directions(self, theta: torch.Tensor, dirs: torch.Tensor, mu: float) -> torch.Tensor:
        """Hook: ``loss(theta + mu u_j)`` for the rows of ``dirs [Q, dim]`` -> ``[Q]``."""
        return self.evaluate_losses(theta + mu * dirs)

    def evaluate_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: ``(exact gradient [dim], loss)`` (oracles with an autograd path implement it)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no autograd path: its loss is only known through queries"
        )

    def dense_chunk(self, theta: torch.Tensor) -> int | None:
        """Hook: queries per chunk when every parameter moves (``losses``,
        ``direction_losses``); None means ``max_batch``."""
        return self.max_batch

    # -- shared checks ----------------------------------------------------------------------------

    def check_answer(self, values, count: int, first: int = 0) -> torch.Tensor:
        """``values`` as a flat tensor of ``count`` finite losses, else a clear error.

        ``first`` is the position of ``values[0]`` in the request (for the message).
        """
        values = torch.as_tensor(values).reshape(-1)
        if values.numel() != count:
            raise BlackBoxError(f"{type(self).__name__} returned {values.numel()} losses for "
                                f"{count} queries")
        bad = ~torch.isfinite(values)
        if bad.any():
            where = int(bad.nonzero()[0]) + first
            raise NonFiniteLossError(
                f"{int(bad.sum())} of {values.numel()} losses were NaN or Inf (first at query "
                f"{where} of this request). The loss or the black box behind it produced "
                f"non-finite values: check the black box's outputs, or lower mu / the learning rate"
            )
        return values

    def _chunked(self, count: int, evaluate: Callable[[slice], torch.Tensor],
                 size: int | None = None) -> torch.Tensor:
        self.ledger.check(count)
        size = size or self.max_batch or count or 1
        out = []
        for start in range(0, count, size):
            part = slice(start, min(count, start + size))
            raw = evaluate(part)
            self.ledger.spend(part.stop - part.start)  # spent, even if the answer is unusable
            out.append(self.check_answer(raw, part.stop - part.start, start))
        return torch.cat(out) if out else torch.empty(0)

    def _as_coords(self, coords) -> torch.Tensor:
        """Coordinates as a flat long tensor ``[C]``, each checked to lie in ``[0, dim)``."""
        coords = torch.as_tensor(coords, dtype=torch.long).reshape(-1)
        if coords.numel() and (coords.min() < 0 or coords.max() >= self.dim):
            raise IndexError(
                f"coordinates must lie in [0, {self.dim}); got range "
                f"[{int(coords.min())}, {int(coords.max())}]"
            )
        return coords

    def _as_vector(self, value, rows: bool = False) -> torch.Tensor:
        t = as_tensor(value).detach()
        want = f"[P, {self.dim}]" if rows else f"[{self.dim}]"
        if (t.dim() != (2 if rows else 1)) or t.shape[-1] != self.dim:
            raise ValueError(
                f"expected {'a batch of thetas' if rows else 'theta'} shaped {want} "
                f"(dim = the number of trainable parameters), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"theta must be floating point, got {t.dtype}")
        return t


class CallableOracle(Oracle):
    """An oracle from any function of a flat theta: a pure black box.

    Args:
        fn: ``fn(theta [dim], *batch) -> scalar`` (a float, a 0-d array or tensor) or, with
            ``batched=True``, ``fn(thetas [P, dim], *batch) -> [P]``. ``batch`` is what was
            last bound with ``bind(*batch)`` (nothing for a plain function of theta).
        dim: length of theta.
        batched: whether ``fn`` takes a batch of thetas in one call.
        numpy: pass NumPy arrays to ``fn`` (theta and the bound tensors) instead of torch tensors.
    """

    def __init__(self, fn: Callable, dim: int, *, batched: bool = False, numpy: bool = False, **kw):
        super().__init__(dim, **kw)
        if not callable(fn):
            raise TypeError(f"CallableOracle needs a callable, got {type(fn).__name__}")
        self.fn, self.batched, self.numpy = fn, batched, numpy
        self.batch: tuple = ()

    def bind(self, *batch) -> "CallableOracle":
        """Pass ``batch`` (e.g. ``x [B, ...], y [B]``) to ``fn`` after theta in the next queries:
        ``fn(theta, *batch)``; ``bind()`` with nothing goes back to ``fn(theta)``. Returns the
        oracle."""
        if self.numpy:
            batch = tuple(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b for b in batch)
        self.batch = batch
        return self

    def _call(self, x):
        value = self.fn(x.numpy() if self.numpy else x, *self.batch)
        if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
            return as_tensor(value)
        try:  # a Python float straight to theta's dtype (via float32 it would lose digits)
            return torch.as_tensor(value, dtype=x.dtype)
        except (TypeError, RuntimeError, ValueError) as exc:
            raise BlackBoxError(f"the function returned a {type(value).__name__} ({exc}); it must "
                                "return a number (a float, a 0-d array or tensor)") from None

    def evaluate_losses(self, thetas: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.batched:
                return self._call(thetas).to(thetas.dtype).reshape(-1)
            return torch.stack([self._one(self._call(t)).to(thetas.dtype) for t in thetas])

    @staticmethod
    def _one(value: torch.Tensor) -> torch.Tensor:
        """A 0-d loss from one call, or a clear error if the function returned several numbers."""
        if value.numel() != 1:
            raise BlackBoxError(
                f"the function returned shape {tuple(value.shape)} for one theta; it must return "
                f"one number (a float, a 0-d array or tensor): sum or average what it computes, or "
                f"pass batched=True if it takes a batch of thetas [P, dim] and returns [P]")
        return value.reshape(())

    def evaluate_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.numpy:
            return super().evaluate_gradient(theta)
        theta = theta.clone().requires_grad_(True)
        value = self.fn(theta[None], *self.batch) if self.batched else self.fn(theta, *self.batch)
        value = self._one(torch.as_tensor(value))
        return torch.autograd.grad(value, theta)[0], value


class LearnerOracle(Oracle):
    """An oracle whose theta is the trainable parameters of a white-box ``nn.Module``.

    This is what the ``Trainer`` trains: it writes estimates into the learner's ``param.grad``
    and lets a stock optimizer step. Subclasses add the data (``bind``) and the loss.

    Args:
        learner: the module; theta is its trainable parameters (``deepzero_oracle.theta``).
        **kw: as for ``Oracle`` (budget, max_batch, ledger).
    """

    def __init__(self, learner: nn.Module, **kw):
        if not isinstance(learner, nn.Module):
            raise TypeError(f"the learner must be a torch nn.Module, got {type(learner).__name__}")
        self.learner = learner
        self.slots = parameter_slots(learner)
        if not self.slots:
            raise ValueError("the learner has no trainable parameters (requires_grad=True)")
        super().__init__(self.slots[-1].stop, **kw)

    def parameters(self) -> list[nn.Parameter]:
        """The learner's trainable parameters in theta order."""
        return trainable_parameters(self.learner, self.slots)

    def theta(self) -> torch.Tensor:
        """A copy of the learner's trainable parameters as one flat vector ``[dim]``."""
        return flatten(self.parameters())

    def set_theta(self, theta) -> None:
        """Write ``theta [dim]`` into the learner's parameters."""
        load_theta(self.parameters(), self._as_vector(theta))


__all__ = ["CallableOracle", "LearnerOracle", "Oracle", "QueryLedger"]
