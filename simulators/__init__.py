"""Simulators: PhiFlow PDE solvers usable as black boxes.

This folder sits at the top of the repository but installs as ``deepzero_oracle.simulators``
(``from deepzero_oracle.simulators import get_scenario``), next to the adapters; the engine
never imports it. The built-in scenarios are examples and test fixtures: they produce a solver
and trajectories the same way a user's own code would.

Each scenario pairs a cheap *source* solver with an expensive *reference* solver of the same PDE::

    from deepzero_oracle.simulators import get_scenario
    sc = get_scenario("burgers")                 # or "wake2d"; keyword overrides allowed
    cases = sc.generate_cases(8, seed=0)         # params [8, K], initial states on both grids
    ref = sc.reference_trajectory(cases, 20)     # [8, 21, C, H, W] on the source grid
    nxt = sc.source_step(cases.source_states, cases.params)   # the black box: [8, C, H, W]

Arrays are ``[N, C, H, W]`` (H along y, W along x) and ``params [N, K]``; NumPy in gives NumPy out,
torch in gives torch out (differentiable: the FO baseline back-propagates through the step).
See `Scenario` for the full API.
"""

from .base import Cases, Scenario

_SCENARIOS = {
    "burgers": ("deepzero_oracle.simulators.burgers", "BurgersScenario"),
    "wake2d": ("deepzero_oracle.simulators.wake2d", "Wake2DScenario"),
}


def available_scenarios() -> tuple[str, ...]:
    """Names accepted by `get_scenario`."""
    return tuple(_SCENARIOS)


def get_scenario(name: str, **overrides) -> Scenario:
    """Build a scenario by name.

    Args:
        name: one of `available_scenarios()` (``"burgers"``, ``"wake2d"``).
        **overrides: configuration fields of that scenario's class (e.g. ``warmup_steps=10``).
    Returns:
        A `Scenario`.
    Raises:
        ValueError: unknown name or unknown override.
    """
    if name not in _SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; available: {', '.join(_SCENARIOS)}")
    import dataclasses
    import importlib

    module, cls_name = _SCENARIOS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for scenario {name!r}; valid: {sorted(fields)}")
    return cls(**overrides)


__all__ = ["Cases", "Scenario", "available_scenarios", "get_scenario"]
