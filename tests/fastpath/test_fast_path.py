"""The structure-aware fast path must equal the naive loop: perturb one weight, run the whole
model, restore. float64, tight tolerance, every supported module kind."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import LocalBlackBox, ModuleOracle, NonFiniteLossError
from deepzero_oracle.fastpath.delta import conv_patches
from deepzero_oracle.fastpath.layers import normalise


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class Shared(nn.Module):
    """One Linear applied twice: the perturbation must act at both call sites."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.mid(h))
        return self.out(torch.tanh(self.mid(h)))


class Sequence(nn.Module):
    """A Linear on 3-D input [B, T, F], then a mean over T."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h = F.gelu(self.proj(x.reshape(x.shape[0], 8, 8)))
        return self.head(h.mean(1))


def models():
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
        "mlp_bn1d": nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)),
        "cnn_pool": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6, 10)),
        "cnn_strided_grouped": nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                                             nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(8 * 16, 10)),
        "cnn_bn": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(64, 10)),
        "resnet_block": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Residual(4),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)),
        "shared_module": Shared(),
        "linear_3d": Sequence(),
    }


def naive_coordinate_losses(learner, x, y, coords, mu, loss_fn=F.cross_entropy):
    """The reference: for each coordinate perturb the weight in place, run, restore."""
    learner = copy.deepcopy(learner)
    params = [p for p in learner.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    out = []
    for c in coords.tolist():
        theta = flat.clone()
        theta[c] += mu
        torch.nn.utils.vector_to_parameters(theta, params)
        with torch.no_grad():
            out.append(loss_fn(learner(x), y))
    return torch.stack(out)


def data(n=12):
    return torch.rand(n, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (n,))


ABLATIONS = {"all": {}, "no_delta_propagation": {"delta_propagation": False},
             "no_one_weight_delta": {"one_weight_delta": False}}


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_fast_path_equals_naive_loop(name, mode, ablation):
    learner = models()[name].double().train(mode == "train")
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy, **ABLATIONS[ablation]).bind(x, y)
    assert oracle.fallback_reason is None, oracle.fallback_reason
    theta = oracle.theta()
    coords = torch.arange(oracle.dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check must not have disabled the fast path
        fast = oracle.coordinate_losses(theta, coords, 1e-3)
    assert oracle.fastpath.graph is not None
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-3)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12), (fast - naive).abs().max()
    assert oracle.queries == oracle.dim


@pytest.mark.parametrize("name", ["cnn_bn", "resnet_block", "shared_module", "mlp_bn1d"])
def test_batched_thetas_equal_naive(name):
    learner = models()[name].double().train()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    thetas = oracle.theta() + 0.05 * torch.randn(7, oracle.dim, dtype=torch.float64)
    got = oracle.losses(thetas)
    want = []
    for t in thetas:
        copy_ = copy.deepcopy(learner)
        torch.nn.utils.vector_to_parameters(t, copy_.parameters())
        with torch.no_grad():
            want.append(F.cross_entropy(copy_(x), y))
    assert torch.allclose(got, torch.stack(want), rtol=0, atol=1e-12)


def test_train_mode_batchnorm_normalises_each_perturbation_alone_and_keeps_running_stats():
    learner = models()["cnn_bn"].double().train()
    x, y = data(16)
    bn = learner[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta = oracle.theta()
    # coordinates of the first conv: their perturbation flows through the train-mode BatchNorm
    coords = torch.arange(0, 36)
    fast = oracle.coordinate_losses(theta, coords, 1e-2)
    naive = naive_coordinate_losses(learner, x, y, coords, 1e-2)
    assert torch.allclose(fast, naive, rtol=0, atol=1e-12)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    oracle.end_step()
    assert not torch.equal(bn.running_mean, before[0])


def test_unsupported_modules_fall_back_and_stay_correct():
    learner = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10)).double()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    assert "LayerNorm" in oracle.fallback_reason
    coords = torch.arange(oracle.dim)
    fast = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert torch.allclose(fast, naive_coordinate_losses(learner, x, y, coords, 1e-3), rtol=0, atol=1e-12)


class HardCodedBatch(nn.Module):
    """Traces fine but bakes the batch size into a view: stacking rows would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(12, 128))


