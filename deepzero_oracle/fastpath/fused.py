"""Fused kernels for the hottest steps of coordinate queries on CNNs: a Conv2d that a 2x2
max-pool (and maybe a ReLU) follows.

- A change entering the convolution (``conv_pool_taps``): each of the P copies changes one
  block of k input channels, and the pooled output is ``max over the 2x2 window of
  (base_conv + conv(change, W[:, block]))``.
- A moved weight of the convolution itself (``conv_delta_pool``): one output channel moves by
  ``mu * input patch``, then is pooled.

Done with library ops, each is a few passes over the whole stacked output (a small matrix
product or gather, an add, two maxima); with only a few multiply-adds per value, those memory
passes, not arithmetic, set the speed. Written as one element-wise expression, ``torch.compile``
turns each into a single loop nest that computes every pooled value in registers. Without a working
compiler the callers keep the library-op path.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per copy, the work below which the library-op path is cheap enough (and no compile time is
# spent): pooled outputs x 4 window positions x k*kh*kw taps for a change entering a conv, and
# the moved channel's values for a moved conv weight. Independent of how many copies a chunk
# holds, so every chunking takes the same path (bitwise-equal results).
MIN_WORK_PER_COPY = 1 << 20
MIN_CHANNEL_PER_COPY = 1 << 12


def conv_pool_taps(xp: torch.Tensor, base4: torch.Tensor, wt: torch.Tensor, kernel: tuple[int, int],
                   stride: tuple[int, int], dilation: tuple[int, int], relu: bool,
                   channels_last: bool = False) -> torch.Tensor:
    """``max_pool2d(base + conv(change), 2)`` (then ReLU if ``relu``) as one element-wise
    expression.

    Args:
        xp: the zero-padded change of the block's input channels, ``[P, B, k, Hp, Wp]``.
        base4: the base convolution output at the pooled positions, ``[B, 4, Ho2, Wo2, O]``
            (dim 1: window position ``2*da + db``).
        wt: each copy's weights of its block, ``[P, k*kh*kw, O]`` (row ``(c, i, j)``).
        kernel, stride, dilation: the convolution's.
        channels_last: return the values as computed, O innermost (a convolution reading them
            next runs faster so), rather than copied to the contiguous layout (what a flatten
            or a linear layer next wants).
    Returns:
        ``[P, B, O, Ho2, Wo2]``.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    k, ho2, wo2 = xp.shape[2], base4.shape[2], base4.shape[3]
    best = None
    for da in (0, 1):
        for db in (0, 1):
            acc = base4[None, :, 2 * da + db]  # [1, B, Ho2, Wo2, O]
            for c in range(k):
                for i in range(kh):
                    for j in range(kw):
                        r0, c0 = da * sh + i * dh, db * sw + j * dw
                        tap = xp[:, :, c, r0 : r0 + 2 * sh * (ho2 - 1) + 1 : 2 * sh,
                                 c0 : c0 + 2 * sw * (wo2 - 1) + 1 : 2 * sw]  # [P, B, Ho2, Wo2]
                        acc = acc + tap[..., None] * wt[:, None, None, None, (c * kh + i) * kw + j]
            best = acc if best is None else torch.maximum(best, acc)
    if relu:
        best = torch.relu(best)
    # computed with O innermost (vectorised)
    best = best.permute(0, 1, 4, 2, 3)
    return best if channels_last else best.contiguous()


def conv_delta_pool(patches_w: torch.Tensor, base_w: torch.Tensor, channel: torch.Tensor,
                    rows: torch.Tensor, mu: torch.Tensor, relu: bool) -> torch.Tensor:
    """``max_pool2d`` (then ReLU if ``relu``) of the one output channel a moved Conv2d weight
    changes, per copy: ``base[:, o] + mu * patches[:, row]``, pooled, in one expression.

    Both inputs come window-major (``window_major``), so each pooled value is the maximum of
    four contiguous streams and the kernel is one vectorised pass.

    Args:
        patches_w: the conv's input patches at the pooled positions, ``[C*kh*kw, 4, B, Ho//2, Wo//2]``.
        base_w: the conv's base output there, ``[O, 4, B, Ho//2, Wo//2]``.
        channel, rows: ``[P]`` each copy's output channel and patch row (its weight ``(c, i, j)``).
        mu: 0-d tensor, the step.
    Returns:
        the pooled values and their change from the base's, ``[P, B, 1, Ho//2, Wo//2]`` each
        (the base's pooled values come from the same loads, so the change is nearly free).
    """
    # one gather per window position: each read once, so the compiler fuses all into one pass
    base = [base_w[channel, d] for d in range(4)]  # 4 x [P, B, Ho//2, Wo//2]
    moved = [base[d] + mu * patches_w[rows, d] for d in range(4)]
    pooled = [torch.maximum(torch.maximum(v[0], v[1]), torch.maximum(v[2], v[3])) for v in (moved, base)]
    if relu:
        pooled = [torch.relu(v) for v in pooled]
    return pooled[0].unsqueeze(2), (pooled[0] - pooled[1]).unsqueeze(2)


