"""Solver-in-the-loop correctors trained through solver queries (Um et al. 2020; DeepZero's SOL),
installed as ``deepzero_oracle.adapters.sol``: bring your own solver and trajectories, or use a
built-in scenario.

Modules (the names below are also importable from this package; modules load on first use):

- ``trajectories``: the data format (`Trajectories`, `load_trajectories`, `save_trajectories`).
- ``solver``: `Solver` (a source solver behind any black-box spec, probed once), `open_solver`.
- ``data``: `SOLConfig` (the training recipe), `prepare_data` -> `SOLData` (NON pairs, corrector inputs).
- ``corrector``: `Corrector` (small CNN: state + param fields -> correction), `make_corrector`,
  `corrections` (P parameter copies of any corrector module).
- ``oracle``: `SOLOracle` (theta -> n-step unrolled loss from solver queries, all perturbations x
  simulations in one solver call per step; autograd through a differentiable solver for FO),
  `SolverDiverged`, `unrolled_loss`.
- ``methods``: `METHODS` = src, non, fo-sol, zo-sol, each trained by the engine's `Trainer`
  (`train_method`, `training_windows`), and the test metric (`evaluate`).
- ``builtin``: the PhiFlow scenarios as producers of trajectories (`generate_trajectories`).
- ``serving``: `serve_source_solver` (embedded gRPC server of a built-in scenario's solver).
- ``compare``: the comparison folder and each command's work as a function (`generate`, `train`,
  `evaluate_trained`, `compare`, `report`, `run_method`).
- ``cli``: ``deepzero-oracle sol generate|train|eval|compare|report`` (flags -> one ``compare`` function).
"""

_EXPORTS = {
    "Trajectories": "trajectories", "load_trajectories": "trajectories", "save_trajectories": "trajectories",
    "Solver": "solver", "open_solver": "solver",
    "SOLConfig": "data", "SOLData": "data", "prepare_data": "data",
    "Corrector": "corrector", "make_corrector": "corrector",
    "SOLOracle": "oracle", "SolverDiverged": "oracle", "unrolled_loss": "oracle",
    "METHODS": "methods", "build_corrector": "methods", "evaluate": "methods", "train_method": "methods",
    "training_windows": "methods",
    "generate_trajectories": "builtin",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
