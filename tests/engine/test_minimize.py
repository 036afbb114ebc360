"""Plain functions: the Trainer over a CallableOracle on tensors the user owns, and minimize."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepzero_oracle import (CGE, RGE, BlackBoxError, CallableOracle, MinimizeResult, NonFiniteLossError,
                             ParallelOracle, StopTraining, TensorBatches, Trainer, minimize)
from deepzero_oracle.train import Callback

TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5], dtype=torch.float64)


def bowl(theta):
    """A shifted quadratic bowl of a torch vector [5]."""
    return ((theta - TARGET) ** 2).sum()


def rosen(x: np.ndarray) -> float:
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


class Counted:
    """f with a count of its calls (what the black box really saw)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, *batch):
        self.calls += 1
        return self.fn(x, *batch)


# -- the Trainer over a CallableOracle ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["parameter", "plain tensor", "parallel"])
def test_trainer_over_a_callable_oracle_converges(kind):
    x = nn.Parameter(torch.zeros(5, dtype=torch.float64)) if kind == "parameter" else torch.zeros(5, dtype=torch.float64)
    oracle = CallableOracle(bowl, dim=5)
    if kind == "parallel":
        oracle = ParallelOracle(oracle, chunk_size=2, block=1)
    trainer = Trainer(oracle, CGE(mu=1e-7), torch.optim.Adam([x], lr=0.1), progress=False, eval_every=100,
                      evaluate=lambda theta: {"distance": float((theta - TARGET).norm())})
    trainer.fit(max_steps=300)
    assert trainer.params[0] is x  # theta lives in the user's tensor, moved in place
    assert torch.allclose(x.detach(), TARGET, atol=1e-4)
    assert oracle.queries == 300 * 6 and trainer.step == 300
    distances = [row["distance"] for row in trainer.history]  # evaluate(theta [dim]) before and every 100 steps
    assert [row["step"] for row in trainer.history] == [0, 100, 200, 300]
    assert distances[0] == pytest.approx(float(TARGET.norm())) and distances[-1] < 1e-4


def test_trainer_writes_cge_estimate_which_matches_the_analytic_gradient():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = A @ A.T + torch.eye(4, dtype=torch.float64)

    def f(t):
        return 0.5 * t @ A @ t + torch.exp(0.3 * t).sum()

    start = torch.randn(4, generator=g, dtype=torch.float64)
    x = start.clone()
    mu = 1e-6
    Trainer(CallableOracle(f, dim=4), CGE(mu=mu), torch.optim.SGD([x], lr=0.25), progress=False).fit(max_steps=1)
    want = CGE(mu=mu).estimate(CallableOracle(f, dim=4), start)
    assert torch.equal(x.grad, want)
    assert torch.equal(x, start - 0.25 * want)
    analytic = A @ start + 0.3 * torch.exp(0.3 * start)
    # forward differences: error <= mu/2 * max second derivative along a coordinate, plus rounding
    curvature = (A.diagonal() + 0.09 * torch.exp(0.3 * (start.abs() + mu))).max()
    assert (want - analytic).abs().max() <= mu / 2 * curvature + 1e-8
    assert (want - analytic).abs().max() > 0  # it is an estimate, not the autograd gradient


def test_trainer_takes_several_tensors_and_params_argument():
    a, b = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    other = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a, b, other], lr=0.1)
    with pytest.raises(ValueError, match=r"holds 12 numbers but the oracle's theta has dim=5; give params="):
        Trainer(CallableOracle(bowl, dim=5), CGE(mu=1e-7), opt, progress=False)
    trainer = Trainer(CallableOracle(bowl, dim=5), CGE(mu=1e-7), opt, params=[a, b], progress=False)
    trainer.fit(max_steps=300)
    assert torch.allclose(torch.cat([a, b]), TARGET, atol=1e-4)
    assert torch.equal(other.detach(), torch.zeros(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not hold all of the tensors given as params="):
        Trainer(CallableOracle(bowl, dim=5), CGE(), torch.optim.Adam([a], lr=0.1), params=[a, b])
    with pytest.raises(TypeError, match="floating-point"):
        Trainer(CallableOracle(bowl, dim=5), CGE(), torch.optim.SGD([a], lr=0.1),
                params=[torch.zeros(5, dtype=torch.long)])


def test_trainer_refuses_params_for_a_learner_and_epochs_without_batches():
    import torch.nn.functional as F

    from deepzero_oracle import ModuleOracle
    learner = nn.Linear(2, 2)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="params= is for oracles without a learner"):
        Trainer(ModuleOracle(learner, F.cross_entropy), CGE(), opt, params=list(learner.parameters()))
    x = torch.zeros(5, dtype=torch.float64)
    trainer = Trainer(CallableOracle(bowl, dim=5), CGE(), torch.optim.SGD([x], lr=0.1), progress=False)
    with pytest.raises(ValueError, match="without batches give max_steps= or max_queries="):
        trainer.fit(epochs=2)
    with pytest.raises(ValueError, match="give max_steps= or max_queries="):
        trainer.fit()


def test_trainer_binds_each_batch_to_a_function_of_data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64)
    w_true = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    y = X @ w_true
    seen = []

    def mse(w, xb, yb):
        seen.append(len(xb))
        return ((xb @ w - yb) ** 2).mean()

    w = torch.zeros(3, dtype=torch.float64)
    trainer = Trainer(CallableOracle(mse, dim=3), CGE(mu=1e-7), torch.optim.Adam([w], lr=0.05), progress=False)
    trainer.fit(TensorBatches(X, y, batch_size=16), epochs=40)
    assert set(seen) == {16} and trainer.step == 40 * 4
    assert torch.allclose(w, w_true, atol=1e-2)


