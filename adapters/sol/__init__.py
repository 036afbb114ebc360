"""Solver-in-the-loop correctors trained through solver queries (Um et al. 2020; DeepZero's SOL),
installed as ``deepzero_oracle.adapters.sol``.

Modules (import them directly; nothing heavy is imported here):
- ``data``: `SOLConfig`, size presets `SIZES`, `prepare_data` (cases, down-sampled reference
  trajectories, NON pairs; cached as .npz).
- ``corrector``: `Corrector` (small CNN: state + param fields -> correction), `make_corrector`.
- ``oracle``: `SOLOracle` (theta -> n-step unrolled loss from solver queries, all perturbations x
  simulations in one solver call per step; autograd through a differentiable solver for FO),
  `SolverDiverged`, `unrolled_loss`.
- ``methods``: `METHODS` = src, non, fo-sol, zo-sol, each trained by the engine's `Trainer`
  (`train_method`), and the test metric (`evaluate_method`).
- ``serving``: `serve_source_solver` (embedded gRPC server for ``--solver grpc://``).
- ``cli``: ``deepzero-oracle sol generate|train|eval|report``.
"""
