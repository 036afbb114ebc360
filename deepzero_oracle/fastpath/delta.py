"""Deltas: a perturbation carried as the few values it changes, from the moved weight on.

One-weight delta (``one_weight_delta``). Moving one weight of a Linear / Conv2d / BatchNorm by
mu changes one block of its output along dim 1 (one unit, one channel) by a known slice:
``base_output + mu * input_slice`` (for a conv, the slice is a row of the cached input patches,
``conv_patches``). The layer is never recomputed.

Delta propagation (``propagate_module``, ``propagate_call``). Element-wise layers, pooling,
per-channel normalisation and flattening keep the change inside that block, so only the block
is computed, per perturbation. The next Linear / Conv2d turns the block's change into a dense
change of its output with a small product (``W[:, block] @ change`` or a convolution over the
block's channels only); from there the rest of the network runs on ``P * B`` stacked rows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle.fastpath.layers import NORMS, batch_norm

# modules and functions applied value by value: a change stays where it is
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
                       nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Mish, nn.Hardswish)
ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu,
                         F.silu, F.leaky_relu, F.elu, F.relu6, F.softplus, F.mish, F.hardtanh}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
# per-channel spatial pooling: a change in channel c stays in channel c
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# two-tensor sums (residual connections): see add_copies
ADD_FUNCTIONS = {operator.add, torch.add}


def is_plain_2x2_max_pool(m: nn.Module) -> bool:
    """A MaxPool2d with kernel 2, stride 2, no padding/dilation/ceil/indices."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (isinstance(m, nn.MaxPool2d) and pair(m.kernel_size) == (2, 2)
            and pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1)
            and not m.ceil_mode and not m.return_indices)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for ``[N, C, H, W]`` as two element-wise maxima: the same values,
    several times faster than the CPU pooling kernel on small images."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def conv_patches(m: nn.Conv2d, x: torch.Tensor, channel_major: bool = False) -> torch.Tensor:
    """Input patches ``[N, C*kh*kw, L]`` of conv ``m`` on ``x [N, C, H, W]`` (``F.unfold``'s
    layout: row ``(c, i, j)`` is what weight ``[:, c, i, j]`` multiplies at each of the L output
    positions), copied once from a strided view: several times faster than ``unfold`` on CPU.
    ``channel_major``: ``[C*kh*kw, N, L]`` instead, so that picking rows copies whole blocks."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    ho = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    n, c, row, col = xp.stride()
    view = xp.as_strided((x.shape[0], x.shape[1], kh, kw, ho, wo),
                         (n, c, row * dh, col * dw, row * sh, col * sw))
    if channel_major:
        return view.permute(1, 2, 3, 0, 4, 5).reshape(-1, x.shape[0], ho * wo)
    return view.reshape(x.shape[0], -1, ho * wo)


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...] -> [C, B, ...]``, contiguous: a copy whose channels are whole blocks."""
    return t.transpose(0, 1).contiguous()