def norm_relu(x5: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``relu(batch_norm(x))`` per copy in train mode (each copy's own batch statistics), as
    ``layers.batch_norm`` computes it, in one expression.

    Args:
        x5: P copies ``[P, B, C, H, W]``; weight, bias: ``[C]``.
    Returns:
        ``[P, B, C, H, W]``.
    """
    var, mean = torch.var_mean(x5, dim=(1, 3, 4), keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps) * weight[:, None, None]
    return torch.relu(torch.addcmul(bias[:, None, None] - mean * scale, x5, scale))


def norm_add_relu(x5: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, other: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``relu(batch_norm(x) + other)`` per copy in train mode (a residual block's end): ``other``
    ``[P or 1, B, C, H, W]`` (1: every copy adds the same, e.g. the unchanged shortcut); the rest
    as ``norm_relu``."""
    var, mean = torch.var_mean(x5, dim=(1, 3, 4), keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps) * weight[:, None, None]
    return torch.relu(torch.addcmul(bias[:, None, None] - mean * scale, x5, scale) + other)


def affine_relu(x5: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(x * scale + shift)``: BatchNorm with frozen statistics then ReLU, per channel
    ``scale``, ``shift`` ``[C, 1, 1]``; ``x5`` ``[P, B, C, H, W]``."""
    return torch.relu(torch.addcmul(shift, x5, scale))


def affine_add_relu(x5: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``relu(x * scale + shift + other)``, ``other`` ``[P or 1, B, C, H, W]``: see ``affine_relu``."""
    return torch.relu(torch.addcmul(shift, x5, scale) + other)


class Kernels:
    """The fused kernels through ``torch.compile``. Each is compiled on first use with the sizes
    its caller names as varying (the number of copies, the batch) symbolic, so chunks and
    batches of any size share one kernel, and every other size static: one kernel per layer
    shape (up to ``recompile_limit`` per kernel; further shapes run the same expression
    uncompiled, with the same results).
    The C++ is built with multiply-adds contracted into FMA instructions (``options``): the
    kernels are chains of them, and a separate multiply and add are slower.
    After a failure (no C++ compiler, unsupported platform) every kernel reports itself
    unavailable, with one warning, and the callers keep the library-op path."""

    options = {"cpp.enable_floating_point_contract_flag": "fast"}
    recompile_limit = 64

    def __init__(self):
        self.enabled = os.environ.get("DEEPZERO_ORACLE_COMPILE", "1") != "0"
        self._compiled: dict = {}
        self._lock = threading.Lock()

    def __call__(self, fn, varying: dict[int, tuple[int, ...]], *args):
        """``fn(*args)`` compiled, or None when compiling is impossible. ``varying`` maps an
        argument's position to its dims whose size changes between calls."""
        with self._lock:
            if fn not in self._compiled:
                self._compiled[fn] = torch.compile(fn, options=self.options)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                # without marking, dynamo's automatic dynamic shapes turn every size symbolic
                # once a kernel serves a second layer, and that generic kernel runs at about
                # half the speed (channels and image sizes set its vector loops)
                for d in range(a.dim()):
                    if d in varying.get(i, ()):
                        torch._dynamo.maybe_mark_dynamic(a, d)
                    else:
                        torch._dynamo.mark_static(a, d)
        try:
            # one kernel per layer shape and operand layout: more than dynamo's default allows
            with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                                self.recompile_limit)):
                return self._compiled[fn](*args)
        except Exception as exc:  # compiler missing or failing: the library ops still work
            self.enabled = False
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); fused "
                          f"convolution kernels are off, coordinate queries use library ops",
                          stacklevel=2)
            return None


kernels = Kernels()


def pool_layout(out_base: torch.Tensor) -> torch.Tensor:
    """The base convolution output ``[B, O, Ho, Wo]`` at the positions a 2x2 max-pool reads,
    as ``[B, 4, Ho//2, Wo//2, O]`` (window position ``2*da + db`` on dim 1)."""
    return window_major(out_base.transpose(0, 1)).permute(2, 1, 3, 4, 0).contiguous()


def window_major(values_cm: torch.Tensor) -> torch.Tensor:
    """Channel-major values ``[R, B, H, W]`` at the positions a 2x2 max-pool reads, as
    ``[R, 4, B, H//2, W//2]`` (dim 1: window position ``2*da + db``)."""
    R, B, H, W = values_cm.shape
    h2, w2 = H // 2, W // 2
    x = values_cm[:, :, : 2 * h2, : 2 * w2].reshape(R, B, h2, 2, w2, 2)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(R, 4, B, h2, w2).contiguous()