def test_self_check_catches_a_structure_the_fast_path_gets_wrong():
    learner = HardCodedBatch().double()
    x, y = data(12)
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    coords = torch.arange(oracle.dim)
    with pytest.warns(UserWarning, match="fast path disabled"):
        got = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert torch.allclose(got, naive_coordinate_losses(learner, x, y, coords, 1e-3), rtol=0, atol=1e-12)


def test_untraceable_learner_falls_back():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    learner = Branchy().double()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    assert "trace" in oracle.fallback_reason
    coords = torch.arange(oracle.dim)
    got = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert torch.allclose(got, naive_coordinate_losses(learner, x, y, coords, 1e-3), rtol=0, atol=1e-12)


class Twice(nn.Module):
    def forward(self, z):
        return 2 * z


def test_black_box_sees_stacked_rows_and_gives_the_same_losses():
    learner = models()["cnn_pool"].double()
    x, y = data()
    box = LocalBlackBox(lambda z: z * 2.0, numpy=True)
    oracle = ModuleOracle(learner, F.cross_entropy, blackbox=box).bind(x, y)
    coords = torch.arange(20)
    got = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert box.rows == 20 * len(x)
    scaled = nn.Sequential(learner, Twice())
    assert torch.allclose(got, naive_coordinate_losses(scaled, x, y, coords, 1e-3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_fn, shortcut", [
    (F.cross_entropy, True), (nn.CrossEntropyLoss(), True),
    (nn.CrossEntropyLoss(label_smoothing=0.1), False), (nn.CrossEntropyLoss(reduction="sum"), False),
    (nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2, 10, dtype=torch.float64)), False),
    (nn.CrossEntropyLoss(ignore_index=-100), True)])
def test_per_copy_cross_entropy_equals_the_loss_applied_to_each_copy(loss_fn, shortcut, monkeypatch):
    from deepzero_oracle import module_oracle
    used = []
    real = module_oracle.cross_entropy_per_copy
    monkeypatch.setattr(module_oracle, "cross_entropy_per_copy", lambda *a: used.append(1) or real(*a))
    learner = models()["cnn_pool"].double()
    x, y = data()
    coords = torch.arange(0, 332, 5)
    for targets in (y, torch.where(torch.arange(len(y)) == 0, -100, y)):  # -100: an ignored target
        used.clear()
        oracle = ModuleOracle(learner, loss_fn).bind(x, targets)
        got = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
        want = naive_coordinate_losses(learner, x, targets, coords, 1e-3, loss_fn)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
        assert bool(used) == (shortcut and bool((targets >= 0).all()))
    # a class index that is ignored: the loss skips those images, so no shortcut
    ignoring = nn.CrossEntropyLoss(ignore_index=int(y[0]))
    used.clear()
    oracle = ModuleOracle(learner, ignoring).bind(x, y)
    got = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    assert torch.allclose(got, naive_coordinate_losses(learner, x, y, coords, 1e-3, ignoring), rtol=0, atol=1e-12)
    assert not used


def test_nan_from_black_box_is_a_clear_error():
    learner = models()["mlp"].double()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy, blackbox=lambda z: z * float("nan")).bind(x, y)
    with pytest.raises(NonFiniteLossError, match="black box returned NaN/Inf"):
        oracle.loss(oracle.theta())


def test_query_without_data_and_mismatched_batch():
    oracle = ModuleOracle(models()["mlp"], F.cross_entropy)
    with pytest.raises(RuntimeError, match="bind"):
        oracle.loss(oracle.theta())
    with pytest.raises(ValueError, match="same number of rows"):
        oracle.bind(torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 2), ((2, 3), (2, 1), (1, 0), (1, 2)), (1, 1, 0, 1)])
