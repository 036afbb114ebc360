import numpy as np
import pytest
import torch

from deepzero_oracle import CallableOracle, NonFiniteLossError, QueryBudgetExceeded


def quadratic(theta):
    return (theta**2).sum() + theta[0]


def test_losses_count_queries_and_match_function():
    oracle = CallableOracle(quadratic, dim=3)
    thetas = torch.randn(5, 3, dtype=torch.float64)
    out = oracle.losses(thetas)
    assert out.shape == (5,)
    assert torch.allclose(out, torch.stack([quadratic(t) for t in thetas]))
    assert oracle.queries == 5
    oracle.loss(thetas[0])
    assert oracle.queries == 6


def test_coordinate_and_direction_losses():
    oracle = CallableOracle(quadratic, dim=4)
    theta = torch.randn(4, dtype=torch.float64)
    coords = torch.tensor([3, 0])
    got = oracle.coordinate_losses(theta, coords, 0.1)
    want = []
    for c in coords:
        t = theta.clone()
        t[c] += 0.1
        want.append(quadratic(t))
    assert torch.allclose(got, torch.stack(want))
    dirs = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(oracle.direction_losses(theta, dirs, -0.2),
                          torch.stack([quadratic(theta - 0.2 * d) for d in dirs]))
    assert oracle.queries == 5


def test_batched_numpy_function_and_chunking():
    calls = []

    def fn(thetas):
        calls.append(len(thetas))
        assert isinstance(thetas, np.ndarray)
        return (thetas**2).sum(axis=1)

    oracle = CallableOracle(fn, dim=2, batched=True, numpy=True, max_batch=4)
    out = oracle.losses(torch.ones(10, 2, dtype=torch.float64))
    assert torch.allclose(out, torch.full((10,), 2.0, dtype=torch.float64))
    assert calls == [4, 4, 2]


def test_budget_exceeded_is_clear_and_spends_nothing():
    oracle = CallableOracle(quadratic, dim=2, budget=3)
    oracle.losses(torch.zeros(2, 2))
    with pytest.raises(QueryBudgetExceeded, match="needs 2 queries but only 1 of the budget of 3"):
        oracle.losses(torch.zeros(2, 2))
    assert oracle.queries == 2


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 2), torch.zeros(())])
def test_wrong_theta_shape(bad):
    oracle = CallableOracle(quadratic, dim=2)
    with pytest.raises(ValueError, match=r"theta shaped \[2\]"):
        oracle.loss(bad)


def test_coordinate_out_of_range():
    oracle = CallableOracle(quadratic, dim=2)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        oracle.coordinate_losses(torch.zeros(2), [0, 2], 0.1)


def test_nan_loss_is_reported():
    oracle = CallableOracle(lambda t: t.sum() / 0.0 * 0.0, dim=2)
    with pytest.raises(NonFiniteLossError, match="NaN or Inf"):
        oracle.loss(torch.ones(2))


def test_autograd_gradient_of_callable():
    oracle = CallableOracle(quadratic, dim=3)
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(oracle.autograd_gradient(theta), 2 * theta + torch.tensor([1.0, 0, 0], dtype=torch.float64))
