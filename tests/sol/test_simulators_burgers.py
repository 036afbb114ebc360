"""Physics and API checks of the `burgers` scenario (forced periodic 2D Burgers)."""

import numpy as np
import pytest
import torch


from deepzero_oracle.simulators import Cases, available_scenarios, get_scenario  # noqa: E402

N = 3  # one batch size everywhere: every new shape costs a JIT trace


@pytest.fixture(scope="module")
def sc():
    return get_scenario("burgers")


@pytest.fixture(scope="module")
def cases(sc):
    return sc.generate_cases(N, seed=0)


def _shear_params(sc, nu, amp):
    """params with one forcing mode (k = (0, 1), a = (amp, 0)) and the others switched off."""
    p = np.zeros((N, len(sc.param_names)))
    p[:, 0] = nu
    p[:, 1::5] = 1.0  # k_x = 1 for the unused modes (amplitude 0): any integer is valid
    p[:, 1], p[:, 2], p[:, 3] = 0.0, 1.0, amp
    return p


# ---------------------------------------------------------------------- API
def test_registry_and_clear_errors():
    assert set(available_scenarios()) == {"burgers", "wake2d"}
    with pytest.raises(ValueError, match="unknown scenario 'nope'.*burgers.*wake2d"):
        get_scenario("nope")
    with pytest.raises(ValueError, match="unknown option.*'resolution'"):
        get_scenario("burgers", resolution=3)


def test_shapes_and_array_types(sc, cases):
    assert sc.source_grid == (32, 32) and sc.reference_grid == (128, 128)
    assert cases.params.shape == (N, len(sc.param_names)) and sc.param_names[0] == "nu"
    assert cases.reference_states.shape == (N, 2, 128, 128)
    assert cases.source_states.shape == (N, 2, 32, 32)
    out = sc.source_step(cases.source_states, cases.params)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (N, 2, 32, 32)
    out32 = sc.source_step(torch.from_numpy(cases.source_states).float(), torch.from_numpy(cases.params))
    assert isinstance(out32, torch.Tensor) and out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), out, atol=1e-5)  # float32 rounding of input and output only
    np32 = sc.source_step(cases.source_states.astype(np.float32), cases.params)
    assert isinstance(np32, np.ndarray) and np32.dtype == np.float32
    ref = sc.reference_step(cases.reference_states, cases.params)
    assert ref.shape == (N, 2, 128, 128) and np.isfinite(ref).all()
    assert sc.param_fields(cases.params).shape == (N, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((N, 2, 32, 64)), r"state must have shape \[N, 2, 32, 32\].*got \(3, 2, 32, 64\)"),
    (np.zeros((N, 3, 32, 32)), r"\[N, 2, 32, 32\]"),
    (np.zeros((2, 32, 32)), r"\[N, 2, 32, 32\]"),
    (np.zeros((0, 2, 32, 32)), r"N >= 1"),
    (np.array([["a"]]), r"numeric|float"),
])
def test_bad_state_raises_value_error(sc, cases, bad, match):
    with pytest.raises(ValueError, match=match):
        sc.source_step(bad, cases.params[: len(bad)] if bad.ndim == 4 else cases.params)


