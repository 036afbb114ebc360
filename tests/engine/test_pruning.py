import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import RGE, CallableOracle, ModuleOracle
from deepzero_oracle.apps.classify import Recipe, train_classifier
from deepzero_oracle.theta import ParamSlot
from deepzero_oracle.pruning import (global_sparsity, is_bias_or_norm, load_ratios, random_mask, random_ratios,
                                     ratios_from_scores, save_ratios, uniform_ratios, zo_grasp_scores)


def slots_of(sizes):
    out, offset = [], 0
    for i, n in enumerate(sizes):
        out.append(ParamSlot(f"l{i}.weight", f"l{i}", "weight", offset, torch.Size([n]), n))
        offset += n
    return out


SLOTS = slots_of([10, 300, 2000, 50, 640])


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_ratios_meet_the_global_target(sparsity):
    dim = sum(s.numel for s in SLOTS)
    scores = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    for ratios in (ratios_from_scores(SLOTS, scores, sparsity),
                   random_ratios(SLOTS, sparsity, torch.Generator().manual_seed(1)),
                   uniform_ratios(SLOTS, sparsity)):
        assert global_sparsity(SLOTS, ratios) == pytest.approx(sparsity, abs=1e-3)
        assert all(0.0 <= r <= 1.0 for r in ratios.values())
        mask = random_mask(SLOTS, ratios, torch.Generator().manual_seed(2))
        assert 1 - mask.float().mean().item() == pytest.approx(sparsity, abs=0.01)


def test_highest_scores_are_pruned_first():
    scores = torch.zeros(sum(s.numel for s in SLOTS))
    big = SLOTS[2]
    scores[big.offset : big.offset + big.numel] = 1.0  # the 2000-tensor scores highest
    ratios = ratios_from_scores(SLOTS, scores, 0.5)  # 1,500 of 3,000 pruned, all from l2
    assert ratios["l2.weight"] == 0.75
    assert all(r == 0.0 for n, r in ratios.items() if n != "l2.weight")


def test_exempt_tensors_stay_dense():
    exempt = {"l0.weight", "l3.weight"}
    for ratios in (ratios_from_scores(SLOTS, torch.randn(3000), 0.9, exempt),
                   random_ratios(SLOTS, 0.9, None, exempt), uniform_ratios(SLOTS, 0.9, exempt)):
        assert ratios["l0.weight"] == 0.0 and ratios["l3.weight"] == 0.0
    learner = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    flags = [is_bias_or_norm(s, learner) for s in ModuleOracle(learner, F.mse_loss).slots]
    assert flags == [False, True, True, True]


def test_save_and_load_round_trip(tmp_path):
    ratios = random_ratios(SLOTS, 0.9, torch.Generator().manual_seed(0))
    save_ratios(tmp_path / "r.json", ratios, pruner="random")
    assert load_ratios(tmp_path / "r.json") == ratios
    (tmp_path / "bad.json").write_text('{"ratios": {"a": 1.5}}')
    with pytest.raises(ValueError, match="ratio of a must lie in"):
        load_ratios(tmp_path / "bad.json")


def test_zo_grasp_uses_the_same_directions_for_both_estimates():
    # On a quadratic with shared directions U, (g(theta + mu g0) - g0) / mu = (U^T U / q) A g0
    # exactly: the mu/2 u^T A u terms cancel. Fresh directions would leave them in.
    d, q = 6, 5
    A = torch.randn(d, d, dtype=torch.float64)
    A = A @ A.T
    oracle = CallableOracle(lambda t: 0.5 * t @ A @ t, dim=d)
    theta = torch.randn(d, dtype=torch.float64)
    rge = RGE(q=q, mu=1e-2)
    scores = zo_grasp_scores(oracle, theta, rge, torch.Generator().manual_seed(3))
    U = rge.directions(theta, None, torch.Generator().manual_seed(3)).matrix()
    g0 = rge.estimate(oracle, theta, directions=U)
    assert torch.allclose(scores, -theta * ((U.T @ U / q) @ (A @ g0)), atol=1e-8)
    assert oracle.queries == 2 * (q + 1) + (q + 1)


def test_zo_grasp_ratios_differ_from_uniform_on_a_cnn(tmp_path):
    recipe = Recipe(dataset="digits", model="cnn", estimator="cge", sparsity=0.9, pruner="zo-grasp", epochs=1,
                    batch_size=256)
    metrics = train_classifier(recipe, tmp_path, progress=False)
    ratios = load_ratios(tmp_path / "ratios.json")
    assert len(set(round(r, 3) for r in ratios.values())) > 2  # not one shared ratio
    assert metrics["queries"] > 2 * 193  # ZO-GraSP's queries are counted