@dataclass
class Delta:
    """P perturbed copies of a tensor that differ from its base value in one block each.

    Copy p equals the base ``[B, C, *S]`` except on dim-1 positions
    ``index[p] * k ... index[p] * k + k - 1``, where it holds ``values[p]`` (``[B, k, *S]``).
    """

    index: torch.Tensor  # [P] block index
    values: torch.Tensor  # [P, B, k, *S]
    change: torch.Tensor | None = None  # values minus the base block, when a kernel made it too

    @property
    def positions(self) -> torch.Tensor:
        """``[P, k]`` dim-1 positions of each copy's block."""
        k = self.values.shape[2]
        return self.index[:, None] * k + torch.arange(k, device=self.index.device)

    def base_slice(self, base: torch.Tensor, base_cm: torch.Tensor | None = None) -> torch.Tensor:
        """The base values at each copy's block, ``[P, B, k, *S]``; ``base_cm`` (the same
        values as ``[C, B, *S]``, see ``channel_major``) makes the pick a copy of whole rows."""
        pos = self.positions
        P, k = pos.shape
        if base_cm is not None:
            picked = base_cm[pos.reshape(-1)]  # [P*k, B, *S]
            return picked.reshape(P, k, *base_cm.shape[1:]).transpose(1, 2)
        picked = base[:, pos.reshape(-1)]  # [B, P*k, *S]
        return picked.reshape(base.shape[0], P, k, *base.shape[2:]).transpose(0, 1)

    def difference(self, base: torch.Tensor, base_cm: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` minus the base block (see ``base_slice``), ``[P, B, k, *S]``."""
        return self.change if self.change is not None else self.values - self.base_slice(base, base_cm)

    def dense(self, base: torch.Tensor) -> torch.Tensor:
        """All copies in full, stacked as ``[P*B, C, *S]``."""
        P, B = self.values.shape[:2]
        out = base.unsqueeze(0).repeat(P, *([1] * base.dim()))
        pos = self.positions
        rows = torch.arange(P, device=pos.device)[:, None].expand_as(pos)
        # out[p, :, pos[p, j]] = values[p, :, j]
        out[rows.reshape(-1), :, pos.reshape(-1)] = self.values.transpose(1, 2).reshape(
            -1, B, *self.values.shape[3:])
        return out.reshape(P * B, *base.shape[1:])


def one_weight_delta(m, attr, local, mu, x, base_out, helper):
    """Outputs of module ``m`` with one weight moved by ``mu``, for each coordinate in ``local``.

    Args:
        m: Linear, Conv2d or BatchNorm; ``attr``: "weight" or "bias".
        local: ``[P]`` flat indices into that parameter.
        x: the module's input ``[B, ...]``; base_out: its output ``[B, C, ...]``.
        helper: callable ``kind -> tensor`` returning cached helpers: ``"patches"`` (conv
            patches, channel-major ``[C*kh*kw, B, L]``), ``"output_cm"`` (``base_out``
            channel-major) and ``"xhat"`` (BatchNorm's normalised input).
    Returns:
        A ``Delta``: per perturbation, the one changed unit/channel of the output
        (``[P, B, 1, ...]``); or, for a Linear on inputs with more than two dims, the
        outputs in full, ``[P*B, ...]``.
    """
    P = local.numel()
    if isinstance(m, nn.Linear):
        in_f = m.in_features
        unit = local // in_f if attr == "weight" else local
        change = mu * x.reshape(-1, in_f)[:, local % in_f].T if attr == "weight" else mu  # [P, N]
        if x.dim() == 2:
            return Delta(unit, (base_out[:, unit].T + change).unsqueeze(-1))
        out = base_out.unsqueeze(0).repeat(P, *([1] * base_out.dim()))
        flat = out.reshape(P, -1, m.out_features)
        flat[torch.arange(P, device=unit.device), :, unit] += change
        return out.reshape(P * base_out.shape[0], *base_out.shape[1:])
    if attr == "bias":  # Conv2d or BatchNorm bias: channel `local` moves by mu
        return Delta(local, base_out[:, local].transpose(0, 1).unsqueeze(2) + mu)
    if isinstance(m, nn.Conv2d):
        O, Cg, kh, kw = m.weight.shape
        o = local // (Cg * kh * kw)
        rest = local % (Cg * kh * kw)  # (c, i, j) within the group's input channels
        rows = (o // (O // m.groups)) * Cg * kh * kw + rest
        patches = helper("patches")[rows]  # [P, B, L]
        moved = torch.add(helper("output_cm")[o], patches.view(P, *base_out.shape[:1], *base_out.shape[2:]),
                          alpha=mu)
        return Delta(o, moved.unsqueeze(2))
    # BatchNorm: y = gamma * xhat + beta, per channel
    moved = base_out[:, local] + mu * helper("xhat")[:, local]
    return Delta(local, moved.transpose(0, 1).unsqueeze(2))


def propagate_module(module: nn.Module, delta: Delta, x_base, out_base, extra_args, extra_kwargs,
                     weight=None, bias=None):
    """Apply ``module`` to a Delta input. Returns a Delta, a dense ``[P*B, ...]`` tensor, or
    None when no rule applies (the caller then densifies)."""
    if extra_args or extra_kwargs:
        return None
    if isinstance(module, ELEMENTWISE_MODULES):
        return Delta(delta.index, module(delta.values))
    if isinstance(module, POOL_MODULES) and delta.values.dim() == 5:
        return _pool(delta, module)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _flatten(delta)
    if isinstance(module, NORMS):
        return _batch_norm(module, delta, weight, bias)
    if isinstance(module, nn.Linear) and x_base.dim() == 2:
        return _linear(delta, x_base, out_base, weight)
    if isinstance(module, nn.Conv2d) and module.groups == 1 and x_base.dim() == 4:
        return _conv2d(module, delta, x_base, out_base, weight)
    return None


def propagate_call(target, delta: Delta, args, kwargs, method: bool):
    """``target(delta, *args, **kwargs)`` for a function (or a method name); None if no rule."""
    if method:
        if target in ELEMENTWISE_METHODS and not args and not kwargs:
            return Delta(delta.index, getattr(delta.values, target)())
        if target == "flatten" and tuple(args) == (1,) and not kwargs:
            return _flatten(delta)
        return None
    if any(isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values())):
        return None  # another tensor joins in: no per-block rule
    if target in ELEMENTWISE_FUNCTIONS:
        return Delta(delta.index, target(delta.values, *args, **kwargs))
    if target in POOL_FUNCTIONS and delta.values.dim() == 5:
        P, B, k = delta.values.shape[:3]
        out = target(delta.values.reshape(P * B, k, *delta.values.shape[3:]), *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return None
        return Delta(delta.index, out.reshape(P, B, k, *out.shape[2:]))
    if target is torch.flatten and tuple(args) == (1,) and not kwargs:
        return _flatten(delta)
    if target is operator.getitem and len(args) == 1 and not kwargs:
        return _slice(delta, args[0])
    if target is F.pad:
        return _pad(delta, *args, **kwargs)
    return None


def add_copies(a, b, base_a: torch.Tensor, base_b: torch.Tensor):
    """``a + b`` for P perturbed copies of two same-shaped operands ``[B, C, ...]``.

    Each operand is a ``Delta``, the copies stacked ``[P*B, C, ...]``, or None (unchanged: every
    copy holds its base value ``base_a`` / ``base_b``). The delta of a sum is the sum of the
    deltas: a Delta plus an unchanged operand stays a Delta (its block plus the other's base
    there), as do two Deltas on the same blocks; a stacked operand takes the other's base by
    broadcasting and a Delta's change only on its block, so no dense copy of it is made.
    Returns a Delta or a stacked ``[P*B, C, ...]`` tensor; None when shapes differ
    (broadcasting) or two Deltas hold different blocks (the caller densifies).
    """
    if base_a.shape != base_b.shape or base_a.dim() < 2:
        return None
    if a is None or (isinstance(a, Delta) and isinstance(b, torch.Tensor)):
        a, b, base_a, base_b = b, a, base_b, base_a  # the changed or stacked operand first
    if isinstance(a, Delta):
        if b is None:
            return Delta(a.index, a.values + a.base_slice(base_b))
        if b.values.shape == a.values.shape and torch.equal(a.index, b.index):
            return Delta(a.index, a.values + b.values)
        return None
    P = a.shape[0] // base_a.shape[0]
    if b is None or isinstance(b, Delta):
        out = a.view(P, *base_a.shape) + base_b  # shares base_b's rows by broadcasting
        if isinstance(b, Delta):
            pos = b.positions  # out[p, :, pos[p, j]] += change[p, :, j]
            rows = torch.arange(P, device=pos.device)[:, None].expand_as(pos)
            out[rows, :, pos] += (b.values - b.base_slice(base_b)).transpose(1, 2)
        return out.view(a.shape)
    return a + b


def _slice(delta, index):
    """``x[index]`` for a Delta: basic slicing that keeps the batch and channel dims whole
    (e.g. ``x[:, :, ::2, ::2]``, the subsampling of shortcut option A)."""
    index = index if isinstance(index, tuple) else (index,)
    whole = slice(None)
    if not all(isinstance(i, slice) for i in index) or len(index) < 2 or index[0] != whole or index[1] != whole:
        return None
    return Delta(delta.index, delta.values[(whole,) + index])


def _pad(delta, pad, mode="constant", value=None):
    """``F.pad`` of a Delta ``[B, C, *S]`` with a constant: spatial padding pads each block;
    channel padding (the zero channels of shortcut option A) shifts the blocks, which must stay
    whole blocks (a shift by a multiple of their width). Padding the batch: no rule."""
    P, B, k = delta.values.shape[:3]
    spatial = delta.values.dim() - 3
    if mode != "constant" or len(pad) % 2 or len(pad) > 2 * (spatial + 1):
        return None
    pad = tuple(pad) + (0,) * (2 * (spatial + 1) - len(pad))
    front = pad[-2]
    if front % k:
        return None
    fill = 0.0 if value is None else value
    values = F.pad(delta.values, pad[:-2], value=fill) if any(pad[:-2]) else delta.values
    return Delta(delta.index + front // k, values)


def _pool(delta, module):
    if getattr(module, "return_indices", False):
        return None
    P, B, k = delta.values.shape[:3]
    rows = delta.values.reshape(P * B, k, *delta.values.shape[3:])
    out = max_pool_2x2(rows) if is_plain_2x2_max_pool(module) else module(rows)
    return Delta(delta.index, out.reshape(P, B, k, *out.shape[2:]))


def _flatten(delta):
    P, B = delta.values.shape[:2]
    return Delta(delta.index, delta.values.reshape(P, B, -1))


def _batch_norm(m, delta, weight, bias):
    pos = delta.positions  # [P, k]: channels of each copy
    P, B = delta.values.shape[:2]
    x = delta.values.reshape(P * B, *delta.values.shape[2:])
    y = batch_norm(m, x, None if weight is None else weight[pos], None if bias is None else bias[pos],
                   P, per_copy=True, channels=pos)
    return Delta(delta.index, y.reshape(delta.values.shape))


def _linear(delta, x_base, out_base, weight):
    change = delta.values - delta.base_slice(x_base)  # [P, B, k]
    pos = delta.positions
    P, k = pos.shape
    w = weight[:, pos.reshape(-1)].reshape(weight.shape[0], P, k).permute(1, 2, 0)  # [P, k, O]
    out = out_base.unsqueeze(0) + torch.bmm(change, w)
    return out.reshape(P * out_base.shape[0], *out_base.shape[1:])


def _conv2d(m, delta, x_base, out_base, weight):
    change = delta.values - delta.base_slice(x_base)  # [P, B, k, H, W]
    P, B, k = change.shape[:3]
    blocks, counts = torch.unique_consecutive(delta.index, return_counts=True)
    if len(blocks) <= 32:
        # coordinates arrive sorted, so copies sharing a block come in runs. Per run, the
        # change convolves with that block's k input channels only: as im2col + one matrix
        # product (oneDNN's convolution is slow for so few input channels), written in place.
        patches = conv_patches(m, change.reshape(P * B, k, *change.shape[3:]))  # [P*B, k*kh*kw, L]
        O = weight.shape[0]
        y = torch.empty(P * B, O, patches.shape[-1], dtype=change.dtype, device=change.device)
        start = 0
        for block, n in zip(blocks.tolist(), counts.tolist()):
            w = weight[:, block * k : (block + 1) * k].reshape(O, -1)
            rows = slice(start * B, (start + n) * B)
            torch.matmul(w, patches[rows], out=y[rows])
            start += n
        y = y.view(P, B, *out_base.shape[1:]).add_(out_base)
        return y.view(P * B, *out_base.shape[1:])
    # many distinct blocks: one grouped convolution, each copy a group of its k channels
    pos = delta.positions
    w = weight[:, pos.reshape(-1)].reshape(weight.shape[0], P, k, *weight.shape[2:]).transpose(0, 1)
    y = F.conv2d(change.transpose(0, 1).reshape(B, P * k, *change.shape[3:]),
                 w.reshape(P * weight.shape[0], k, *weight.shape[2:]), None,
                 m.stride, m.padding, m.dilation, P)
    y = y.reshape(B, P, *out_base.shape[1:]).transpose(0, 1) + out_base.unsqueeze(0)
    return y.reshape(P * B, *out_base.shape[1:])
