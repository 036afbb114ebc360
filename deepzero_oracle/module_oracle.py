"""``ModuleOracle``: theta -> loss of a white-box learner, an optional black box after it,
and a loss, on a bound data batch. Coordinate queries take the structure-aware fast path."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from deepzero_oracle.blackbox.local import BlackBoxError, LocalBlackBox, as_tensor
from deepzero_oracle.errors import NonFiniteLossError
from deepzero_oracle.delta import channel_major, conv_patches
from deepzero_oracle.graph import (
    GraphForward,
    cached_aux,
    UnsupportedLearner,
    normalised_input,
    repeat_rows,
)
from deepzero_oracle.oracle import LearnerOracle
from deepzero_oracle.theta import unflatten


def default_working_set() -> float:
    """Bytes for the largest stacked value of one query chunk: a quarter of the last-level
    cache where the OS reports it (Linux), else 8 MB. (Measured on the MNIST-5k CNN with a
    64 MB L3: 8 / 16 / 24 / 48 MB took 2.83 / 2.51 / 2.54 / 2.99 s for all coordinates.)"""
    try:
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        l3 = 0
    return 0.25 * l3 if l3 and l3 > 0 else 8e6


class ModuleOracle(LearnerOracle):
    """``theta -> loss_fn(blackbox(learner(x; theta)), y)`` on a bound data batch.

    theta is the flat vector of the learner's trainable parameters (``named_parameters``
    order). Coordinate queries take the fast path of ``deepzero_oracle.graph`` when the
    learner's structure allows it (feature reuse, one-weight delta, stacked suffix), otherwise
    ``torch.func.functional_call`` + ``vmap`` over perturbed parameter copies. Queries never
    change the learner (no running-statistics updates); ``update_running_stats`` does that once.

    Args:
        learner: the white-box ``nn.Module`` being trained.
        loss_fn: ``loss_fn(outputs [B, ...], targets [B, ...]) -> scalar`` (e.g.
            ``F.cross_entropy``); applied to each perturbation's B rows.
        blackbox: optional callable applied to the learner's outputs ``[N, ...] -> [N, ...]``;
            it sees ``P * B`` rows for P queries.
        fast: use the structure-aware fast path when possible (feature reuse).
        one_weight_delta, delta_propagation, fused_kernels: the fast path's further savings
            (``fused_kernels``: a change entering a Conv2d + 2x2 max-pool is computed by one
            ``torch.compile``d kernel, see ``deepzero_oracle.fused``); switches exist for
            ablation benchmarks, results are the same either way (to float rounding).
        max_batch: perturbations evaluated together; None sizes each parameter tensor's chunks
            so that the largest stacked value takes about ``working_set`` bytes.
        working_set: target bytes for the largest stacked value of one chunk. The stacked
            runs are memory-bound; chunks that stay in cache run 2-3x faster than huge ones.
            Default: a quarter of the L3 cache (8 MB if unknown).
    """

    def __init__(self, learner: nn.Module, loss_fn: Callable, blackbox: Callable | None = None,
                 *, budget: int | None = None, max_batch: int | None = None, fast: bool = True,
                 one_weight_delta: bool = True, delta_propagation: bool = True,
                 fused_kernels: bool = True, working_set: float | None = None):
        super().__init__(learner, budget=budget, max_batch=max_batch)
        self.loss_fn, self.blackbox = loss_fn, blackbox
        self.offsets = torch.tensor([s.offset for s in self.slots])
        self.one_weight_delta, self.delta_propagation = one_weight_delta, delta_propagation
        self.fused_kernels = fused_kernels
        self.working_set = working_set or default_working_set()
        self.graph = None
        self.fallback_reason = "disabled (fast=False)"
        if fast:
            try:
                self.graph = GraphForward(learner)
                self.fallback_reason = None
            except UnsupportedLearner as exc:
                self.fallback_reason = str(exc)
        self._fast_checked = False
        self._vmap_loss = True
        self.x = self.y = None
        self._cache = None
        if any(isinstance(m, nn.Dropout) and m.training for m in learner.modules()):
            warnings.warn("the learner has Dropout in train mode: finite differences will be noise; "
                          "call learner.eval() or remove dropout", stacklevel=2)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None  # per-theta activations keyed by fx nodes: rebuilt on demand
        return state

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
        self._cache = None
        return self

    def end_step(self) -> None:
        """One forward of the bound batch in the learner's own mode, so BatchNorm running
        statistics track training as they would under autograd (queries never touch them).
        Skipped when the learner keeps no running statistics in training mode."""
        if self._has_running_stats_in_training():
            with torch.no_grad():
                self.learner(self._require_data())

    def _require_data(self):
        if self.x is None:
            raise RuntimeError("no data bound: call oracle.bind(x, y) before querying")
        return self.x

    # -- queries --------------------------------------------------------------------------------

    def evaluate_losses(self, thetas):
        if len(thetas) == 1 and self.graph is not None:
            cache = self._base(thetas[0])
            return self._head(cache[self.graph.output_node], 1)
        return self._head(self._outputs(thetas), len(thetas))

    def evaluate_coordinates(self, theta, coords, mu):
        if self.graph is not None and not self._fast_checked:
            self._check_fast_path(theta, mu)
        if self.graph is None:
            return super().evaluate_coordinates(theta, coords, mu)
        losses = torch.empty(len(coords), dtype=theta.dtype)
        for where, outputs in self._coordinate_groups(theta, coords, mu):
            losses[where] = self._head(outputs, len(where)).to(theta.dtype)
        return losses

    def _outputs(self, thetas):
        """Learner outputs for each theta, stacked ``[P*B, ...]``."""
        x = self._require_data()
        P = len(thetas)
        if self.graph is not None:
            # every parameter is batched, so run() reads from the cache only values that do not
            # depend on theta: any cache of the bound batch serves (no extra base forward)
            cache = self._cache if self._cache is not None else self._base(thetas[0])
            return self.graph.run(cache, P, {}, batched=unflatten(thetas, self.slots))
        buffers = {k: v.clone() for k, v in self.learner.named_buffers()}
        params = unflatten(thetas, self.slots)

        def forward(p):
            return functional_call(self.learner, (p, buffers), (x,), strict=False)

        with torch.no_grad():
            if self._has_running_stats_in_training():
                # a vmapped in-place running-stat update is impossible: one copy at a time
                outs = torch.stack([forward({k: v[i] for k, v in params.items()}) for i in range(P)])
            else:
                outs = vmap(forward, randomness="different")(params)
        return outs.reshape(P * outs.shape[1], *outs.shape[2:])

    def dense_chunk(self, theta):
        if self.max_batch is not None or self.graph is None:
            return self.max_batch
        if any(isinstance(self.graph.modules[s.module], nn.Conv2d) for s in self.slots):
            # per-copy convolution kernels (grouped) run 2-3x slower per copy on CPU than
            # one plain forward per query (measured: digits/MNIST CNNs, batch 128)
            return 1
        return self.graph.copies_within(self.working_set, self._base(theta), None)

    def _coordinate_groups(self, theta, coords, mu):
        """Yield ``(where, outputs)``: positions in ``coords`` and the learner outputs
        ``[len(where)*B, ...]`` for ``theta + mu e_i`` at those coordinates, one parameter
        tensor and one memory-sized chunk at a time."""
        cache = self._base(theta)
        params = unflatten(theta, self.slots)
        graph = self.graph
        slot_of = torch.searchsorted(self.offsets, coords, right=True) - 1
        for k in slot_of.unique().tolist():
            s = self.slots[k]
            positions = (slot_of == k).nonzero().reshape(-1)
            size = self.max_batch or graph.copies_within(self.working_set, cache, s.module,
                                                         propagate=self.delta_propagation and self.one_weight_delta,
                                                         fuse=self.fused_kernels)
            for where in positions.split(size):
                local = coords[where] - s.offset
                yield where, self._slot_outputs(cache, params, s, local, mu)

    def _slot_outputs(self, cache, params, s, local, mu):
        graph, P = self.graph, len(local)
        sites = graph.call_sites.get(s.module, [])
        if not sites:  # parameter unused by forward: the loss does not move
            return repeat_rows(cache[graph.output_node], P)
        if len(sites) > 1 or not self.one_weight_delta:
            # a module called more than once (or the ablation): per-copy parameters
            return graph.run(cache, P, params, batched={s.name: _moved(params[s.name], local, mu)})
        node = sites[0]
        fuse = self.fused_kernels and self.delta_propagation
        overrides = graph.moved_weight(node, s.attr, local, mu, cache,
                                       self._aux(cache, node, graph.modules[s.module]), fuse)
        return graph.run(cache, P, params, overrides=overrides, propagate=self.delta_propagation,
                         fuse=self.fused_kernels)

    def _coordinate_outputs(self, theta, coords, mu):
        """Learner outputs with ``theta + mu e_i`` for each ``i`` in coords, ``[C*B, ...]``."""
        parts = list(self._coordinate_groups(theta, coords, mu))
        B = len(self.x)
        first = parts[0][1]
        result = torch.empty(len(coords), B, *first.shape[1:], dtype=first.dtype)
        for where, out in parts:
            result[where] = out.reshape(len(where), B, *out.shape[1:])
        return result.reshape(len(coords) * B, *result.shape[2:])

    def _aux(self, cache, node, module):
        """Lazily cached per-node helpers for the one-weight delta."""
        makers = {
            "patches": lambda: conv_patches(module, cache[node.args[0]], channel_major=True),
            "output_cm": lambda: channel_major(cache[node]),
            "xhat": lambda: normalised_input(module, cache[node.args[0]]),
        }
        return lambda kind: cached_aux(cache, node, kind, makers[kind])

    def _base(self, theta):
        """Every node's value at theta on the bound batch (cached until theta or data change)."""
        x = self._require_data()
        if self._cache is not None and torch.equal(self._cache["theta"], theta):
            return self._cache
        with torch.no_grad():
            cache = self.graph.base(x, unflatten(theta, self.slots))
        cache["theta"] = theta.clone()
        self._cache = cache
        return cache

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
            if self._vmap_loss:
                try:
                    return vmap(self.loss_fn, in_dims=(0, None))(stacked, y).reshape(P)
                except Exception:  # a loss vmap cannot batch: evaluate per perturbation
                    self._vmap_loss = False
            return torch.stack([torch.as_tensor(self.loss_fn(o, y)).reshape(()) for o in stacked])

    # -- correctness guards ---------------------------------------------------------------------

    def _has_running_stats_in_training(self):
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            for m in self.learner.modules()
        )

    def _check_fast_path(self, theta, mu):
        """Compare the fast path with the generic one on a few coordinates, once per oracle.

        Works on learner outputs only, so it costs no black-box queries. A mismatch or an error
        switches this oracle to the generic path with a warning: slower, never silently wrong.
        """
        self._fast_checked = True
        probe = torch.tensor(sorted({c for s in self.slots for c in (s.offset, s.offset + s.numel - 1)}))
        graph, reason = self.graph, None
        try:
            fast = self._coordinate_outputs(theta, probe, mu)
            thetas = theta.repeat(len(probe), 1)
            thetas[torch.arange(len(probe)), probe] += mu
            self.graph = None
            slow = self._outputs(thetas)
            tol = 1e-9 if theta.dtype == torch.float64 else 1e-4
            scale = slow.abs().max().clamp_min(1.0)
            if fast.shape != slow.shape or (fast - slow).abs().max() > tol * scale:
                reason = "its outputs differ from the generic path"
        except Exception as exc:  # any structural surprise: the generic path is always right
            reason = f"it raised {type(exc).__name__}: {exc}"
        self.graph = graph if reason is None else None
        if reason:
            self.fallback_reason = f"fast path disabled because {reason}"
            warnings.warn(f"ModuleOracle: {self.fallback_reason}; using the generic path", stacklevel=3)

    def evaluate_gradient(self, theta):
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
        buffers = {k: v.clone() for k, v in self.learner.named_buffers()}
        out = functional_call(self.learner, (unflatten(theta, self.slots), buffers),
                              (self._require_data(),), strict=False)
        if self.blackbox is not None:
            out = self.blackbox(out)
        loss = self.loss_fn(out, self.y)
        return torch.autograd.grad(loss, theta)[0], loss


def _moved(param, local, mu):
    """``[P, *shape]`` copies of ``param``, copy p with flat entry ``local[p]`` moved by mu."""
    value = param.reshape(-1).repeat(len(local), 1)
    value[torch.arange(len(local)), local] += mu
    return value.reshape(len(local), *param.shape)




__all__ = ["ModuleOracle", "default_working_set"]
