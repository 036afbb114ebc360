"""Structure-aware forward passes of a learner, for fast coordinate queries.

The learner is traced once with ``torch.fx``. A *base* forward at theta caches every node's
value (feature reuse). Perturbing one weight of a Linear / Conv2d / BatchNorm then changes one
unit or channel of that module's output by a known slice (one-weight delta), so only the nodes
downstream of it are recomputed, on all P perturbations stacked as ``P * B`` rows.

Values flowing through the stacked part of the graph have ``P * B`` leading rows, perturbation
major. Shared values (unperturbed, ``B`` rows) that meet stacked ones are repeated P times.
Two things would otherwise mix perturbations and are handled explicitly: BatchNorm in train
mode normalises each perturbation's B rows on their own, and a module whose parameters vary
per perturbation runs as P independent copies (batched matmul / grouped conv).
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SUPPORTED = (nn.Linear, nn.Conv2d) + _NORMS


class UnsupportedLearner(TypeError):
    """The learner's structure cannot use the fast path (the caller falls back)."""


@dataclass
class ParamSlot:
    """Where one trainable parameter lives in theta and in the traced graph."""

    name: str  # qualified name, as in learner.named_parameters()
    module: str  # qualified module name
    attr: str  # "weight" or "bias"
    offset: int  # first coordinate in theta
    shape: torch.Size
    numel: int


def parameter_slots(learner: nn.Module) -> list[ParamSlot]:
    """Trainable parameters of ``learner`` in theta order (``named_parameters`` order)."""
    slots, offset = [], 0
    for name, p in learner.named_parameters():
        if not p.requires_grad:
            continue
        module, _, attr = name.rpartition(".")
        slots.append(ParamSlot(name, module, attr, offset, p.shape, p.numel()))
        offset += p.numel()
    return slots


def unflatten(theta: torch.Tensor, slots: list[ParamSlot]) -> dict[str, torch.Tensor]:
    """Views of theta ``[..., dim]`` as parameters ``{name: [..., *shape]}``."""
    lead = theta.shape[:-1]
    return {
        s.name: theta[..., s.offset : s.offset + s.numel].reshape(*lead, *s.shape) for s in slots
    }


def _uses_batch_stats(m: nn.Module) -> bool:
    return m.training or m.running_mean is None


def repeat_rows(t: torch.Tensor, P: int) -> torch.Tensor:
    """Repeat a shared ``[B, ...]`` tensor into stacked ``[P*B, ...]`` rows."""
    return t.unsqueeze(0).expand(P, *t.shape).reshape(P * t.shape[0], *t.shape[1:])


