"""The fast path on residual networks must equal the naive loop (perturb one weight, run the
whole model, restore), in float64: ResNet-8 in train and eval mode with both shortcuts, and
each rule it relies on (sums of Deltas, global average pooling, the option-A shortcut's
subsample and channel pad) against the dense computation."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import ModuleOracle
from deepzero_oracle.common.models import resnet, resnet8, resnet20
from deepzero_oracle.fastpath.delta import Delta, add_copies, propagate_call

from test_fast_path import naive_coordinate_losses


def randomise_running_stats(learner: nn.Module) -> nn.Module:
    """Eval mode must use running statistics that are not the identity."""
    for m in learner.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return learner


def assert_fast_equals_naive(learner, x, y, coords, mu=1e-3, **options):
    oracle = ModuleOracle(learner, F.cross_entropy, **options).bind(x, y)
    assert oracle.fallback_reason is None, oracle.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check must not have disabled the fast path
        fast = oracle.coordinate_losses(oracle.theta(), coords, mu)
    assert oracle.fastpath.graph is not None
    naive = naive_coordinate_losses(learner, x, y, coords, mu)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()


def sampled_coordinates(learner: nn.Module, random_per_tensor: int = 1) -> torch.Tensor:
    """The first and last coordinate of every parameter tensor and a few random ones: every
    module kind is moved, weights and biases alike."""
    offset, coords = 0, []
    for p in learner.parameters():
        coords += [offset, offset + p.numel() - 1]
        coords += (offset + torch.randint(p.numel(), (random_per_tensor,))).tolist()
        offset += p.numel()
    return torch.tensor(sorted(set(coords)))


def narrow_resnet8(shortcut: str, mode: str) -> nn.Module:
    """ResNet-8's layout at widths 2/4/8, float64."""
    learner = randomise_running_stats(resnet((3, 6, 6), 10, 1, widths=(2, 4, 8), shortcut=shortcut))
    return learner.double().train(mode == "train")


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("ablation", [{}, {"delta_propagation": False}])
def test_narrow_resnet8(shortcut, mode, ablation):
    learner = narrow_resnet8(shortcut, mode)
    x, y = torch.rand(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (5,))
    assert_fast_equals_naive(learner, x, y, sampled_coordinates(learner, 3), **ablation)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_narrow_resnet8_every_coordinate(mode):
    learner = narrow_resnet8("A", mode)
    x, y = torch.rand(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (5,))
    dim = sum(p.numel() for p in learner.parameters())
    assert_fast_equals_naive(learner, x, y, torch.arange(dim))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zoo_resnet8_sampled_coordinates(mode):
    """The zoo's ResNet-8 (16/32/64 channels, shortcut A) on small images."""
    learner = randomise_running_stats(resnet8((3, 8, 8), 10)).double().train(mode == "train")
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    assert_fast_equals_naive(learner, x, y, sampled_coordinates(learner))


def test_zoo_resnets_have_the_cifar_sizes():
    assert sum(p.numel() for p in resnet20().parameters()) == 269_722
    assert sum(p.numel() for p in resnet8().parameters()) == 75_290
    assert resnet20()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        resnet8(shortcut="C")


def _delta(P=3, B=2, C=5, S=(4, 4), k=1, dtype=torch.float64):
    base = torch.randn(B, C, *S, dtype=dtype)
    index = torch.tensor([0, 2, 4][:P]) // k
    return base, Delta(index, torch.randn(P, B, k, *S, dtype=dtype))


def _dense(value, base):
    return value.dense(base) if isinstance(value, Delta) else value


@pytest.mark.parametrize("kinds", [("delta", None), (None, "delta"), ("delta", "same delta"),
                                   ("stacked", None), ("stacked", "delta"), ("delta", "stacked"),
                                   ("stacked", "stacked")])
def test_sum_of_copies_equals_the_dense_sum(kinds):
    base_a, delta = _delta()
    base_b, other = _delta()
    P = len(delta.index)
    operands = {"delta": delta, "same delta": Delta(delta.index, other.values), None: None,
                "stacked": torch.randn(P * len(base_a), *base_a.shape[1:], dtype=torch.float64)}
    a, b = (operands[k] for k in kinds)
    got = add_copies(a, b, base_a, base_b)
    want = (_dense(a, base_a) if a is not None else base_a.repeat(P, 1, 1, 1)) + (
        _dense(b, base_b) if b is not None else base_b.repeat(P, 1, 1, 1))
    if "stacked" not in kinds:
        assert isinstance(got, Delta)  # the sum keeps the change in its block
    assert torch.allclose(_dense(got, base_a + base_b), want, rtol=0, atol=1e-12)


def test_sum_without_a_rule_is_left_to_the_caller():
    base, delta = _delta()
    shifted = Delta(delta.index.flip(0), delta.values)
    assert add_copies(delta, shifted, base, base) is None  # different blocks
    assert add_copies(delta, None, base, base[:, :1]) is None  # broadcasting


@pytest.mark.parametrize("call", [
    (F.adaptive_avg_pool2d, (1,), {}),
    (F.avg_pool2d, (2,), {}),
    (__import__("operator").getitem, ((slice(None), slice(None), slice(None, None, 2), slice(None, None, 2)),), {}),
    (F.pad, ((0, 0, 0, 0, 3, 2),), {"mode": "constant", "value": None}),
    (F.pad, ((1, 1, 0, 2, 2, 2),), {"mode": "constant", "value": 0.5}),
])
def test_delta_through_pooling_and_shortcut_a_equals_dense(call):
    target, args, kwargs = call
    base, delta = _delta(S=(5, 5))
    got = propagate_call(target, delta, args, kwargs, method=False)
    assert isinstance(got, Delta)
    out_base = target(base, *args, **kwargs)
    assert torch.allclose(got.dense(out_base), target(delta.dense(base), *args, **kwargs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("call", [
    (F.pad, ((0, 0, 0, 0, 1, 1),), {}),  # shifts 2-channel blocks by one channel
    (F.pad, ((1, 1, 1, 1),), {"mode": "reflect"}),
    (__import__("operator").getitem, ((slice(None), slice(0, 1)),), {}),  # cuts channels
    (__import__("operator").getitem, ((Ellipsis, 0),), {}),
])
def test_shortcut_rules_decline_what_they_cannot_keep_in_a_block(call):
    target, args, kwargs = call
    _, delta = _delta(k=2, C=6)
    assert propagate_call(target, delta, args, kwargs, method=False) is None


class OddResidual(nn.Module):
    """Sums and shortcuts the Delta rules decline: broadcasting, an alpha, reflect padding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = h + h.mean(dim=(2, 3), keepdim=True)  # broadcast
        h = torch.add(h, F.pad(h, (1, 1, 1, 1), mode="reflect")[..., 1:-1, 1:-1], alpha=0.5)
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sums_without_a_rule_densify_and_stay_exact(mode):
    learner = randomise_running_stats(OddResidual()).double().train(mode == "train")
    x, y = torch.rand(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (4,))
    dim = sum(p.numel() for p in learner.parameters())
    assert_fast_equals_naive(learner, x, y, torch.arange(dim))