def fusable(m: nn.Conv2d, batch: int, out_shape: torch.Size, k: int) -> bool:
    """Whether the fused kernel is worth it for ``m`` followed by a 2x2 max-pool, per copy."""
    O, H, W = out_shape[-3:]
    taps = k * m.kernel_size[0] * m.kernel_size[1]
    work = batch * O * (H // 2) * (W // 2) * 4 * taps
    return kernels.enabled and m.groups == 1 and taps <= 64 and work >= MIN_WORK_PER_COPY


def conv2d_max_pool(m: nn.Conv2d, change: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                    base4: torch.Tensor, relu: bool, channels_last: bool = False) -> torch.Tensor | None:
    """Pooled outputs of conv ``m`` then a 2x2 max-pool (then ReLU if ``relu``) for P copies
    whose input differs from the base by ``change [P, B, k, H, W]`` on block ``index [P]`` of
    k channels; ``channels_last``: in that memory format (for a convolution to read next).

    Returns ``[P*B, O, Ho//2, Wo//2]``, or None when the compiled kernel is unavailable.
    """
    P, B, k = change.shape[:3]
    ph, pw = m.padding
    xp = F.pad(change, (pw, pw, ph, ph)) if ph or pw else change
    O, C, kh, kw = weight.shape
    blocks = weight.reshape(O, C // k, k * kh * kw).permute(1, 2, 0).contiguous()  # [C/k, k*kh*kw, O]
    wt = blocks[index]  # [P, k*kh*kw, O]
    out = kernels(conv_pool_taps, {0: (0, 1), 1: (0,), 2: (0,)}, xp, base4, wt, m.kernel_size, m.stride,
                  m.dilation, relu, channels_last)
    if out is None:
        return None
    return out.reshape(P * B, *out.shape[2:])


def moved_weight_max_pool(m: nn.Conv2d, local: torch.Tensor, mu: float, patches_w: torch.Tensor,
                          base_w: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pooled (and rectified if ``relu``) outputs of conv ``m`` then a 2x2 max-pool with weight
    ``local [P]`` (flat indices) moved by ``mu``: only the moved output channel, ``[P, B, 1,
    Ho//2, Wo//2]``, and its change from the base; None when the compiled kernel is unavailable.
    ``patches_w``, ``base_w``: the conv's input patches and output, window-major
    (``conv_delta_pool``)."""
    O, Cg, kh, kw = m.weight.shape
    channel = local // (Cg * kh * kw)
    rows = local % (Cg * kh * kw)  # groups == 1: the patch row of weight (c, i, j)
    step = torch.tensor(mu, dtype=base_w.dtype, device=base_w.device)
    return kernels(conv_delta_pool, {0: (2,), 1: (2,), 2: (0,), 3: (0,)}, patches_w, base_w, channel, rows,
                   step, relu)


def fusable_moved_weight(m: nn.Module, attr: str, out_shape: torch.Size) -> bool:
    """Whether a moved weight of ``m`` (a Conv2d a 2x2 max-pool follows) takes the fused kernel."""
    B, _, H, W = out_shape
    return (kernels.enabled and isinstance(m, nn.Conv2d) and attr == "weight" and m.groups == 1
            and B * H * W >= MIN_CHANNEL_PER_COPY)


# Per copy, the values (B*C*H*W) below which BatchNorm -> (add ->) ReLU stays on library ops.
MIN_NORM_PER_COPY = 1 << 14


def fusable_norm(m: nn.Module, x: torch.Tensor, P: int) -> bool:
    """Whether BatchNorm ``m`` on ``x [P*B, C, H, W]`` (P stacked copies) followed by a ReLU
    (maybe through a residual add) takes the fused kernel."""
    return (kernels.enabled and isinstance(m, nn.BatchNorm2d) and x.dim() == 4
            and x.numel() // P >= MIN_NORM_PER_COPY)


def norm_act(m: nn.Module, x: torch.Tensor, P: int, weight, bias, other: torch.Tensor | None = None,
             batch_statistics: bool = True) -> torch.Tensor | None:
    """``relu(batch_norm(x) [+ other])`` for P stacked copies ``x [P*B, C, H, W]`` in one pass
    (two with batch statistics: one for them): the BatchNorm ``m`` with each copy's own batch
    statistics when ``batch_statistics``, else with ``m``'s running ones; ``weight``/``bias``
    ``[C]`` or None; ``other`` ``[P*B, C, H, W]`` or ``[B, C, H, W]`` (the same for every copy).
    Returns ``[P*B, C, H, W]``, or None when the compiled kernel is unavailable."""
    C = x.shape[1]
    x5 = x.reshape(P, -1, *x.shape[1:])
    weight = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(C, dtype=x.dtype, device=x.device) if bias is None else bias
    if other is not None:
        other = other.reshape(-1, *x5.shape[1:])
    if batch_statistics:
        if other is None:
            out = kernels(norm_relu, {0: (0, 1)}, x5, weight, bias, m.eps)
        else:
            out = kernels(norm_add_relu, {0: (0, 1), 3: (0, 1)}, x5, weight, bias, other, m.eps)
    else:
        scale = torch.rsqrt(m.running_var + m.eps) * weight
        shift = (bias - m.running_mean * scale)[:, None, None]
        scale = scale[:, None, None]
        if other is None:
            out = kernels(affine_relu, {0: (0, 1)}, x5, scale, shift)
        else:
            out = kernels(affine_add_relu, {0: (0, 1), 3: (0, 1)}, x5, scale, shift, other)
    return None if out is None else out.reshape(x.shape)
