"""The traced forward: a learner as a ``torch.fx`` graph, evaluated with explicit parameters.

The learner is traced once. A *base* forward at theta yields every node's value, which the
caller keeps (feature reuse, ``front.Features``). Perturbing one weight of a Linear / Conv2d /
BatchNorm then changes one unit or channel of that module's output by a known slice (one-weight
delta, ``moved_weight``), so only the nodes downstream of it are recomputed (``run``): as a
Delta while a layer keeps the change in its block (delta propagation), then on all P
perturbations stacked as ``P * B`` rows (the stacked suffix). A Delta entering a Conv2d that a
2x2 max-pool (and maybe a ReLU) follows takes the fused kernel (``fused``) where it pays.
``copies_within`` sizes the stack so that its largest value fits a memory budget.

Values flowing through the stacked part of the graph have ``P * B`` leading rows, perturbation
major. Shared values (unperturbed, ``B`` rows) that meet stacked ones are repeated P times.
Two things would otherwise mix perturbations and are handled explicitly: BatchNorm in train
mode normalises each perturbation's B rows on their own, and a module whose parameters vary
per perturbation runs as P independent copies (batched matmul / grouped conv).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle.fastpath.delta import (ADD_FUNCTIONS, Delta, add_copies, is_plain_2x2_max_pool, max_pool_2x2,
                                            one_weight_delta, propagate_call, propagate_module)
from deepzero_oracle.fastpath.fused import (conv2d_max_pool, fusable, fusable_moved_weight, fusable_norm,
                                            moved_weight_max_pool, norm_act)
from deepzero_oracle.fastpath.layers import LAYERS, NORMS, layer, repeat_rows
from deepzero_oracle.theta import parameter_slots


class UnsupportedLearner(TypeError):
    """The learner's structure cannot use the fast path (the caller falls back)."""