def test_checkpoint_resume_with_a_callable_oracle_is_bit_identical(tmp_path):
    def run(out_dir, steps, init):
        x = nn.Parameter(torch.full((5,), init, dtype=torch.float64))
        oracle = CallableOracle(bowl, dim=5)
        opt = torch.optim.Adam([x], lr=0.05)
        trainer = Trainer(oracle, RGE(q=3, mu=1e-4), opt, out_dir=out_dir, seed=3, progress=False,
                          scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, 0.5), scheduler_interval="step")
        trainer.fit(max_steps=steps)
        return x, trainer

    straight, full = run(None, 20, 0.0)
    run(tmp_path, 8, 0.0)  # interrupted after 8 steps
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8 and "learner" not in state and len(state["params"]) == 1
    resumed, again = run(tmp_path, 20, 7.0)  # a different start: everything must come from disk
    assert torch.equal(resumed, straight)
    assert again.oracle.queries == full.oracle.queries == 20 * 4
    assert not torch.equal(straight.detach(), torch.zeros(5, dtype=torch.float64))


def test_a_callback_can_stop_training_cleanly(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, trainer, metrics):
            if metrics["step"] == 4:
                raise StopTraining("enough")

    x = torch.zeros(5, dtype=torch.float64)
    trainer = Trainer(CallableOracle(bowl, dim=5), CGE(), torch.optim.SGD([x], lr=0.1),
                      callbacks=[StopAt()], out_dir=tmp_path, progress=False)
    trainer.fit(max_steps=10)
    assert trainer.step == 4 and trainer.stopped_reason == "enough"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


def test_callable_oracle_keeps_a_python_float_at_theta_precision():
    oracle = CallableOracle(lambda t: 1.0 + 1e-12 * float(t[0]), dim=1, numpy=True)
    assert oracle.loss(torch.ones(1, dtype=torch.float64)).item() == 1.0 + 1e-12


# -- minimize -----------------------------------------------------------------------------------


def test_minimize_rosenbrock_reaches_the_optimum():
    result = minimize(rosen, np.zeros(3), max_steps=600)
    assert isinstance(result, MinimizeResult) and result.success
    assert result.x.shape == (3,) and result.x.dtype == np.float64
    assert np.abs(result.x - 1.0).max() < 5e-3
    assert result.fun == pytest.approx(rosen(result.x), abs=0) and result.fun < 1e-5
    assert result.steps == result.nit == 600 and len(result.history) == 600
    assert result.queries == result.nfev == 600 * 4 + 1


def test_minimize_a_torch_function_with_rge_and_sgd():
    result = minimize(bowl, torch.zeros(5, dtype=torch.float64), numpy=False, estimator=RGE(q=8, mu=1e-5),
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.05), max_steps=300, seed=1)
    assert np.abs(result.x - TARGET.numpy()).max() < 1e-3
    assert result.queries == 300 * 9 + 1


@pytest.mark.parametrize("budget", [1, 5, 6, 7, 100, 101, 102])
def test_max_queries_is_never_exceeded_and_counted_exactly(budget):
    f = Counted(lambda x: float(np.sum((x - 1.0) ** 2)))
    result = minimize(f, np.zeros(4), max_queries=budget)  # 5 queries per step
    assert result.queries == f.calls <= budget
    assert result.steps == (budget - 1) // 5
    assert len(result.history) == result.steps
    assert [h["queries"] for h in result.history] == [5 * (k + 1) for k in range(result.steps)]
    assert [h["step"] for h in result.history] == list(range(1, result.steps + 1))
    if result.steps == 0:
        assert not result.success and "allows no step" in result.message
        assert np.array_equal(result.x, np.zeros(4)) and result.fun == 4.0
    else:
        assert result.success and f"max_queries={budget} reached" in result.message


