"""Layer kernels for P perturbed copies of a batch, stacked perturbation-major as ``[P*B, ...]``.

A layer whose parameters all copies share runs once on the stacked rows (a convolution on
channels-last rows), with one exception:
BatchNorm in train mode normalises each copy's B rows on their own (copies become channels of
one ``batch_norm`` call), never across copies. A layer whose parameters differ per copy
(``[P, *shape]``) runs as P independent layers: a batched matmul, a grouped convolution (copies
become channel groups), a per-copy scale and shift.

``normalise`` / ``batch_norm`` are the one BatchNorm of the fast path: the layer kernel, the
one-weight delta of a BatchNorm weight and Delta propagation through a BatchNorm all use them;
per-copy statistics come from one place (``_statistics``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
LAYERS = (nn.Linear, nn.Conv2d) + NORMS  # the module kinds whose parameters the fast path moves


def updates_running_stats(learner: nn.Module) -> bool:
    """Whether a forward of ``learner`` in its own mode updates BatchNorm running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in learner.modules())


def repeat_rows(t: torch.Tensor, P: int) -> torch.Tensor:
    """Repeat a shared ``[B, ...]`` tensor into stacked ``[P*B, ...]`` rows."""
    return t.unsqueeze(0).expand(P, *t.shape).reshape(P * t.shape[0], *t.shape[1:])


def layer(module: nn.Module, x: torch.Tensor, weight, bias, P: int, per_copy: bool,
          stacked: bool = False) -> torch.Tensor:
    """A Linear, Conv2d or BatchNorm applied to P stacked copies ``x [P*B, ...]``.

    ``weight``/``bias``: the parameters, shared (``[*shape]``) or, when ``per_copy``, either of
    them per copy (``[P, *shape]``; the other may still be shared). ``stacked``: ``x`` holds
    perturbed copies (not the base forward), which a shared convolution reads channels-last.
    Returns ``[P*B, ...]``.
    """
    if isinstance(module, nn.Linear):
        return _linear(x, weight, bias, P, per_copy)
    if isinstance(module, nn.Conv2d):
        return _conv2d(module, x, weight, bias, P, per_copy, stacked)
    return batch_norm(module, x, weight, bias, P, per_copy)


def normalise(m: nn.Module, x: torch.Tensor, P: int = 1, channels: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` as the BatchNorm ``m`` computes it, for P stacked copies.

    Args:
        m: a BatchNorm1d/2d; in train mode (or without running statistics) each copy is
            normalised with the statistics of its own B rows, else with ``m``'s running ones.
        x: ``[P*B, K, *S]``.
        channels: ``[P, K]``, which of ``m``'s channels each copy's K columns are (for a Delta,
            whose copies hold different channels); None: all of them, in order (K = C).
    Returns:
        The shape of ``x``.
    """
    if P == 1 and channels is None:
        return _library_batch_norm(m, x, None, None)
    mean, rstd = _statistics(m, x, P, channels)
    return ((x.view(P, -1, *x.shape[1:]) - mean) * rstd).view(x.shape)


def batch_norm(m: nn.Module, x: torch.Tensor, weight, bias, P: int = 1, per_copy: bool = False,
               channels: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm ``m`` on P stacked copies ``x [P*B, K, *S]``: ``normalise``, then scale and
    shift by ``weight``/``bias`` (``[K]`` shared, or ``[P, K]`` per copy when ``per_copy``;
    either may be None). ``channels`` as for ``normalise``.

    One copy, or running statistics and parameters every copy shares: one library call. Else
    the per-copy statistics, scale and shift ``[P, 1, K, 1...]`` are folded into one
    multiply-add over the rows viewed ``[P, B, K, *S]`` (no regrouping copies)."""
    if not per_copy and channels is None and (P == 1 or not _batch_statistics(m)):
        return _library_batch_norm(m, x, weight, bias)
    mean, rstd = _statistics(m, x, P, channels)
    K = x.shape[1]
    view = (P if per_copy else 1, 1, K) + (1,) * (x.dim() - 2)
    scale = rstd if weight is None else rstd * (_per_copy(weight, P, (K,)) if per_copy else weight).reshape(view)
    shift = -mean * scale
    if bias is not None:
        shift = shift + (_per_copy(bias, P, (K,)) if per_copy else bias).reshape(view)
    return torch.addcmul(shift, x.view(P, -1, *x.shape[1:]), scale).view(x.shape)


def _batch_statistics(m: nn.Module) -> bool:
    """Whether ``m`` normalises with the batch's statistics (train mode, or none kept)."""
    return m.training or m.running_mean is None


def _library_batch_norm(m, x, weight, bias):
    """``F.batch_norm`` as ``m`` applies it, without touching its running statistics."""
    if _batch_statistics(m):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, m.eps)
    return F.batch_norm(x, m.running_mean, m.running_var, weight, bias, False, 0.0, m.eps)


def _statistics(m, x, P, channels):
    """Per-copy ``(mean, 1 / sqrt(var + eps))`` of ``x [P*B, K, *S]``, each ``[P, 1, K, 1...]``
    (``[1, 1, K, 1...]`` for running statistics every copy shares)."""
    K = x.shape[1]
    if _batch_statistics(m):
        rows = x.view(P, -1, *x.shape[1:])
        var, mean = torch.var_mean(rows, dim=(1, *range(3, rows.dim())), keepdim=True, correction=0)
        return mean, torch.rsqrt(var + m.eps)
    view = (1 if channels is None else P, 1, K) + (1,) * (x.dim() - 2)
    mean, var = ((m.running_mean, m.running_var) if channels is None
                 else (m.running_mean[channels], m.running_var[channels]))
    return mean.reshape(view), torch.rsqrt(var.reshape(view) + m.eps)


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


def _conv2d(m: nn.Conv2d, x, w, b, P, per_copy, stacked=False):
    if not per_copy:
        if stacked and x.dim() == 4:
            # stacked copies go channels-last: the CPU convolution runs faster so, and its
            # output (channels-last too) feeds the next layers without another copy
            x = x.contiguous(memory_format=torch.channels_last)
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


__all__ = ["LAYERS", "NORMS", "batch_norm", "layer", "normalise", "repeat_rows", "updates_running_stats"]
