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
from deepzero_oracle.fastpath.graph import GraphForward

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
    heads = []
    real_head = GraphForward._linear_of_channels_last
    monkeypatch.setattr(GraphForward, "_linear_of_channels_last",
                        lambda self, node, x, params: heads.append(x.shape) or real_head(self, node, x, params))
    with warnings.catch_warnings():  # neither the compiler nor the self-check may give up
        warnings.filterwarnings("error", message=".*(fast path disabled|fused convolution kernels are off)")
        fast = oracle.coordinate_losses(theta, coords, 1e-3)
    assert fused.kernels.enabled and oracle.fastpath.graph is not None
    for kernel in (conv_pool_taps, conv_delta_pool):  # both kernels ran, on several chunk sizes
        assert len({p for fn, p in calls if fn is kernel}) > 1
    assert heads  # the second block's kernel handed the head channels-last rows, read without a copy
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


@pytest.mark.parametrize("batch_statistics", [True, False])
@pytest.mark.parametrize("other", [None, "shared", "stacked"])
def test_norm_act_equals_batch_norm_then_add_then_relu(batch_statistics, other):
    """The fused BatchNorm (-> add) -> ReLU kernel against the library ops, per copy, float64."""
    if not fused.kernels.enabled:
        pytest.skip("torch.compile disabled (DEEPZERO_ORACLE_COMPILE=0)")
    P, B, C, H, W = 3, 4, 5, 6, 7
    m = nn.BatchNorm2d(C).double().train(batch_statistics)
    m.running_mean.uniform_(-0.5, 0.5)
    m.running_var.uniform_(0.5, 2.0)
    weight, bias = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    x = torch.randn(P * B, C, H, W, dtype=torch.float64)
    add = {None: None, "shared": torch.randn(B, C, H, W, dtype=torch.float64),
           "stacked": torch.randn(P * B, C, H, W, dtype=torch.float64)}[other]
    want = []
    for p in range(P):
        rows = slice(p * B, (p + 1) * B)
        y = F.batch_norm(x[rows], None if batch_statistics else m.running_mean,
                         None if batch_statistics else m.running_var, weight, bias, batch_statistics, 0.0, m.eps)
        if add is not None:
            y = y + (add if other == "shared" else add[rows])
        want.append(y.relu())
    got = fused.norm_act(m, x, P, weight, bias, add, batch_statistics)
    assert torch.allclose(got, torch.cat(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_norms_in_a_resnet_equal_naive_loop(monkeypatch, mode, shortcut):
    """BatchNorm -> ReLU and BatchNorm -> residual add -> ReLU run fused on the stacked copies
    of a ResNet (forced on at this small size), float64 against the naive loop."""
    from deepzero_oracle.common.models import resnet

    monkeypatch.setattr(fused, "MIN_NORM_PER_COPY", 0)
    if not fused.kernels.enabled:
        pytest.skip("torch.compile disabled (DEEPZERO_ORACLE_COMPILE=0)")
    learner = resnet((3, 6, 6), 10, 1, widths=(2, 4, 8), shortcut=shortcut).double().train(mode == "train")
    for m in learner.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x, y = torch.rand(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (5,))
    oracle = ModuleOracle(learner, F.cross_entropy, max_batch=3).bind(x, y)
    graph = oracle.fastpath.graph
    assert any(add is None for add, _ in graph.norm_then.values())  # both patterns are present
    assert any(add is not None for add, _ in graph.norm_then.values())
    calls = []
    real = fused.Kernels.__call__
    monkeypatch.setattr(fused.Kernels, "__call__", lambda self, fn, varying, *a: calls.append(fn)
                        or real(self, fn, varying, *a))
    theta, coords = oracle.theta(), torch.arange(oracle.dim)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(fast path disabled|fused convolution kernels are off)")
        fast = oracle.coordinate_losses(theta, coords, 1e-3)
    assert oracle.fastpath.graph is not None
    kernels_run = {fused.norm_relu, fused.norm_add_relu} if mode == "train" else {fused.affine_relu,
                                                                                  fused.affine_add_relu}
    assert kernels_run <= set(calls)
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()


class _FlattenThenLinear(nn.Module):
    """conv -> ReLU -> 2x2 max-pool, twice, then a flatten spelled ``spelling`` and a Linear."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.features = pooled_cnn()[:6]
        self.flatten = nn.Flatten()
        self.head = nn.Linear(6 * 2 * 2, 10).double()

    def forward(self, x):
        h = self.features(x)
        if self.spelling == "module":
            h = self.flatten(h)
        elif self.spelling == "function":
            h = torch.flatten(h, 1)
        else:
            h = h.flatten(1)
        return self.head(h)


@pytest.mark.parametrize("spelling", ["module", "function", "method"])
def test_a_channels_last_value_reaches_the_linear_head_without_a_copy(monkeypatch, spelling):
    """flatten -> Linear reads a channels-last stacked value as it is, the weight permuted to
    (H, W, C) order: float64 against the naive loop, for each way of writing the flatten."""
    monkeypatch.setattr(fused, "MIN_WORK_PER_COPY", 0)
    monkeypatch.setattr(fused, "MIN_CHANNEL_PER_COPY", 0)
    if not fused.kernels.enabled:
        pytest.skip("torch.compile disabled (DEEPZERO_ORACLE_COMPILE=0)")
    learner = _FlattenThenLinear(spelling)
    x, y = torch.rand(6, 2, 10, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    oracle = ModuleOracle(learner, F.cross_entropy, max_batch=5).bind(x, y)
    assert len(oracle.fastpath.graph.flat_linear) == 1
    heads = []
    real_head = GraphForward._linear_of_channels_last
    monkeypatch.setattr(GraphForward, "_linear_of_channels_last",
                        lambda self, node, x, params: heads.append(x.shape) or real_head(self, node, x, params))
    theta, coords = oracle.theta(), torch.arange(oracle.dim)
    fast = oracle.coordinate_losses(theta, coords, 1e-3)
    assert heads and oracle.fastpath.graph is not None
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 2)])
def test_cropped_conv_before_a_pool_equals_naive_loop(monkeypatch, stride, padding):
    """A stacked convolution whose output has an odd side computes only what the 2x2 max-pool
    after it reads (float64, against the naive loop)."""
    from deepzero_oracle.fastpath.graph import GraphForward

    learner = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(4, 5, 3, stride=stride, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(5, 10)).double()  # 13x11 -> 6x5 -> 3x2 -> 1x1
    x, y = torch.rand(4, 1, 13, 11, dtype=torch.float64), torch.randint(0, 10, (4,))
    cropped = []
    real = GraphForward._cropped_conv
    monkeypatch.setattr(GraphForward, "_cropped_conv",
                        lambda self, node, xs, params: cropped.append(xs.shape) or real(self, node, xs, params))
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    coords = torch.arange(oracle.dim)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fast path disabled")
        fast = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert oracle.fastpath.graph is not None and cropped  # the cut convolution ran
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()
