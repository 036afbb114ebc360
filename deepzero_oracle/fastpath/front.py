"""``FastPath``: what ``ModuleOracle`` asks of the fast path, in learner-output terms.

It answers two requests on a data batch x: the learner's outputs at a few thetas (``outputs``)
and at ``theta + mu e_i`` for many coordinates i (``coordinate_outputs``, grouped per chunk).

- **Feature reuse.** The base forward at theta (every traced node's value) is kept as
  ``Features`` until theta or the batch change; so are the helper values derived from it on
  first use (conv input patches, channel-major layouts, normalised inputs).
- **Chunk sizing.** Per parameter tensor, chunks are sized so that the largest stacked value of
  one chunk takes about ``working_set`` bytes (``default_working_set``).
- **Generic path.** Learners the tracer cannot follow, ``fast=False``, or a failed self-check
  use ``torch.func.functional_call`` + ``vmap`` over perturbed parameter copies
  (``fallback_reason`` says why).
- **Self-check.** Before its first coordinate request, the fast path is compared with the
  generic path on a few coordinates (learner outputs only, so no black-box queries); a mismatch
  or an error switches to the generic path with a warning. Slower, never silently wrong.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call, vmap

from deepzero_oracle.allocator import freed_memory_retained
from deepzero_oracle.fastpath.delta import channel_major, conv_patches
from deepzero_oracle.fastpath.fused import pool_layout, window_major
from deepzero_oracle.fastpath.graph import GraphForward, UnsupportedLearner
from deepzero_oracle.fastpath.layers import normalise, repeat_rows, updates_running_stats
from deepzero_oracle.theta import ParamSlot, unflatten


def default_working_set() -> float:
    """Bytes for the largest stacked value of one query chunk: the last-level cache where the
    OS reports it (Linux; else 32 MB) when freed memory is retained (``retain_freed_memory``,
    which the command line calls), a quarter of it otherwise.

    Each chunk has a fixed cost (Python and operator dispatch, about a millisecond), so larger
    chunks are faster, as long as their memory is reused; without retained memory every large
    block comes as fresh pages from the OS, whose faults grow with the chunk.
    """
    try:
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        l3 = 0
    cache = l3 if l3 and l3 > 0 else 32e6
    return float(cache if freed_memory_retained() else cache / 4)


class Features:
    """The base forward of one batch ``x`` at one theta: every traced node's value, and the
    helper values derived from them, each made on first use.

    Helper kinds (``helper(node, kind)``): ``"patches"``, the input patches of the Conv2d
    called at ``node``, channel-major ``[C*kh*kw, B, L]``; ``"output_cm"``, the node's value
    channel-major ``[C, B, ...]``; ``"pool_layout"``, a conv output at the positions a 2x2
    max-pool reads, ``[B, 4, H//2, W//2, O]``; ``"output_windows"`` and ``"patch_windows"``, a
    conv's output and input patches there, window-major ``[O or C*kh*kw, 4, B, H//2, W//2]``
    (``fused.window_major``); ``"xhat"``, the normalised input of the
    BatchNorm called at ``node`` (shape of its input).
    """

    def __init__(self, x: torch.Tensor, theta: torch.Tensor, values: dict, modules: dict[str, nn.Module]):
        self.x, self.version, self.theta = x, x._version, theta.clone()
        self.values = values  # {fx node: value}
        self.modules = modules
        self.helpers: dict = {}

    def matches(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> bool:
        """Whether these are the features of batch ``x`` (unchanged since) at ``theta`` (any
        theta if None)."""
        return (self.x is x and self.version == x._version
                and (theta is None or torch.equal(self.theta, theta)))

    def helper(self, node: fx.Node, kind: str) -> torch.Tensor:
        """The helper value ``kind`` of ``node`` (see the class), made once."""
        key = (node, kind)
        if key not in self.helpers:
            self.helpers[key] = self._make(node, kind)
        return self.helpers[key]

    def _make(self, node, kind):
        if kind == "output_cm":
            return channel_major(self.values[node])
        if kind == "pool_layout":
            return pool_layout(self.values[node])
        if kind == "output_windows":
            return window_major(self.values[node].transpose(0, 1))
        module, source = self.modules[node.target], self.values[node.args[0]]
        if kind == "patches":
            return conv_patches(module, source, channel_major=True)
        if kind == "patch_windows":
            out = self.values[node]
            patches = self.helpers.get((node, "patches"))
            if patches is None:
                patches = conv_patches(module, source, channel_major=True)
            return window_major(patches.view(len(patches), *out.shape[:1], *out.shape[2:]))
        if kind == "xhat":
            return normalise(module, source)
        raise KeyError(f"no helper value of kind {kind!r}")


class FastPath:
    """Learner outputs for many perturbed thetas, by the structure-aware fast path where the
    learner allows it, else by the generic path.

    Args:
        learner: the white-box ``nn.Module``; theta is its trainable parameters.
        slots: their layout in theta (``deepzero_oracle.theta.parameter_slots``).
        fast: use the fast path when possible (else always the generic path).
        one_weight_delta, delta_propagation, fused_kernels: the fast path's further savings
            (see ``deepzero_oracle.fastpath``); results are the same either way, to rounding.
        working_set: target bytes for the largest stacked value of one chunk (None:
            ``default_working_set()`` at each query).
    Pickling drops the features (they are per theta and rebuilt on demand) and the traced graph
    (traced again from the learner on load).
    """

    def __init__(self, learner: nn.Module, slots: list[ParamSlot], *, fast: bool = True,
                 one_weight_delta: bool = True, delta_propagation: bool = True,
                 fused_kernels: bool = True, working_set: float | None = None):
        self.learner, self.slots = learner, slots
        self.offsets = torch.tensor([s.offset for s in slots])
        self.one_weight_delta, self.delta_propagation = one_weight_delta, delta_propagation
        self.fused_kernels = fused_kernels
        self.working_set = working_set
        self.graph: GraphForward | None = None
        self.fallback_reason: str | None = "disabled (fast=False)"
        if fast:
            try:
                self.graph = GraphForward(learner)
                self.fallback_reason = None
            except UnsupportedLearner as exc:
                self.fallback_reason = str(exc)
        self.checked = False  # the self-check ran
        self._features: Features | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_features"] = None  # activations keyed by fx nodes: rebuilt on demand
        # traced again on load: a traced GraphModule does not pickle when the learner's forward
        # has string annotations (``from __future__ import annotations``)
        state["graph"] = self.graph is not None
        return state

    def __setstate__(self, state):
        traced = state.pop("graph")
        self.__dict__.update(state, graph=None)
        if traced:
            self.graph = GraphForward(self.learner)

    @property
    def active(self) -> bool:
        """Whether the fast path answers (else the generic path does)."""
        return self.graph is not None

    # -- requests -------------------------------------------------------------------------------

    def outputs(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        """Learner outputs on ``x [B, ...]`` at each row of ``thetas [P, dim]``: ``[P*B, ...]``."""
        if self.graph is None:
            return self.functional_outputs(x, thetas)
        if len(thetas) == 1:
            return self.features(x, thetas[0]).values[self.graph.output_node]
        # every parameter is batched, so run() reads from the features only values that do not
        # depend on theta: the features of this batch at any theta serve (no extra base forward)
        features = self._features
        if features is None or not features.matches(x):
            features = self.features(x, thetas[0])
        return self.graph.run(features, len(thetas), {}, batched=unflatten(thetas, self.slots))

    def coordinate_outputs(self, x: torch.Tensor, theta: torch.Tensor, coords: torch.Tensor, mu: float,
                           max_batch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(where, outputs)``: positions in ``coords [C]`` and the learner outputs on
        ``x [B, ...]`` at ``theta + mu e_i`` for the coordinates there, ``[len(where)*B, ...]``.

        The fast path answers one parameter tensor and one chunk at a time (``max_batch``
        copies, or memory-sized chunks if None); the generic path answers all at once.
        """
        if self.graph is not None and not self.checked:
            self._self_check(x, theta, mu, max_batch)
        if self.graph is None:
            yield torch.arange(len(coords), device=coords.device), self.functional_outputs(x, _moved_copies(theta, coords, mu))
            return
        features = self.features(x, theta)
        params = unflatten(theta, self.slots)
        slot_of = torch.searchsorted(self.offsets.to(coords.device), coords, right=True) - 1
        for k in slot_of.unique().tolist():
            s = self.slots[k]
            positions = (slot_of == k).nonzero().reshape(-1)
            size = max_batch or self.graph.copies_within(
                self.chunk_bytes(), features.values, s.module,
                propagate=self.delta_propagation and self.one_weight_delta, fuse=self.fused_kernels)
            for where in positions.split(size):
                yield where, self._slot_outputs(features, params, s, coords[where] - s.offset, mu)

    def dense_chunk(self, x: torch.Tensor, theta: torch.Tensor) -> int | None:
        """Queries per chunk when every parameter moves (dense requests near ``theta`` on
        ``x``); None when the generic path answers (no preference)."""
        if self.graph is None:
            return None
        if any(isinstance(self.graph.modules[s.module], nn.Conv2d) for s in self.slots):
            # per-copy (grouped) convolution kernels are slower per copy on CPU than one
            # plain forward per query
            return 1
        return self.graph.copies_within(self.chunk_bytes(), self.features(x, theta).values, None)

    def chunk_bytes(self) -> float:
        """The budget for the largest stacked value of one chunk: ``working_set``, or
        ``default_working_set()`` as the process stands now."""
        return self.working_set or default_working_set()

    def features(self, x: torch.Tensor, theta: torch.Tensor) -> Features:
        """The base forward on ``x`` at ``theta`` (kept until theta or the batch change)."""
        if self._features is None or not self._features.matches(x, theta):
            with torch.no_grad():
                values = self.graph.base(x, unflatten(theta, self.slots))
            self._features = Features(x, theta, values, self.graph.modules)
        return self._features

    # -- the generic path -------------------------------------------------------------------------

    def functional_outputs(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        """Learner outputs on ``x`` at each row of ``thetas [P, dim]`` by the generic path
        (``vmap`` over parameter copies): ``[P*B, ...]``, without gradients."""
        P = len(thetas)
        params = unflatten(thetas, self.slots)
        with torch.no_grad():
            if updates_running_stats(self.learner):
                # a vmapped in-place running-stat update is impossible: one copy at a time
                outs = torch.stack([self.forward(x, {k: v[i] for k, v in params.items()}) for i in range(P)])
            else:
                outs = vmap(lambda p: self.forward(x, p), randomness="different")(params)
        return outs.reshape(P * outs.shape[1], *outs.shape[2:])

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``learner(x)`` with ``params`` ``{name: tensor}`` in place of its parameters,
        differentiable; buffers are copied, so running statistics of the learner never move."""
        buffers = {k: v.clone() for k, v in self.learner.named_buffers()}
        return functional_call(self.learner, (params, buffers), (x,), strict=False)

    # -- the fast path ----------------------------------------------------------------------------

    def _slot_outputs(self, features, params, s, local, mu):
        """Outputs ``[P*B, ...]`` with entry ``local [P]`` of parameter ``s`` moved by mu."""
        graph, P = self.graph, len(local)
        sites = graph.call_sites.get(s.module, [])
        if not sites:  # parameter unused by forward: the loss does not move
            return repeat_rows(features.values[graph.output_node], P)
        if len(sites) > 1 or not self.one_weight_delta:
            # a module called more than once (or the ablation): per-copy parameters
            return graph.run(features, P, params, batched={s.name: _moved_copies(params[s.name], local, mu)})
        fuse = self.fused_kernels and self.delta_propagation
        with _label("moved weight"):
            overrides = graph.moved_weight(sites[0], s.attr, local, mu, features, fuse)
        return graph.run(features, P, params, overrides=overrides, propagate=self.delta_propagation,
                         fuse=self.fused_kernels)

    def _self_check(self, x, theta, mu, max_batch):
        """Compare the fast path with the generic one on the first and last coordinate of every
        parameter tensor, once; on a mismatch or an error switch to the generic path, warning."""
        self.checked = True
        probe = torch.tensor(sorted({c for s in self.slots for c in (s.offset, s.stop - 1)}), device=theta.device)
        reason = None
        try:
            B = len(x)
            fast = None
            for where, out in self.coordinate_outputs(x, theta, probe, mu, max_batch):
                if fast is None:
                    fast = torch.empty(len(probe), B, *out.shape[1:], dtype=out.dtype, device=out.device)
                fast[where] = out.reshape(len(where), B, *out.shape[1:])
            fast = fast.reshape(len(probe) * B, *fast.shape[2:])
            slow = self.functional_outputs(x, _moved_copies(theta, probe, mu))
            tol = 1e-9 if theta.dtype == torch.float64 else 1e-4
            scale = slow.abs().max().clamp_min(1.0)
            if fast.shape != slow.shape or (fast - slow).abs().max() > tol * scale:
                reason = "its outputs differ from the generic path"
        except Exception as exc:  # any structural surprise: the generic path is always right
            reason = f"it raised {type(exc).__name__}: {exc}"
        if reason:
            self.graph = None
            self.fallback_reason = f"fast path disabled because {reason}"
            warnings.warn(f"ModuleOracle: {self.fallback_reason}; using the generic path", stacklevel=4)


def _label(kind: str):
    """A ``torch.profiler`` label while a profiler runs (see ``GraphForward.label``)."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return contextlib.nullcontext()
    return torch.profiler.record_function("fastpath: " + kind)


def _moved_copies(t: torch.Tensor, local: torch.Tensor, mu: float) -> torch.Tensor:
    """``[P, *t.shape]`` copies of ``t``, copy p with flat entry ``local[p]`` moved by mu."""
    value = t.reshape(-1).repeat(len(local), 1)
    value[torch.arange(len(local), device=local.device), local] += mu
    return value.reshape(len(local), *t.shape)


__all__ = ["FastPath", "Features", "default_working_set"]