def test_conv_patches_match_unfold(kernel, stride, padding, dilation):
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    expected = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(conv_patches(conv, x), expected)
    # a non-contiguous input (a view) gives the same patches
    wide = torch.randn(5, 3, 9, 16, dtype=torch.float64)
    assert torch.equal(conv_patches(conv, wide[..., ::2]), F.unfold(
        wide[..., ::2], conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride))


class _FunctionalInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x), inplace=True), 2)
        return self.fc(F.relu(h).flatten(1))


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 3)),
    _FunctionalInplace,
])
def test_inplace_relu_keeps_the_fast_path_exact(build):
    torch.manual_seed(0)
    learner = build().double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    fast = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta = fast.theta()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a self-check mismatch would warn
        got = fast.coordinate_losses(theta, torch.arange(fast.dim), 1e-3)
    assert fast.fastpath.graph is not None and fast.fallback_reason is None
    want = ModuleOracle(learner, F.cross_entropy, fast=False).bind(x, y).coordinate_losses(
        theta, torch.arange(fast.dim), 1e-3)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # the learner itself is untouched
    assert all(m.inplace for m in learner.modules() if isinstance(m, nn.ReLU))


def test_features_follow_the_bound_batch():
    """The base forward is kept per theta and batch: a new batch, or the bound one changed in
    place, is never answered from the old one's features."""
    learner = models()["cnn_bn"].double().eval()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta, coords = oracle.theta(), torch.arange(0, oracle.dim, 7)
    oracle.coordinate_losses(theta, coords, 1e-3)
    other = torch.rand_like(x)
    got = oracle.bind(other, y).coordinate_losses(theta, coords, 1e-3)
    assert torch.allclose(got, naive_coordinate_losses(learner, other, y, coords, 1e-3), rtol=0, atol=1e-12)
    other.mul_(0.5)  # the same tensor object, new values
    got = oracle.bind(other, y).coordinate_losses(theta, coords, 1e-3)
    assert torch.allclose(got, naive_coordinate_losses(learner, other, y, coords, 1e-3), rtol=0, atol=1e-12)


def test_pickling_drops_the_features_and_keeps_the_answers():
    learner = models()["resnet_block"].double().train()
    x, y = data()
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta = oracle.theta()
    unqueried = pickle.dumps(oracle.fastpath)
    oracle.losses(theta + 0.01 * torch.randn(3, oracle.dim, dtype=torch.float64))  # builds features
    assert pickle.dumps(oracle.fastpath) == unqueried  # per-theta activations never travel
    coords = torch.arange(oracle.dim)
    want = oracle.coordinate_losses(theta, coords, 1e-3)
    clone = pickle.loads(pickle.dumps(oracle))
    assert clone.fallback_reason is None and clone.fastpath.graph is not None
    assert torch.equal(clone.coordinate_losses(theta, coords, 1e-3), want)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_normalise_gives_each_copy_its_own_channels_statistics(mode):
    """Copies stacked as P*B rows, each holding different channels of the BatchNorm: each copy
    is normalised as the BatchNorm normalises those channels of that copy alone."""
    bn = nn.BatchNorm2d(5).double().train(mode == "train")
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    P, B = 3, 4
    channels = torch.tensor([[0, 1], [3, 4], [2, 0]])
    x = torch.randn(P * B, 2, 6, 6, dtype=torch.float64)
    got = normalise(bn, x, P, channels)
    for p in range(P):
        full = torch.zeros(B, 5, 6, 6, dtype=torch.float64)
        full[:, channels[p]] = x[p * B:(p + 1) * B]
        plain = nn.BatchNorm2d(5, affine=False).double().train(mode == "train")
        plain.load_state_dict({k: v for k, v in bn.state_dict().items() if k.startswith(("running", "num"))})
        with torch.no_grad():
            want = plain(full)[:, channels[p]]
        assert torch.allclose(got[p * B:(p + 1) * B], want, rtol=0, atol=1e-12)