def test_minimize_returns_the_best_point_seen():
    result = minimize(lambda x: float(np.sum(x**2)), [1.0, -1.0], max_steps=50,
                      optimizer=lambda p: torch.optim.SGD(p, lr=1.1))  # overshoots: diverges
    losses = [h["loss"] for h in result.history]
    assert result.fun == min(losses) == losses[0] == 2.0  # x0 was the best point
    assert np.array_equal(result.x, [1.0, -1.0])


def test_minimize_with_batches_passes_data_to_f():
    g = np.random.default_rng(0)
    X = g.normal(size=(40, 2))
    y = X @ np.array([2.0, -1.0])

    def mse(w, xb, yb):
        assert isinstance(xb, np.ndarray)
        return float(np.mean((xb @ w - yb) ** 2))

    batches = TensorBatches(torch.from_numpy(X), torch.from_numpy(y), batch_size=10)
    result = minimize(mse, np.zeros(2), batches=batches, max_steps=400)
    assert np.allclose(result.x, [2.0, -1.0], atol=1e-2)


def test_minimize_callback_and_gtol_stop():
    seen = []

    def callback(info):
        seen.append((info.step, info.queries, info.x.copy()))
        return info.step == 7

    result = minimize(lambda x: float(np.sum(x**2)), np.ones(3), callback=callback)
    assert result.steps == 7 and not result.success and "callback" in result.message
    assert [s[0] for s in seen] == list(range(1, 8)) and seen[-1][1] == 7 * 4

    result = minimize(lambda x: float(np.sum((x - 2.0) ** 2)), np.zeros(3), gtol=1e-4, max_steps=5000,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert result.success and "gtol" in result.message and result.steps < 5000
    assert np.abs(result.x - 2.0).max() < 1e-4

    result = minimize(lambda x: float(np.sum((x - 2.0) ** 2)), np.zeros(3), gtol=1e-12, max_steps=3)
    assert not result.success and "before gtol" in result.message


def test_minimize_nan_midway_ends_cleanly_with_the_best_point():
    def f(x):  # finite only for x < 0.6: the descent towards 1 walks out of the domain
        return float(np.sum((x - 1.0) ** 2)) if np.all(x < 0.6) else math.nan

    result = minimize(f, np.zeros(2), max_steps=200)
    assert not result.success and "NaN or Inf" in result.message and "best point" in result.message
    assert 0 < result.steps < 200 and np.all(result.x < 0.6)
    assert result.fun == f(result.x) == min(h["loss"] for h in result.history)


@pytest.mark.parametrize("x0, match", [
    (np.zeros((2, 2)), r"non-empty 1-D array \[d\], got shape \(2, 2\); pass x0.ravel\(\)"),
    (np.zeros(0), r"non-empty 1-D array"),
    (5.0, r"got shape \(\)"),
    ([0.0, np.nan], "NaN or Inf"),
])
def test_minimize_rejects_bad_x0(x0, match):
    with pytest.raises(ValueError, match=match):
        minimize(rosen, x0)


def test_minimize_rejects_bad_f_and_settings():
    with pytest.raises(BlackBoxError, match=r"returned shape \(3,\) for one theta; it must return one number"):
        minimize(lambda x: x**2, np.zeros(3), max_steps=2)
    with pytest.raises(BlackBoxError, match="returned a NoneType"):
        minimize(lambda x: None, np.zeros(3), max_steps=2)
    with pytest.raises(NonFiniteLossError, match="NaN or Inf at x0 or within mu of it"):
        minimize(lambda x: float(np.sum(x)) if x[0] > 0.5 else math.inf, np.zeros(3), max_steps=2)
    with pytest.raises(ValueError, match="give the step to it instead"):
        minimize(rosen, np.zeros(2), estimator=CGE(), mu=1e-3)
    with pytest.raises(TypeError, match="minimize makes the parameter tensor from x0"):
        minimize(rosen, np.zeros(2), optimizer=torch.optim.SGD([torch.zeros(2)], lr=0.1))
    with pytest.raises(ValueError, match="max_queries must be an integer >= 1"):
        minimize(rosen, np.zeros(2), max_queries=0)
