"""The fused Conv2d + 2x2 max-pool kernel: its math (eager, every conv option), the compiled
kernel inside the engine (float64, against the naive loop), and the fallback without a compiler."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepzero_oracle.fastpath.fused as fused
from deepzero_oracle import ModuleOracle
from deepzero_oracle.fastpath.delta import conv_patches
from deepzero_oracle.fastpath.fused import conv_delta_pool, conv_pool_taps, pool_layout, window_major

from test_fast_path import naive_coordinate_losses


@pytest.mark.parametrize("kernel,stride,padding,dilation,k", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 3), (1, 1), (0, 0), (1, 1), 2),
    ((2, 3), (2, 1), (1, 2), (1, 1), 1),
    ((3, 3), (1, 2), (2, 2), (2, 2), 3),
])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_pool_taps_equals_conv_then_pool(kernel, stride, padding, dilation, k, relu):
    P, B, C, O, H, W = 3, 2, 6, 4, 9, 11  # odd sizes: the pool drops the last row/column
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    conv = nn.Conv2d(C, O, kernel, stride, padding, dilation).double()
    base = conv(x).detach()
    blocks = torch.tensor([0, 1, 0])[:P] if C // k > 1 else torch.zeros(P, dtype=torch.long)
    change = torch.randn(P, B, k, H, W, dtype=torch.float64)
    want = []
    for p in range(P):
        moved = x.clone()
        moved[:, blocks[p] * k:(blocks[p] + 1) * k] += change[p]
        out = F.max_pool2d(conv(moved), 2)
        want.append(out.relu() if relu else out)
    want = torch.stack(want).detach()
    xp = F.pad(change, (padding[1], padding[1], padding[0], padding[0]))
    weight = conv.weight.detach()
    wt = weight.reshape(O, C // k, -1).permute(1, 2, 0)[blocks].contiguous()
    got = conv_pool_taps(xp, pool_layout(base), wt, kernel, stride, dilation, relu)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def pooled_cnn():
    """Two conv -> ReLU -> 2x2 max-pool blocks (odd sizes after the first pool)."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 10)).double()


@pytest.mark.parametrize("relu", [False, True])
def test_conv_delta_pool_equals_moved_weight_conv_then_pool(relu):
    B, C, O, H, W = 3, 2, 4, 9, 7
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    conv = nn.Conv2d(C, O, 3, padding=1).double()
    local = torch.tensor([0, 17, 18, 71])
    want = []
    for i in local.tolist():
        moved = conv.weight.detach().clone().reshape(-1)
        moved[i] += 1e-2
        out = F.max_pool2d(F.conv2d(x, moved.reshape(conv.weight.shape), conv.bias, padding=1), 2)
        o = i // (C * 9)
        want.append((out.relu() if relu else out)[:, o:o + 1].detach())
    patches = conv_patches(conv, x, channel_major=True).view(C * 9, B, H, W)
    base_cm = conv(x).detach().transpose(0, 1)
    got = conv_delta_pool(window_major(patches), window_major(base_cm), local // (C * 9), local % (C * 9),
                          torch.tensor(1e-2, dtype=torch.float64), relu)
    assert torch.allclose(got[0], torch.stack(want), rtol=0, atol=1e-12)
    base = F.max_pool2d(conv(x), 2).detach()
    base = (base.relu() if relu else base)[:, local // (C * 9)].transpose(0, 1).unsqueeze(2)
    assert torch.equal(got[1], got[0] - base)  # the change, exactly as a separate subtraction gives it


def test_compiled_kernels_in_the_engine_equal_naive_loop(monkeypatch):
    """Forced on at this small size; chunks of different sizes share one compiled kernel."""
    monkeypatch.setattr(fused, "MIN_WORK_PER_COPY", 0)
    monkeypatch.setattr(fused, "MIN_CHANNEL_PER_COPY", 0)
    if not fused.kernels.enabled:
        pytest.skip("torch.compile disabled (DEEPZERO_ORACLE_COMPILE=0)")
    learner = pooled_cnn()
    x, y = torch.rand(6, 2, 10, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    oracle = ModuleOracle(learner, F.cross_entropy, max_batch=5).bind(x, y)
    assert set(oracle.fastpath.graph.relu_after) == set(oracle.fastpath.graph.pool_after)  # both blocks fuse
    theta, coords = oracle.theta(), torch.arange(oracle.dim)
    calls = []
    real = fused.Kernels.__call__
    monkeypatch.setattr(fused.Kernels, "__call__",
                        lambda self, fn, varying, *a: calls.append(
                            (fn, tuple(a[i].shape[d] for i, dims in varying.items() for d in dims)))
                        or real(self, fn, varying, *a))
    with warnings.catch_warnings():  # neither the compiler nor the self-check may give up
        warnings.filterwarnings("error", message=".*(fast path disabled|fused convolution kernels are off)")
        fast = oracle.coordinate_losses(theta, coords, 1e-3)
    assert fused.kernels.enabled and oracle.fastpath.graph is not None
    for kernel in (conv_pool_taps, conv_delta_pool):  # both kernels ran, on several chunk sizes
        assert len({p for fn, p in calls if fn is kernel}) > 1
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()
    unfused = ModuleOracle(learner, F.cross_entropy, fused_kernels=False).bind(x, y)
    assert torch.allclose(unfused.coordinate_losses(theta, coords, 1e-3), naive, rtol=0, atol=1e-12)


def test_without_a_compiler_the_library_ops_answer(monkeypatch):
    monkeypatch.setattr(fused, "MIN_WORK_PER_COPY", 0)
    monkeypatch.setattr(fused, "MIN_CHANNEL_PER_COPY", 0)
    broken = fused.Kernels()

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused.torch, "compile", lambda fn, **kw: no_compiler)
    monkeypatch.setattr(fused, "kernels", broken)
    learner = pooled_cnn()
    x, y = torch.rand(4, 2, 10, 10, dtype=torch.float64), torch.randint(0, 10, (4,))
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    coords = torch.arange(oracle.dim)
    with pytest.warns(UserWarning, match="fused convolution kernels are off"):
        fast = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert not broken.enabled
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12)


def test_small_work_skips_the_kernels():
    """Below the per-copy thresholds no compile happens: the decision is per copy, so every
    chunking takes the same path."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert not fused.fusable(conv, 6, torch.Size([6, 5, 5]), 1)
    assert fused.fusable(conv, 4096, torch.Size([6, 64, 64]), 1) == fused.kernels.enabled
    assert not fused.fusable_moved_weight(conv, "weight", torch.Size([6, 6, 5, 5]))
    assert not fused.fusable_moved_weight(conv, "bias", torch.Size([256, 6, 28, 28]))
