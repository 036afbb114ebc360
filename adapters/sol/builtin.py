"""The built-in scenarios as one producer of SOL trajectories files (``sol generate``).

`generate_trajectories` runs a PhiFlow scenario's reference solver and returns `Trajectories`
in the common format; what only the built-ins need beyond it (which scenario and size, so the
in-process source solver can be found again) goes into the metadata, and `scenario_of` finds it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .trajectories import Trajectories

__all__ = ["GENERATION_KEYS", "SIZES", "builtin_scenario", "generate_trajectories", "scenario_of", "source_solver"]

# Scenario options per size preset: "tiny" for tests, "small" for the demo / this machine, "full" = defaults.
SIZES = {
    "burgers": {
        "tiny": dict(source_resolution=8, factor=2, reference_substeps=2, length=16.0),
        "small": dict(source_resolution=16),
        "full": {},
    },
    "wake2d": {
        "tiny": dict(source_resolution=8, factor=2, warmup_steps=20, re_range=(300.0, 1000.0)),
        "small": dict(source_resolution=16, warmup_steps=150, re_range=(300.0, 2000.0)),
        "full": {},
    },
}

# what `sol generate` records in the metadata and compares before reusing a file
GENERATION_KEYS = ("scenario", "size", "n_train", "n_test", "train_steps", "test_steps", "seed")


def builtin_scenario(scenario: str, size: str):
    """The `Scenario` of a built-in name with its size preset applied (ValueError for unknown ones)."""
    from deepzero_oracle.simulators import get_scenario

    if scenario not in SIZES:
        raise ValueError(f"scenario must be one of {sorted(SIZES)}, got {scenario!r}")
    if size not in SIZES[scenario]:
        raise ValueError(f"size must be one of {sorted(SIZES[scenario])}, got {size!r}")
    return get_scenario(scenario, **SIZES[scenario][size])


def generate_trajectories(scenario: str = "burgers", size: str = "small", *, n_train: int = 16, n_test: int = 16,
                          train_steps: int = 32, test_steps: int = 64, seed: int = 0, cache_dir=None,
                          progress: bool | None = False) -> Trajectories:
    """Seeded cases and down-sampled reference trajectories of a built-in scenario.

    Args:
        scenario, size: a key of `SIZES` and one of its presets.
        n_train / n_test: simulations; train_steps / test_steps: steps per trajectory. The test
            rollouts run twice as long as the training trajectories by default: a corrector trained
            only on reference states drifts on its own states, and that shows over long rollouts.
        seed: cases are drawn with seed + 1 (train) and seed + 2 (test).
        cache_dir: where the scenario caches cases and reference runs (wake2d's warm-up is costly).
        progress: tqdm bars for the reference solver.
    Returns:
        `Trajectories` with ``train_states [n_train, train_steps + 1, C, H, W]``, params, the scenario's
        corrector fields (``param_fields``), wake2d's fluid mask as ``correction_mask``, and metadata
        (`GENERATION_KEYS`, channel and parameter names, dt, periodic).
    """
    for k, v in (("n_train", n_train), ("n_test", n_test), ("train_steps", train_steps), ("test_steps", test_steps)):
        if int(v) < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
    sc = builtin_scenario(scenario, size)
    train = sc.generate_cases(int(n_train), seed=seed + 1, cache_dir=cache_dir)
    test = sc.generate_cases(int(n_test), seed=seed + 2, cache_dir=cache_dir)
    train_states = sc.reference_trajectory(train, int(train_steps), cache_dir=cache_dir, progress=progress)
    test_states = sc.reference_trajectory(test, int(test_steps), cache_dir=cache_dir, progress=progress)
    mask = None
    if scenario == "wake2d":
        fluid = sc.fluid_mask("source").astype(np.float64)
        mask = np.stack([fluid, fluid])
        mask[0, :, -1] = 0.0  # v_x's last column is the right wall (padding)
    meta = {"scenario": scenario, "size": size, "n_train": int(n_train), "n_test": int(n_test),
            "train_steps": int(train_steps), "test_steps": int(test_steps), "seed": int(seed),
            "channels": list(sc.channels), "param_names": list(sc.param_names), "dt": float(sc.dt),
            "periodic": scenario == "burgers"}
    return Trajectories(train_states, test_states, train.params, test.params, sc.param_fields(train.params),
                        sc.param_fields(test.params), mask, meta)


def scenario_of(trajectories: Trajectories):
    """The built-in `Scenario` that produced ``trajectories`` (from its metadata), or None for other data."""
    meta = trajectories.metadata
    if meta.get("scenario") not in SIZES:
        return None
    return builtin_scenario(meta["scenario"], meta.get("size", "full"))


def source_solver(scenario) -> Callable:
    """A scenario's source step as a black box: ``f(state [N, C, H, W] ndarray, params [N, K]) -> [N, C, H, W]``."""
    def solve(state, params):
        return np.asarray(scenario.source_step(np.asarray(state, np.float64), np.asarray(params, np.float64)))
    return solve
