import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, RGE, CallableOracle
from deepzero_oracle.estimators import Directions
from deepzero_oracle.diagnostics import compare_to_autograd


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))


def test_central_cge_matches_autograd_on_small_cnn():
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    report = compare_to_autograd(small_cnn(), CGE(mu=1e-5, difference="central"),
                                 data=(x, y), loss_fn=F.cross_entropy)
    assert report["cosine"] >= 0.999
    assert report["relative_error"] < 1e-4
    assert report["queries"] == 2 * report["coordinates"]


def test_forward_cge_query_counts_with_and_without_mask():
    A = torch.randn(6, 6, dtype=torch.float64)
    oracle = CallableOracle(lambda t: t @ A @ t, dim=6)
    theta = torch.randn(6, dtype=torch.float64)
    g = CGE(mu=1e-6).estimate(oracle, theta)
    assert oracle.queries == 7
    assert torch.allclose(g, (A + A.T) @ theta, atol=1e-4)
    mask = torch.tensor([True, False, True, False, False, True])
    g = CGE(mu=1e-6).estimate(oracle, theta, mask=mask)
    assert oracle.queries == 7 + 4
    assert torch.all(g[~mask] == 0)
    assert torch.allclose(g[mask], ((A + A.T) @ theta)[mask], atol=1e-4)
    CGE(difference="central").estimate(oracle, theta, mask=mask)
    assert oracle.queries == 11 + 6


def test_bad_mask_is_rejected():
    oracle = CallableOracle(lambda t: t.sum(), dim=3)
    with pytest.raises(ValueError, match="boolean tensor shaped"):
        CGE().estimate(oracle, torch.zeros(3), mask=torch.ones(3))


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_rge_is_unbiased_on_a_quadratic(distribution, antithetic):
    # For a quadratic, E[g_RGE] equals the true gradient exactly (odd moments of u vanish),
    # so the sample mean must sit within a few standard errors of it.
    d = 5
    A = torch.randn(d, d, dtype=torch.float64)
    A = A @ A.T
    b = torch.randn(d, dtype=torch.float64)
    oracle = CallableOracle(lambda t: 0.5 * t @ A @ t + b @ t, dim=d)
    theta = torch.randn(d, dtype=torch.float64)
    truth = A @ theta + b
    rge = RGE(q=4, mu=0.05, distribution=distribution, antithetic=antithetic)
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([rge.estimate(oracle, theta, generator=gen) for _ in range(3000)])
    mean, se = samples.mean(0), samples.std(0) / 3000**0.5
    assert torch.all((mean - truth).abs() < 5 * se + 1e-9), (mean, truth, se)
    assert oracle.queries == 3000 * rge.queries_per_estimate(oracle)


def test_rge_respects_mask_and_shared_directions():
    oracle = CallableOracle(lambda t: (t**2).sum(), dim=4)
    theta = torch.ones(4, dtype=torch.float64)
    mask = torch.tensor([True, True, False, False])
    rge = RGE(q=8, mu=1e-3, distribution="sphere")
    dirs = rge.directions(theta, mask, torch.Generator().manual_seed(0)).matrix()
    assert torch.all(dirs[:, ~mask] == 0)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(8, dtype=torch.float64))
    g1 = rge.estimate(oracle, theta, mask=mask, directions=dirs)
    g2 = rge.estimate(oracle, theta, mask=mask, directions=dirs)
    assert torch.equal(g1, g2) and torch.all(g1[~mask] == 0)


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_directions_make_any_row_range_without_the_rows_before_it(distribution):
    coords = torch.tensor([0, 3, 4, 9])
    recipe = Directions(seed=11, q=37, dim=10, dtype=torch.float64, distribution=distribution,
                        coords=coords)
    full = recipe.matrix()
    assert full.shape == (37, 10) and full.dtype == torch.float64
    assert torch.all(full[:, [1, 2, 5, 6, 7, 8]] == 0) and torch.all(full[:, coords] != 0)
    if distribution == "sphere":
        assert torch.allclose(full.norm(dim=1), torch.ones(37, dtype=torch.float64))
    for start, stop in [(0, 0), (0, 5), (5, 16), (15, 17), (20, 37), (36, 37)]:
        assert torch.equal(recipe.rows(start, stop), full[start:stop])
    with pytest.raises(IndexError):
        recipe.rows(30, 38)


def test_rge_directions_come_from_the_generator():
    theta = torch.zeros(50)
    rge = RGE(q=20)
    first = rge.directions(theta, None, torch.Generator().manual_seed(0))
    again = rge.directions(theta, None, torch.Generator().manual_seed(0))
    other = rge.directions(theta, None, torch.Generator().manual_seed(1))
    assert torch.equal(first.matrix(), again.matrix())
    assert not torch.equal(first.matrix(), other.matrix())
    # rows are N(0, 1): mean and variance of 1,000 draws
    values = first.matrix()
    assert abs(float(values.mean())) < 0.15 and abs(float(values.var()) - 1) < 0.15


def test_estimator_arguments_are_checked():
    with pytest.raises(ValueError, match="mu must be positive"):
        CGE(mu=0)
    with pytest.raises(ValueError, match="forward' or 'central"):
        CGE(difference="backward")
    with pytest.raises(ValueError, match="gaussian' or 'sphere"):
        RGE(distribution="uniform")
