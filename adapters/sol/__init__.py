"""Solver-in-the-loop correctors trained through solver queries (Um et al. 2020; DeepZero's SOL).

Modules (import them directly; nothing heavy is imported here):
- ``data``: `SOLConfig`, size presets `SIZES`, `prepare_data` (cases, down-sampled reference
  trajectories, NON pairs; cached as .npz).
- ``corrector``: `Corrector` (small CNN: state + param fields -> correction), `make_corrector`.
- ``methods``: `METHODS` = src, non, fo-sol, zo-sol; `SOLOracle` (theta -> n-step unrolled loss from
  solver queries, all perturbations x simulations in one solver call per step), `BatchedCGE`,
  `train_method`, `evaluate_method`, `SolverDiverged`.
- ``serving``: `serve_source_solver` (embedded gRPC server for ``--solver grpc://``).
- ``cli``: ``register(subparsers)`` for ``deepzero-oracle sol generate|train|eval|report``.
"""