class GraphForward:
    """A traced learner evaluated with explicit parameters, shared or per-perturbation.

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
        self.modules = dict(learner.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        self.call_sites: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "get_attr":
                raise UnsupportedLearner(f"the learner reads attribute {node.target!r} directly")
            if node.op == "call_module":
                self.call_sites.setdefault(node.target, []).append(node)
        for s in self.slots:
            m = self.modules[s.module]
            if not isinstance(m, SUPPORTED):
                raise UnsupportedLearner(f"no fast rule for {type(m).__name__} ({s.name})")
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                raise UnsupportedLearner(f"Conv2d {s.module} uses padding_mode={m.padding_mode!r}")
        for target in self.call_sites:
            m = self.modules[target]
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _NORMS):
                raise UnsupportedLearner(f"no fast rule for {type(m).__name__} ({target})")
        # nodes whose value carries the data batch dimension (derived from an input)
        self.data_nodes: set = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(n in self.data_nodes for n in node.all_input_nodes):
                self.data_nodes.add(node)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.output_node = next(n for n in self.nodes if n.op == "output")

    # -- evaluation ---------------------------------------------------------------------------

    def base(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> dict:
        """Run the whole graph once on ``x [B, ...]``; returns every node's value (the cache)."""
        env: dict = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                env[node] = env[node.args[0]]
            else:
                env[node] = self._eval(node, env, stacked=set(), P=1, params=params, batched={})
        return env

    def run(self, cache: dict, P: int, params: dict, *, overrides=None, batched=None) -> torch.Tensor:
        """Re-run only what changes; returns the output stacked as ``[P*B, ...]``.

        Args:
            cache: values of the base forward (``base``), reused wherever nothing changed.
            P: number of perturbations.
            params: shared parameters ``{name: tensor}`` (theta's values).
            overrides: ``{node: [P*B, ...]}`` stacked values already computed (one-weight delta).
            batched: ``{name: [P, *shape]}`` parameters that differ per perturbation.
        """
        overrides, batched = overrides or {}, batched or {}
        batched_modules = {name.rpartition(".")[0] for name in batched}
        env = dict(overrides)
        stacked = set(overrides)
        start = min(
            [self.position[n] for n in overrides]
            + [self.position[n] for m in batched_modules for n in self.call_sites.get(m, [])]
            + [len(self.nodes) - 1]
        )
        for node in self.nodes[start:]:
            if node in stacked:
                continue
            if node.op == "output":
                break
            inputs = node.all_input_nodes
            if any(n in stacked for n in inputs) or (
                node.op == "call_module" and node.target in batched_modules
            ):
                env[node] = self._eval(node, ChainMap(env, cache), stacked, P, params, batched)
                stacked.add(node)
        out = self.output_node.args[0]
        if out not in stacked:  # nothing the perturbation touched reaches the output
            return repeat_rows(cache[out], P)
        return env[out]

    def _eval(self, node, env, stacked, P, params, batched):
        def value(n):
            v = env[n]
            # a shared activation meeting stacked ones is repeated per perturbation
            if stacked and n not in stacked and isinstance(v, torch.Tensor) and n in self.data_nodes:
                return repeat_rows(v, P)
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            module = self.modules[node.target]
            is_stacked = bool(stacked) and any(n in stacked for n in node.all_input_nodes)
            return self._module(node.target, module, args, kwargs, P if is_stacked else 1, params, batched)
        raise UnsupportedLearner(f"unexpected graph node {node.op} {node.target}")

    def _module(self, name, module, args, kwargs, P, params, batched):
        """Apply one module; ``P > 1`` means ``args[0]`` holds ``P*B`` stacked rows."""
        if not isinstance(module, SUPPORTED):
            return module(*args, **kwargs)
        x = args[0]
        w = batched.get(f"{name}.weight", params.get(f"{name}.weight", module.weight))
        b = batched.get(f"{name}.bias", params.get(f"{name}.bias", module.bias))
        per_copy = f"{name}.weight" in batched or f"{name}.bias" in batched
        if per_copy and P == 1:  # shared input, per-copy parameters
            P = next(t.shape[0] for k, t in batched.items() if k.startswith(f"{name}."))
            x = repeat_rows(x, P)
        if isinstance(module, nn.Linear):
            return _linear(x, w, b, P, per_copy)
        if isinstance(module, nn.Conv2d):
            return _conv2d(module, x, w, b, P, per_copy)
        return _batch_norm(module, x, w, b, P, per_copy)


def _per_copy(t, P, shape):
    """A parameter as ``[P, *shape]``: batched ones already are, shared ones are expanded."""
    if t is None:
        return None
    return t if t.dim() == len(shape) + 1 else t.unsqueeze(0).expand(P, *shape)


def _linear(x, w, b, P, per_copy):
    if not per_copy:
        return F.linear(x, w, b)
    out_f, in_f = w.shape[-2:]
    w = _per_copy(w, P, (out_f, in_f))
    x3 = x.reshape(P, -1, in_f)
    y = torch.bmm(x3, w.transpose(1, 2))
    if b is not None:
        y = y + _per_copy(b, P, (out_f,)).unsqueeze(1)
    return y.reshape(*x.shape[:-1], out_f)


def _conv2d(m: nn.Conv2d, x, w, b, P, per_copy):
    if not per_copy:
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    # P copies as one grouped convolution: copies become channel groups
    shape = m.weight.shape
    w = _per_copy(w, P, shape)
    B = x.shape[0] // P
    xg = x.reshape(P, B, *x.shape[1:]).transpose(0, 1).reshape(B, P * x.shape[1], *x.shape[2:])
    bias = None if b is None else _per_copy(b, P, (shape[0],)).reshape(-1)
    y = F.conv2d(xg, w.reshape(P * shape[0], *shape[1:]), bias, m.stride, m.padding, m.dilation, m.groups * P)
    out_shape = (shape[0], *y.shape[2:])
    return y.reshape(B, P, *out_shape).transpose(0, 1).reshape(P * B, *out_shape)


