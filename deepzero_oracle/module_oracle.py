"""``ModuleOracle``: theta -> loss of a white-box learner, an optional black box after it,
and a loss, on a bound data batch. The learner's outputs come from ``deepzero_oracle.fastpath``;
this module adds the black box, the loss and the autograd path."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

from deepzero_oracle.blackbox.errors import BlackBoxError
from deepzero_oracle.blackbox.local import LocalBlackBox, as_tensor
from deepzero_oracle.errors import NonFiniteLossError
from deepzero_oracle.fastpath import FastPath, updates_running_stats
from deepzero_oracle.oracle import LearnerOracle
from deepzero_oracle.theta import unflatten


class ModuleOracle(LearnerOracle):
    """``theta -> loss_fn(blackbox(learner(x; theta)), y)`` on a bound data batch.

    theta is the flat vector of the learner's trainable parameters (``named_parameters``
    order). The learner's outputs come from ``self.fastpath`` (``deepzero_oracle.fastpath``):
    the structure-aware fast path when the learner's structure allows it (feature reuse,
    one-weight delta, stacked suffix), otherwise ``torch.func.functional_call`` + ``vmap`` over
    perturbed parameter copies. Queries never change the learner (no running-statistics
    updates); ``end_step`` does that once per step.

    Args:
        learner: the white-box ``nn.Module`` being trained.
        loss_fn: ``loss_fn(outputs [B, ...], targets [B, ...]) -> scalar`` (e.g.
            ``F.cross_entropy``); applied to each perturbation's B rows.
        blackbox: optional callable applied to the learner's outputs ``[N, ...] -> [N, ...]``;
            it sees ``P * B`` rows for P queries.
        fast: use the structure-aware fast path when possible (feature reuse).
        one_weight_delta: a fast-path saving (a moved weight's effect as a one-channel change).
        delta_propagation: a fast-path saving (that change carried through element-wise layers
            and pooling).
        fused_kernels: a fast-path saving (a change entering a Conv2d + 2x2 max-pool is computed
            by one ``torch.compile``d kernel, see ``deepzero_oracle.fastpath.fused``). These three
            switches exist for ablation benchmarks; results are the same either way (to float
            rounding).
        max_batch: perturbations evaluated together; None sizes each parameter tensor's chunks
            so that the largest stacked value takes about ``working_set`` bytes.
        working_set: target bytes for the largest stacked value of one chunk. Default
            (``deepzero_oracle.fastpath.default_working_set``): the L3 cache's size when freed
            memory is retained (``retain_freed_memory``), a quarter of it otherwise.
    """

    def __init__(self, learner: nn.Module, loss_fn: Callable, blackbox: Callable | None = None,
                 *, budget: int | None = None, max_batch: int | None = None, fast: bool = True,
                 one_weight_delta: bool = True, delta_propagation: bool = True,
                 fused_kernels: bool = True, working_set: float | None = None):
        super().__init__(learner, budget=budget, max_batch=max_batch)
        self.loss_fn, self.blackbox = loss_fn, blackbox
        self.fastpath = FastPath(learner, self.slots, fast=fast, one_weight_delta=one_weight_delta,
                                 delta_propagation=delta_propagation, fused_kernels=fused_kernels,
                                 working_set=working_set)
        self._vmap_loss = True
        self.x = self.y = None
        if any(isinstance(m, nn.Dropout) and m.training for m in learner.modules()):
            warnings.warn("the learner has Dropout in train mode: finite differences will be noise; "
                          "call learner.eval() or remove dropout", stacklevel=2)

    @property
    def fallback_reason(self) -> str | None:
        """Why the generic path answers instead of the fast path (None: the fast path does)."""
        return self.fastpath.fallback_reason

    # -- data and parameters --------------------------------------------------------------------

    def bind(self, x: torch.Tensor, y) -> "ModuleOracle":
        """Use the data batch ``x [B, ...]`` with targets ``y [B, ...]`` for the next queries."""
        x = as_tensor(x)
        dtype = self.parameters()[0].dtype
        self.x = x.to(dtype) if x.is_floating_point() else x
        self.y = as_tensor(y)
        if self.x.dim() == 0 or len(self.x) != len(self.y):
            raise ValueError(
                f"x and y must hold the same number of rows, got {tuple(self.x.shape)} and "
                f"{tuple(self.y.shape)}"
            )
        return self

    def end_step(self) -> None:
        """One forward of the bound batch in the learner's own mode, so BatchNorm running
        statistics track training as they would under autograd (queries never touch them).
        Skipped when the learner keeps no running statistics in training mode."""
        if updates_running_stats(self.learner):
            with torch.no_grad():
                self.learner(self._require_data())

    def _require_data(self):
        if self.x is None:
            raise RuntimeError("no data bound: call oracle.bind(x, y) before querying")
        return self.x

    # -- queries --------------------------------------------------------------------------------

    def evaluate_losses(self, thetas: torch.Tensor) -> torch.Tensor:
        return self._head(self.fastpath.outputs(self._require_data(), thetas), len(thetas))

    def evaluate_coordinates(self, theta: torch.Tensor, coords: torch.Tensor, mu: float) -> torch.Tensor:
        losses = torch.empty(len(coords), dtype=theta.dtype, device=theta.device)
        groups = self.fastpath.coordinate_outputs(self._require_data(), theta, coords, mu, self.max_batch)
        for where, outputs in groups:
            losses[where] = self._head(outputs, len(where)).to(theta.dtype)
        return losses

    def dense_chunk(self, theta: torch.Tensor) -> int | None:
        if self.max_batch is not None or not self.fastpath.active:
            return self.max_batch
        return self.fastpath.dense_chunk(self._require_data(), theta)

    def _head(self, outputs, P):
        """Black box (if any) and loss per perturbation: ``[P*B, ...] -> [P]``."""
        y = self.y
        if self.blackbox is not None:
            answer = as_tensor(self.blackbox(outputs))
            if answer.dim() == 0 or answer.shape[0] != outputs.shape[0]:
                raise BlackBoxError(
                    f"the black box returned shape {tuple(answer.shape)} for {outputs.shape[0]} "
                    f"rows; it must return one row per input row"
                )
            bad = ~torch.isfinite(answer) if answer.is_floating_point() else None
            if bad is not None and bad.any():
                raise NonFiniteLossError(
                    f"the black box returned NaN/Inf in {int(bad.reshape(len(bad), -1).any(1).sum())} "
                    f"of {len(answer)} rows; its inputs were finite, so the fault is in the black box "
                    f"(or the learner's outputs left the range it accepts)"
                )
            outputs = answer.to(outputs.dtype) if answer.is_floating_point() else answer
        stacked = outputs.reshape(P, -1, *outputs.shape[1:])
        with torch.no_grad():
            if is_plain_cross_entropy(self.loss_fn, stacked, y):
                return cross_entropy_per_copy(stacked, y)
            if self._vmap_loss:
                try:
                    return vmap(self.loss_fn, in_dims=(0, None))(stacked, y).reshape(P)
                except Exception:  # a loss vmap cannot batch: evaluate per perturbation
                    self._vmap_loss = False
            return torch.stack([torch.as_tensor(self.loss_fn(o, y)).reshape(()) for o in stacked])

    def evaluate_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta.clone().requires_grad_(True)
        if isinstance(self.blackbox, LocalBlackBox) or (
            self.blackbox is not None and not isinstance(self.blackbox, nn.Module)
            and not getattr(self.blackbox, "differentiable", False)
        ):
            raise NotImplementedError(
                "the black box is not differentiable, so there is no autograd gradient (that is "
                "what zeroth-order estimates are for); pass a torch nn.Module as the black box, "
                "or mark a torch callable with `fn.differentiable = True`, to compare against autograd"
            )
        out = self.fastpath.forward(self._require_data(), unflatten(theta, self.slots))
        if self.blackbox is not None:
            out = self.blackbox(out)
        loss = self.loss_fn(out, self.y)
        return torch.autograd.grad(loss, theta)[0], loss


def is_plain_cross_entropy(loss_fn: Callable, stacked: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``loss_fn`` is the mean cross-entropy over class indices, with nothing that
    changes it (no class weights, label smoothing, ignored targets, other reduction), on
    logits ``stacked [P, B, C]`` and targets ``y [B]``."""
    plain = loss_fn is F.cross_entropy or (
        type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None
        and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean")
    ignored = getattr(loss_fn, "ignore_index", -100)
    return (plain and stacked.dim() == 3 and stacked.is_floating_point() and y.dim() == 1
            and not y.is_floating_point() and len(y) == stacked.shape[1]
            and bool(((y >= 0) & (y < stacked.shape[2]) & (y != ignored)).all()))


def cross_entropy_per_copy(stacked: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(stacked[p], y)`` for every p, ``[P, B, C], [B] -> [P]``, as
    ``logsumexp - target logit``: the same values (to rounding), and faster on CPU than the
    log-softmax a vmapped ``F.cross_entropy`` runs when C is small (its kernel is slow on a
    short last dimension)."""
    target = stacked.gather(2, y.expand(stacked.shape[0], -1).unsqueeze(2)).squeeze(2)
    return (torch.logsumexp(stacked, 2) - target).mean(1)


__all__ = ["ModuleOracle"]