class GraphForward:
    """A traced learner evaluated with explicit parameters, shared or per-perturbation.

    ``run`` and ``moved_weight`` take the base forward as ``features``: an object with
    ``values`` (``{node: value}``, from ``base``) and ``helper(node, kind)`` (a value derived
    from it, made once: ``"patches"``, ``"output_cm"``, ``"pool_layout"``, ``"patch_windows"``,
    ``"output_windows"``, ``"xhat"``; see ``front.Features``).

    Args:
        learner: the white-box ``nn.Module``; every module holding trainable parameters must be
            a Linear, Conv2d (zero padding) or BatchNorm1d/2d, reached only through calls.
    Raises:
        UnsupportedLearner: tracing failed or a module kind has no fast rule.
    """

    def __init__(self, learner: nn.Module):
        try:
            self.gm = fx.symbolic_trace(learner)
        except Exception as exc:  # data-dependent control flow and the like
            raise UnsupportedLearner(f"torch.fx could not trace the learner: {exc}") from exc
        self.slots = parameter_slots(learner)
        self.modules = {name: _out_of_place(m) for name, m in learner.named_modules()}
        _rewrite_graph(self.gm, self.modules)
        self.nodes = list(self.gm.graph.nodes)
        self.call_sites: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "get_attr":
                raise UnsupportedLearner(f"the learner reads attribute {node.target!r} directly")
            if node.op == "call_module":
                self.call_sites.setdefault(node.target, []).append(node)
        for s in self.slots:
            m = self.modules[s.module]
            if not isinstance(m, LAYERS):
                raise UnsupportedLearner(f"no fast rule for {type(m).__name__} ({s.name})")
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise UnsupportedLearner(f"Conv2d {s.module} uses padding={m.padding!r}, "
                                         f"padding_mode={m.padding_mode!r}")
        for target in self.call_sites:
            m = self.modules[target]
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, NORMS):
                raise UnsupportedLearner(f"no fast rule for {type(m).__name__} ({target})")
        # nodes whose value carries the data batch dimension (derived from an input)
        self.data_nodes: set = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(n in self.data_nodes for n in node.all_input_nodes):
                self.data_nodes.add(node)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        # Conv2d calls whose only user is a plain 2x2 max-pool (maybe then a ReLU, its only
        # user): a Delta entering one is convolved, pooled (and rectified) by one fused kernel
        # (fastpath.fused), whose value is the last node's
        self.pool_after: dict[fx.Node, fx.Node] = {}
        self.relu_after: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            m = self.modules.get(node.target) if node.op == "call_module" else None
            if (isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and m.padding_mode == "zeros"
                    and len(node.args) == 1 and not node.kwargs and len(node.users) == 1):
                (user,) = node.users
                if (user.op == "call_module" and is_plain_2x2_max_pool(self.modules[user.target])
                        and user.args == (node,) and not user.kwargs):
                    self.pool_after[node] = user
                    relu = next(iter(user.users)) if len(user.users) == 1 else None
                    if relu is not None and _is_relu(relu, self.modules) and relu.args == (user,) and not relu.kwargs:
                        self.relu_after[node] = relu
        # Flatten calls whose only user is a Linear: a channels-last stacked input is not copied
        # to the contiguous layout; the Linear reads it as is, with its weight permuted to match
        self.flat_linear: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            users = list(node.users)
            if (_is_flatten(node, self.modules) and len(users) == 1 and users[0].op == "call_module"
                    and isinstance(self.modules[users[0].target], nn.Linear) and users[0].args == (node,)
                    and not users[0].kwargs):
                self.flat_linear[node] = users[0]
        # ... whose fused value only convolutions, or a flatten into a Linear, read: the kernel
        # leaves it channels-last
        self.feeds_convs = {node for node, user in self.pool_after.items()
                            if all(u in self.flat_linear or u.op == "call_module"
                                   and isinstance(self.modules[u.target], nn.Conv2d)
                                   for u in self.relu_after.get(node, user).users)}
        # BatchNorm2d calls whose only user is a ReLU, or a residual sum whose only user is a
        # ReLU: on stacked copies the three run as one fused kernel (fastpath.fused.norm_act),
        # whose value is the ReLU's. {norm node: (sum node or None, relu node)}
        self.norm_then: dict[fx.Node, tuple] = {}
        for node in self.nodes:
            m = self.modules.get(node.target) if node.op == "call_module" else None
            if not (isinstance(m, nn.BatchNorm2d) and len(node.args) == 1 and not node.kwargs
                    and len(node.users) == 1):
                continue
            (user,) = node.users
            add = None
            if _is_plain_sum(user) and node in user.args and user.args[0] is not user.args[1]:
                add = user
                if len(add.users) != 1:
                    continue
                (user,) = add.users
            if _is_relu(user, self.modules) and len(user.args) == 1 and not user.kwargs:
                self.norm_then[node] = (add, user)
        # after which node each value is no longer needed (memory in stacked runs)
        last_use = {n: max((self.position[u] for u in n.users), default=self.position[n])
                    for n in self.nodes}
        self.freed_after: dict[int, list] = {}
        for n, i in last_use.items():
            self.freed_after.setdefault(i, []).append(n)
        self.output_node = next(n for n in self.nodes if n.op == "output")

    def copies_within(self, budget_bytes: float, values: dict, module: str | None, *,
                      propagate: bool = True, fuse: bool = True) -> int:
        """How many perturbations of ``module``'s parameters (of all parameters if None) to
        stack so that the largest stacked value takes about ``budget_bytes``.

        Per copy, values carrying a Delta (from the module up to the next Linear/Conv2d) hold
        one channel or unit; from there on they are whole. A Conv2d whose Delta input goes
        through the fused kernel never exists in full, only its pooled output.
        """
        if module is None:
            counted = {n: 1 for n in self.nodes}
        else:
            sites = self.call_sites.get(module, [])
            if not sites:
                return 4096
            start = self.position[sites[0]]
            dense = next((n for n in self.nodes[start + 1:] if n.op == "call_module"
                          and isinstance(self.modules[n.target], (nn.Linear, nn.Conv2d))), None)
            if len(sites) > 1 or not propagate or dense is None:
                dense = sites[0]
            # per node: the share of its full size one copy holds (None: not materialised)
            counted = {}
            for n in self.nodes[start:]:
                whole = self.position[n] >= self.position[dense]
                value = values.get(n)
                counted[n] = 1 if whole else (1 / value.shape[1] if isinstance(value, torch.Tensor)
                                              and value.dim() > 1 else 1)
            if fuse and propagate and dense is not sites[0] and self._fuses_pool(dense, values, 1):
                counted[dense] = None
                if dense in self.relu_after:
                    counted[self.pool_after[dense]] = None
        largest = max((values[n].numel() * values[n].element_size() * share for n, share in counted.items()
                       if share is not None and isinstance(values.get(n), torch.Tensor)), default=1)
        return int(min(4096, max(1, budget_bytes // largest)))

    # -- evaluation ---------------------------------------------------------------------------

    def base(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> dict:
        """Run the whole graph once on ``x [B, ...]``; returns every node's value ``{node: value}``."""
        env: dict = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                env[node] = env[node.args[0]]
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = self._apply(node, args, kwargs, 1, params, {})
        return env

    def run(self, features, P: int, params: dict, *, overrides=None, batched=None,
            propagate: bool = True, fuse: bool = True) -> torch.Tensor:
        """Re-run only what changes; returns the output stacked as ``[P*B, ...]``.

        Args:
            features: the base forward (see the class), reused wherever nothing changed.
            P: number of perturbations.
            params: shared parameters ``{name: tensor}`` (theta's values).
            overrides: ``{node: value}`` already computed for the P copies: a ``Delta`` or a
                stacked ``[P*B, ...]`` tensor (the one-weight delta).
            batched: ``{name: [P, *shape]}`` parameters that differ per perturbation.
            propagate: carry Deltas through layers that keep them (else densify at once).
            fuse: a Delta entering a Conv2d + 2x2 max-pool takes the fused kernel when it pays.
        """
        overrides, batched = overrides or {}, batched or {}
        values = features.values
        batched_modules = {name.rpartition(".")[0] for name in batched}
        env = dict(overrides)
        start = min(
            [self.position[n] for n in overrides]
            + [self.position[n] for m in batched_modules for n in self.call_sites.get(m, [])]
            + [len(self.nodes) - 1]
        )
        out = self.output_node.args[0]
        for i, node in enumerate(self.nodes[start:], start):
            if node.op == "output":
                break
            if node not in env and (
                any(n in env for n in node.all_input_nodes)
                or (node.op == "call_module" and node.target in batched_modules)
            ):
                with self.label(node, env, values):
                    pooled = self._conv_pool(node, env, features, params, batched) if propagate and fuse else None
                    if pooled is not None:
                        env[self.relu_after.get(node, self.pool_after[node])] = pooled
                    elif fuse and self._defer_norm(node, env, P, batched):
                        env[node] = _Norm(env[node.args[0]])
                    elif fuse and self._crops(node, env, batched):
                        env[node] = self._cropped_conv(node, env[node.args[0]], params)
                    elif fuse and self._defer_flatten(node, env, batched):
                        env[node] = _ChannelsLastRows(env[node.args[0]])
                    elif any(isinstance(env.get(n), _ChannelsLastRows) for n in node.all_input_nodes):
                        env[node] = self._linear_of_channels_last(node, env[node.args[0]].x, params)
                    elif any(isinstance(env.get(n), _Norm) for n in node.all_input_nodes):
                        self._finish_norm(node, env, values, P, params, batched, propagate)
                    else:
                        env[node] = self._eval(node, env, values, P, params, batched, propagate)
            for n in self.freed_after.get(i, ()):  # keep memory to what is still needed
                if n is not out:
                    env.pop(n, None)
        if out not in env:  # nothing the perturbation touched reaches the output
            return repeat_rows(values[out], P)
        value = env[out]
        return value.dense(values[out]) if isinstance(value, Delta) else value

    def label(self, node: fx.Node, env: dict, values: dict):
        """A ``torch.profiler`` label for the work of ``node`` (its layer kind, see
        ``layer_kind``) while a profiler runs; otherwise a no-op context."""
        if not torch.autograd.profiler._is_profiler_enabled:
            return contextlib.nullcontext()
        if any(isinstance(env.get(n), _Norm) for n in node.all_input_nodes):
            kind = "batchnorm + relu" if _is_relu(node, self.modules) else "batchnorm + add + relu"
        else:
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            kind = self.layer_kind(node, values, isinstance(env.get(source), Delta))
        return torch.profiler.record_function("fastpath: " + kind)

    def layer_kind(self, node: fx.Node, values: dict, delta_input: bool = False) -> str:
        """The kind of work ``node`` does, for profiles: convolutions by input channels and
        image size (``"(block)"`` when a Delta enters it: only its changed channels convolve),
        BatchNorm, ReLU, residual add, the linear head, and glue (padding, slicing, pooling,
        flattening)."""
        suffix = " (block)" if delta_input else ""
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d):
                x = values.get(node.args[0])
                size = f" {x.shape[-2]}x{x.shape[-1]}" if isinstance(x, torch.Tensor) and x.dim() == 4 else ""
                pooled = " + pool" if node in self.pool_after and delta_input else ""
                return f"conv {m.in_channels}->{m.out_channels}{size}{pooled}{suffix}"
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return "batchnorm" + suffix
            if isinstance(m, nn.Linear):
                return "linear" + suffix
            if _is_relu(node, self.modules):
                return "relu" + suffix
        elif self._is_sum(node, values):
            return "residual add"
        elif _is_relu(node, self.modules):
            return "relu" + suffix
        return "glue" + suffix

    def _crops(self, node, env, batched) -> bool:
        """Whether the Conv2d called at ``node`` computes only what the 2x2 max-pool after it
        reads: its input is stacked, its parameters shared, and its output has an odd side (the
        pool drops the last row or column)."""
        if node not in self.pool_after or _differs_per_copy(node.target, batched):
            return False
        x, m = env.get(node.args[0]), self.modules[node.target]
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return False
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
        ho = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return min(ho, wo) >= 2 and (ho % 2 == 1 or wo % 2 == 1)

    def _cropped_conv(self, node, x: torch.Tensor, params: dict) -> torch.Tensor:
        """The Conv2d called at ``node`` on stacked ``x [N, C, H, W]``, only at the output rows
        and columns a 2x2 max-pool reads (an even number of each): the padded input is cut to
        what they need, ``[N, O, 2*(Ho//2), 2*(Wo//2)]``."""
        m = self.modules[node.target]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
        H, W = x.shape[-2:]
        ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        need_h = (ho // 2 * 2 - 1) * sh + dh * (kh - 1) + 1  # padded rows the kept outputs read
        need_w = (wo // 2 * 2 - 1) * sw + dw * (kw - 1) + 1
        x = x.contiguous(memory_format=torch.channels_last)
        xp = F.pad(x, (pw, need_w - pw - W, ph, need_h - ph - H))  # a negative pad cuts
        weight = params.get(f"{node.target}.weight", m.weight)
        bias = params.get(f"{node.target}.bias", m.bias)
        return F.conv2d(xp, weight, bias, m.stride, 0, m.dilation, m.groups)

    def _defer_flatten(self, node, env, batched) -> bool:
        """Whether the flatten called at ``node`` leaves its channels-last stacked input as it
        is for the Linear after it (``flat_linear``), whose parameters are shared."""
        x = env.get(node.args[0]) if node in self.flat_linear else None
        return (isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)
                and not _differs_per_copy(self.flat_linear[node].target, batched))

    def _linear_of_channels_last(self, node, x: torch.Tensor, params: dict) -> torch.Tensor:
        """The Linear called at ``node`` on ``flatten(x)`` for channels-last ``x [N, C, H, W]``:
        the rows read in (H, W, C) order, the weight's columns permuted to that order.
        Returns ``[N, out_features]``."""
        m = self.modules[node.target]
        weight = params.get(f"{node.target}.weight", m.weight)
        bias = params.get(f"{node.target}.bias", m.bias)
        N, C, H, W = x.shape
        weight = weight.reshape(-1, C, H, W).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        return F.linear(x.permute(0, 2, 3, 1).reshape(N, -1), weight, bias)

    def _defer_norm(self, node, env, P, batched) -> bool:
        """Whether the BatchNorm called at ``node`` waits for its ReLU (and the residual sum
        between) to run with them as one fused kernel: its input is stacked, its parameters are
        shared and the sizes pay."""
        x = env.get(node.args[0]) if node in self.norm_then else None
        return (isinstance(x, torch.Tensor) and not _differs_per_copy(node.target, batched)
                and fusable_norm(self.modules[node.target], x, P))

    def _finish_norm(self, node, env, values, P, params, batched, propagate):
        """Evaluate ``node``, which reads a deferred BatchNorm: its ReLU, or the residual sum
        before it, runs the fused kernel when it can (the value is the ReLU's); otherwise the
        BatchNorm is computed on its own first."""
        norm = next(n for n in node.all_input_nodes if isinstance(env.get(n), _Norm))
        add, relu = self.norm_then[norm]
        other = None
        if add is node:
            source = add.args[1] if add.args[0] is norm else add.args[0]
            other = env.get(source, values[source])  # unchanged: the base, shared by every copy
            if isinstance(other, _Norm):  # both operands are BatchNorms (shortcut B): one runs alone
                other = env[source] = self._apply(source, (other.x,), {}, P, params, batched, True)
        m = self.modules[norm.target]
        x = env[norm].x
        if not isinstance(other, Delta) and (other is None or other.shape[1:] == x.shape[1:]):
            out = norm_act(m, x, P, params.get(f"{norm.target}.weight", m.weight),
                           params.get(f"{norm.target}.bias", m.bias), other, m.training or m.running_mean is None)
            if out is not None:
                env[relu] = out
                return
        env[norm] = self._apply(norm, (x,), {}, P, params, batched, True)
        env[node] = self._eval(node, env, values, P, params, batched, propagate)

    def _eval(self, node, env, values, P, params, batched, propagate=True):
        """Value of ``node`` for the P copies, given the copies' values ``env`` of its inputs."""
        if self._is_sum(node, values):
            a, b = (env.get(n) for n in node.args)
            if not propagate:
                a, b = (v.dense(values[n]) if isinstance(v, Delta) else v for n, v in zip(node.args, (a, b)))
            result = add_copies(a, b, values[node.args[0]], values[node.args[1]])
            if result is not None:
                return result
        if propagate and node.args and isinstance(env.get(node.args[0]), Delta):
            result = self._propagate(node, env, values, params, batched)
            if result is not None:
                return result

        def value(n):
            if n in env:
                v = env[n]
                return v.dense(values[n]) if isinstance(v, Delta) else v
            v = values[n]
            # a shared activation meeting stacked ones is repeated per perturbation
            if env and isinstance(v, torch.Tensor) and n in self.data_nodes:
                return repeat_rows(v, P)
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        stacked = any(n in env for n in node.all_input_nodes)
        return self._apply(node, args, kwargs, P if stacked else 1, params, batched, stacked)

    @staticmethod
    def _is_sum(node: fx.Node, values: dict) -> bool:
        """``a + b`` of two traced tensors (a residual connection), nothing else."""
        return ((node.op == "call_function" and node.target in ADD_FUNCTIONS
                 or node.op == "call_method" and node.target == "add")
                and len(node.args) == 2 and not node.kwargs
                and all(isinstance(n, fx.Node) and isinstance(values.get(n), torch.Tensor) for n in node.args))

    def moved_weight(self, node: fx.Node, attr: str, local: torch.Tensor, mu: float, features,
                     fuse: bool = True) -> dict:
        """Overrides for ``run`` when one weight of the module called at ``node`` moves by mu, for
        each flat index in ``local [P]``: ``{node: one_weight_delta(...)}``, or, for a Conv2d
        weight that a 2x2 max-pool (and ReLU) follows, the pooled Delta from the fused kernel."""
        m, values = self.modules[node.target], features.values

        def helper(kind):
            return features.helper(node, kind)

        if fuse and node in self.pool_after and fusable_moved_weight(m, attr, values[node].shape):
            relu = node in self.relu_after
            pooled = moved_weight_max_pool(m, local, mu, helper("patch_windows"), helper("output_windows"),
                                           relu)
            if pooled is not None:
                channel = local // m.weight[0].numel()
                return {self.relu_after[node] if relu else self.pool_after[node]: Delta(channel, *pooled)}
        return {node: one_weight_delta(m, attr, local, mu, values[node.args[0]], values[node], helper)}

    def _fuses_pool(self, node: fx.Node, values: dict, k: int) -> bool:
        """Whether a Delta of k channels entering the Conv2d called at ``node`` goes through the
        fused conv + 2x2 max-pool kernel (the pattern holds and the work per copy pays)."""
        x = values.get(node.args[0]) if node.args else None
        return (node in self.pool_after and isinstance(x, torch.Tensor) and x.dim() == 4
                and fusable(self.modules[node.target], x.shape[0], values[node].shape, k))

    def _conv_pool(self, node, env, features, params, batched):
        """The pooled output of a Conv2d + 2x2 max-pool for a Delta input, from the fused
        kernel; None when the pattern, the sizes or the compiler rule it out."""
        source = node.args[0] if node.args else None
        delta, values = env.get(source), features.values
        if (not isinstance(delta, Delta) or _differs_per_copy(node.target, batched)
                or not self._fuses_pool(node, values, delta.values.shape[2])):
            return None
        m, x_base = self.modules[node.target], values[source]
        weight = params.get(f"{node.target}.weight", m.weight)
        change = delta.difference(x_base, features.helper(source, "output_cm"))
        base4 = features.helper(node, "pool_layout")
        return conv2d_max_pool(m, change, delta.index, weight, base4, relu=node in self.relu_after,
                               channels_last=node in self.feeds_convs)

    def _propagate(self, node, env, values, params, batched):
        """The one Delta input of ``node`` carried through it, or None when no rule keeps it."""
        source = node.args[0]
        if any(n in env for n in node.all_input_nodes if n is not source):
            return None  # another changed value joins in
        delta = env[source]
        extra_args = fx.node.map_arg(node.args[1:], lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        if node.op == "call_module":
            if _differs_per_copy(node.target, batched):
                return None
            module = self.modules[node.target]
            weight = params.get(f"{node.target}.weight", getattr(module, "weight", None))
            bias = params.get(f"{node.target}.bias", getattr(module, "bias", None))
            return propagate_module(module, delta, values[source], values[node], extra_args, kwargs,
                                    weight, bias)
        if node.op in ("call_function", "call_method"):
            return propagate_call(node.target, delta, extra_args, kwargs, node.op == "call_method")
        return None

    def _apply(self, node, args, kwargs, P, params, batched, stacked=False):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self._module(node.target, self.modules[node.target], args, kwargs, P, params, batched, stacked)
        raise UnsupportedLearner(f"unexpected graph node {node.op} {node.target}")

    def _module(self, name, module, args, kwargs, P, params, batched, stacked=False):
        """Apply one module; ``stacked``: ``args[0]`` holds ``P*B`` stacked rows (P copies)."""
        if not isinstance(module, LAYERS):
            if is_plain_2x2_max_pool(module) and len(args) == 1 and not kwargs and args[0].dim() == 4:
                return max_pool_2x2(args[0])
            return module(*args, **kwargs)
        x = args[0]
        w = batched.get(f"{name}.weight", params.get(f"{name}.weight", module.weight))
        b = batched.get(f"{name}.bias", params.get(f"{name}.bias", module.bias))
        per_copy = f"{name}.weight" in batched or f"{name}.bias" in batched
        if per_copy and P == 1:  # shared input, per-copy parameters
            P = next(t.shape[0] for k, t in batched.items() if k.startswith(f"{name}."))
            x = repeat_rows(x, P)
        return layer(module, x, w, b, P, per_copy, stacked)


def _out_of_place(m: nn.Module) -> nn.Module:
    """``m``, or a copy of it that does not overwrite its input: the base forward's values are
    cached and reused, so an in-place ReLU would corrupt them."""
    if getattr(m, "inplace", False) is True and next(m.parameters(), None) is None:
        m = copy.copy(m)
        m.inplace = False
    return m


class _Norm:
    """A BatchNorm's stacked input ``x``, waiting for the ReLU after it (``GraphForward.norm_then``)."""

    def __init__(self, x: torch.Tensor):
        self.x = x


class _ChannelsLastRows:
    """A flatten's channels-last stacked input ``x``, waiting for the Linear after it
    (``GraphForward.flat_linear``)."""

    def __init__(self, x: torch.Tensor):
        self.x = x


def _differs_per_copy(module: str, batched: dict) -> bool:
    """Whether the module called ``module`` has a parameter in ``batched`` (one value per copy)."""
    return any(name.rpartition(".")[0] == module for name in batched)


def _is_flatten(node: fx.Node, modules: dict) -> bool:
    """``flatten`` from dim 1 to the last: ``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and len(node.args) == 1
    if (node.op == "call_function" and node.target is torch.flatten
            or node.op == "call_method" and node.target == "flatten"):
        return tuple(node.args[1:]) == (1,) and not node.kwargs and len(node.args) == 2
    return False


def _is_plain_sum(node: fx.Node) -> bool:
    """``a + b`` of two graph values, nothing else (no alpha, no third operand)."""
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS
             or node.op == "call_method" and node.target == "add")
            and len(node.args) == 2 and not node.kwargs and all(isinstance(n, fx.Node) for n in node.args))


_RELUS = {F.relu, torch.relu}


def _is_relu(node: fx.Node, modules: dict) -> bool:
    return ((node.op == "call_module" and type(modules[node.target]) is nn.ReLU)
            or (node.op == "call_function" and node.target in _RELUS and len(node.args) == 1)
            or (node.op == "call_method" and node.target == "relu" and len(node.args) == 1))


def _rewrite_graph(gm: fx.GraphModule, modules: dict) -> None:
    """Exact rewrites that save work on every stacked run (values are unchanged bit for bit):
    functional in-place flags off, and ReLU -> MaxPool2d swapped to MaxPool2d -> ReLU (max is
    monotone, so relu(max(a, b)) == max(relu(a), relu(b)); the ReLU then touches 4x fewer values).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
    for relu in list(graph.nodes):
        if not _is_relu(relu, modules) or relu.kwargs or len(relu.users) != 1:
            continue
        (pool,) = relu.users
        if not (pool.op == "call_module" and isinstance(modules[pool.target], nn.MaxPool2d)
                and not modules[pool.target].return_indices and pool.args[:1] == (relu,)
                and relu not in pool.args[1:] and relu not in pool.kwargs.values()):
            continue
        source = relu.args[0]
        pool.replace_input_with(relu, source)  # pool(source)
        pool.replace_all_uses_with(relu)  # pool's users now read the ReLU
        relu.replace_input_with(source, pool)  # relu(pool(source))
        pool.append(relu)  # keep topological order
    graph.lint()
    gm.recompile()