def _batch_norm(m, x, w, b, P, per_copy):
    C = x.shape[1]
    if _uses_batch_stats(m):
        if P > 1:
            # each perturbation's B rows normalised on their own: copies become channels
            B = x.shape[0] // P
            xg = x.reshape(P, B, *x.shape[1:]).transpose(0, 1).reshape(B, P * C, *x.shape[2:])
            xhat = F.batch_norm(xg, None, None, None, None, True, 0.0, m.eps)
            xhat = xhat.reshape(B, P, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        else:
            xhat = F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
    else:
        xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    if w is None and b is None:
        return xhat
    view = (1, C) + (1,) * (x.dim() - 2)
    if not per_copy:
        y = xhat * w.reshape(view) if w is not None else xhat
        return y + b.reshape(view) if b is not None else y
    B = x.shape[0] // P
    y = xhat.reshape(P, B, *x.shape[1:])
    pview = (P, 1, C) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * _per_copy(w, P, (C,)).reshape(pview)
    if b is not None:
        y = y + _per_copy(b, P, (C,)).reshape(pview)
    return y.reshape(x.shape)


# -- one-weight delta ---------------------------------------------------------------------------


def normalised_input(m, x):
    """``(x - mean) / sqrt(var + eps)`` as the BatchNorm ``m`` computes it, shape of ``x``."""
    if _uses_batch_stats(m):
        return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def conv_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches ``[B, C*kh*kw, L]`` of conv ``m``: row ``(c, i, j)`` is what weight
    ``[:, c, i, j]`` multiplies at each of the L output positions."""
    return F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)


def one_weight_delta(m, attr, local, mu, x, base_out, aux):
    """Outputs of module ``m`` with one weight moved by ``mu``, for each coordinate in ``local``.

    Args:
        m: Linear, Conv2d or BatchNorm; ``attr``: "weight" or "bias".
        local: ``[P]`` flat indices into that parameter.
        x: the module's input ``[B, ...]``; base_out: its output ``[B, ...]``.
        aux: callable ``kind -> tensor`` returning cached helpers (conv patches, BN's x-hat).
    Returns:
        ``[P, B, ...]``: base_out with the one changed unit/channel per perturbation.
    """
    P = local.numel()
    out = base_out.unsqueeze(0).repeat(P, *([1] * base_out.dim()))
    ar = torch.arange(P, device=local.device)
    if isinstance(m, nn.Linear):
        in_f = m.in_features
        unit = local // in_f if attr == "weight" else local
        flat = out.reshape(P, -1, m.out_features)
        if attr == "weight":
            flat[ar, :, unit] += mu * x.reshape(-1, in_f)[:, local % in_f].T
        else:
            flat[ar, :, unit] += mu
        return flat.reshape(out.shape)
    if isinstance(m, nn.Conv2d):
        if attr == "bias":
            out[ar, :, local] += mu
            return out
        O, Cg, kh, kw = m.weight.shape
        o = local // (Cg * kh * kw)
        rest = local % (Cg * kh * kw)  # (c, i, j) within the group's input channels
        group = o // (O // m.groups)
        rows = group * Cg * kh * kw + rest
        patches = aux("patches")  # [B, C*kh*kw, L]
        delta = patches[:, rows, :].permute(1, 0, 2).reshape(P, x.shape[0], *base_out.shape[2:])
        out[ar, :, o] += mu * delta
        return out
    # BatchNorm: y = gamma * xhat + beta, per channel
    if attr == "bias":
        out[ar, :, local] += mu
    else:
        out[ar, :, local] += mu * aux("xhat").movedim(1, 0)[local]
    return out


def default_max_batch(cache: dict, budget_bytes: float = 1.5e9) -> int:
    """Perturbations per call so the stacked activations stay within ``budget_bytes``."""
    per_copy = sum(
        v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor)
    )
    return int(max(1, min(4096, math.floor(budget_bytes / max(per_copy, 1) / 3))))