def test_nan_state_and_bad_params_raise(sc, cases):
    s = cases.source_states.copy()
    s[1, 0, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in simulation\(s\) \[1\]"):
        sc.source_step(s, cases.params)
    with pytest.raises(ValueError, match=r"params must have shape \[N, 21\] = \[3, 21\]"):
        sc.source_step(cases.source_states, cases.params[:, :5])
    p = cases.params.copy()
    p[0, 0] = -0.1
    with pytest.raises(ValueError, match="viscosity nu .* must be > 0"):
        sc.source_step(cases.source_states, p)
    p = cases.params.copy()
    p[0, 1] = 0.5
    with pytest.raises(ValueError, match="wave numbers .* must be integers"):
        sc.source_step(cases.source_states, p)
    p = cases.params.copy()
    p[2, 3] = np.inf
    with pytest.raises(ValueError, match="params contain NaN"):
        sc.source_step(cases.source_states, p)


# ---------------------------------------------------------------------- determinism / batching
def test_same_seed_same_cases_and_steps(sc, cases):
    again = sc.generate_cases(N, seed=0)
    np.testing.assert_array_equal(again.params, cases.params)
    np.testing.assert_array_equal(again.reference_states, cases.reference_states)
    other = sc.generate_cases(N, seed=1)
    assert not np.allclose(other.params, cases.params)
    first = sc.generate_cases(1, seed=0)  # case i depends on (seed, i) only
    np.testing.assert_array_equal(first.params[0], cases.params[0])
    np.testing.assert_array_equal(first.reference_states[0], cases.reference_states[0])
    a = sc.rollout(cases.source_states, cases.params, 3)
    b = sc.rollout(cases.source_states, cases.params, 3)
    np.testing.assert_array_equal(a, b)


def test_batched_call_equals_per_member_calls(sc, cases):
    together = sc.source_step(cases.source_states, cases.params)
    for i in range(N):
        alone = sc.source_step(cases.source_states[i:i + 1], cases.params[i:i + 1])
        np.testing.assert_allclose(alone[0], together[i], rtol=0, atol=1e-12)
    ref_together = sc.reference_step(cases.reference_states, cases.params)
    ref_alone = sc.reference_step(cases.reference_states[1:2], cases.params[1:2])
    np.testing.assert_allclose(ref_alone[0], ref_together[1], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- physics
def test_shear_flow_is_exact_and_conserves_momentum(sc):
    """u = (U(y), 0) with y-only forcing: advection is exactly the identity, Fourier diffusion is
    exact, so each step is U <- exp(-nu k^2 dt) U + dt f; close to the continuous solution too."""
    nu, amp, a0 = 0.1, 0.05, 0.8
    p = _shear_params(sc, nu, amp)
    r, L, dt = sc.source_resolution, sc.length, sc.dt
    y = (np.arange(r) + 0.5) * L / r
    mode = np.sin(2 * np.pi * y / L)
    s = np.zeros((N, 2, r, r))
    s[:, 0] = (a0 * mode)[None, :, None]
    steps = 12
    traj = sc.rollout(s, p, steps)
    decay = np.exp(-nu * (2 * np.pi / L) ** 2 * dt)
    a = a0
    for t in range(1, steps + 1):
        a = decay * a + dt * amp
        np.testing.assert_allclose(traj[:, t, 0], np.broadcast_to((a * mode)[:, None], (r, r))[None].repeat(N, 0),
                                   rtol=0, atol=1e-12)
    assert np.abs(traj[:, :, 1]).max() == 0.0
    assert np.abs(traj[:, :, 0].mean(axis=(2, 3))).max() < 1e-14  # mean momentum stays 0
    lam = nu * (2 * np.pi / L) ** 2
    t_end = steps * dt
    exact = a0 * np.exp(-lam * t_end) + amp / lam * (1 - np.exp(-lam * t_end))
    assert abs(a - exact) / abs(exact) < 1e-2


def test_mean_kept_by_diffusion_and_zero_mean_forcing(sc, cases):
    """A uniform state is advected onto itself; Fourier diffusion and the zero-mean forcing then keep
    the mean exactly. (Semi-Lagrangian advection of a non-uniform field is not conservative, and 2D
    vector Burgers does not conserve momentum anyway, so multi-step checks use shear flows above.)"""
    s = np.zeros((N, 2, 32, 32))
    s[:, 0], s[:, 1] = 0.3, -0.2
    out = sc.source_step(s, cases.params)
    np.testing.assert_allclose(out.mean(axis=(2, 3)), [[0.3, -0.2]] * N, atol=1e-14)
    assert np.abs(sc.forcing(cases.params).mean(axis=(2, 3))).max() < 1e-14
    assert np.abs(out - s).max() > 1e-3  # the forcing did act


def test_downsample_is_block_mean(sc, cases):
    lo = sc.downsample(cases.reference_states)
    np.testing.assert_allclose(lo.mean(axis=(2, 3)), cases.reference_states.mean(axis=(2, 3)), atol=1e-14)
    np.testing.assert_allclose(lo[0, 0, 0, 0], cases.reference_states[0, 0, :4, :4].mean(), atol=1e-15)
    t = sc.downsample(torch.from_numpy(cases.reference_states))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.from_numpy(lo))


def test_source_error_shrinks_under_refinement(sc, cases):
    """Against the scenario's reference (128 cells, 4 substeps), a 64-cell/2-substep solver of the
    same PDE is much closer than the 32-cell source: the discretizations converge to one solution."""
    steps = 6
    ref = sc.reference_trajectory(cases, steps)[:, -1]
    src = sc.rollout(cases.source_states, cases.params, steps)[:, -1]
    mid_step = sc._solver_at(64, 2)
    s = torch.from_numpy(sc._initial_state_at(0, N, 64))
    for _ in range(steps):
        s = mid_step(s, torch.from_numpy(cases.params))
    mid = s.reshape(N, 2, 32, 2, 32, 2).mean(dim=(3, 5)).numpy()
    e_src, e_mid = np.abs(src - ref).mean(), np.abs(mid - ref).mean()
    print("burgers MAE vs reference (32 cells, 64 cells):", e_src, e_mid)
    assert e_mid < 0.5 * e_src, (e_src, e_mid)


@pytest.mark.slow
def test_reference_converges_under_refinement(sc):
    """Solutions on 32, 64, 128 cells (1, 2, 4 substeps) approach a 256-cell, 8-substep solution."""
    n, steps = 2, 8
    cases = sc.generate_cases(n, seed=3)
    p = torch.from_numpy(cases.params)

    def run(res, sub):
        step = sc._solver_at(res, sub)
        s = torch.from_numpy(sc._initial_state_at(3, n, res))
        for _ in range(steps):
            s = step(s, p)
        f = res // 32
        return s.reshape(n, 2, 32, f, 32, f).mean(dim=(3, 5)).numpy()

    truth = run(256, 8)
    errs = [np.abs(run(r, r // 32) - truth).mean() for r in (32, 64, 128)]
    print("burgers refinement MAE vs 256 cells (32, 64, 128):", errs)
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.3 * errs[0], errs
    # the scenario's own reference solver is the 128-cell one
    ref = sc.reference_trajectory(cases, steps)[:, -1]
    np.testing.assert_allclose(np.abs(ref - truth).mean(), errs[2], rtol=1e-9)


# ---------------------------------------------------------------------- differentiable path
def test_autograd_matches_finite_differences(sc, cases):
    x = torch.from_numpy(cases.source_states).clone().requires_grad_(True)
    p = torch.from_numpy(cases.params)
    w = torch.randn(N, 2, 32, 32, dtype=torch.float64)
    (sc.source_step(x, p) * w).sum().backward()
    d = torch.randn_like(x)
    eps = 1e-6

    def loss(s):
        return float((sc.source_step(s, p) * w).sum())
    fd = (loss(x.detach() + eps * d) - loss(x.detach() - eps * d)) / (2 * eps)
    ad = float((x.grad * d).sum())
    assert abs(ad - fd) <= 1e-5 * max(1.0, abs(fd)), (ad, fd)


# ---------------------------------------------------------------------- rollouts, caching
def test_rollout_with_corrector_and_torch(sc, cases):
    calls = []

    def correct(state, params, t):
        calls.append(t)
        return state * 0.5

    out = sc.rollout(torch.from_numpy(cases.source_states), torch.from_numpy(cases.params), 2, correct=correct)
    assert isinstance(out, torch.Tensor) and out.shape == (N, 3, 2, 32, 32) and calls == [0, 1]
    plain = sc.source_step(cases.source_states, cases.params)
    np.testing.assert_allclose(out[:, 1].numpy(), plain * 0.5, atol=1e-12)


def test_reference_trajectory_cache_roundtrip(sc, cases, tmp_path, monkeypatch):
    traj = sc.reference_trajectory(cases, 2, cache_dir=tmp_path)
    assert traj.shape == (N, 3, 2, 32, 32)
    np.testing.assert_array_equal(traj[:, 0], cases.source_states)
    files = list(tmp_path.glob("burgers-reference-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert "trajectory" in z.files

    def boom(*a, **k):
        raise AssertionError("cache miss: recomputed")
    monkeypatch.setattr(type(sc), "reference_step", boom)
    again = sc.reference_trajectory(cases, 2, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, traj)


def test_cases_save_load(cases, tmp_path):
    cases.save(tmp_path / "c.npz")
    back = Cases.load(tmp_path / "c.npz")
    assert back.scenario == "burgers" and back.seed == 0 and len(back) == N
    np.testing.assert_array_equal(back.source_states, cases.source_states)
    assert len(cases.subset([0, 2])) == 2
