"""Your own solver through the Python API: a NumPy step, its trajectories file, ZO-SOL by the Trainer.

    python examples/own_solver/python_api.py      # writes trajectories.npz in the current folder
"""
import numpy as np
import torch

from deepzero_oracle import CGE, SampledBatches, Trainer
from deepzero_oracle.adapters.sol import (SOLOracle, Trajectories, evaluate, make_corrector, prepare_data,
                                          training_windows)


def step(u, params, substeps=1, dt=0.1):
    """The solver: u [N, 1, H, W], params [N, 2] = (diffusivity, decay) -> u one dt later."""
    d, k = params[:, :1, None, None], params[:, 1:, None, None]
    for _ in range(substeps):
        lap = np.roll(u, 1, -1) + np.roll(u, -1, -1) + np.roll(u, 1, -2) + np.roll(u, -1, -2) - 4 * u
        u = u + dt / substeps * (d * lap - k * u * u)
    return u


def runs(n, rng, steps=16):
    """Reference trajectories [n, steps + 1, 1, 16, 16] (8 substeps per step) and their params [n, 2]."""
    params = rng.uniform([0.05, 0.5], [0.2, 2.0], (n, 2))
    states = [rng.uniform(0, 1, (n, 1, 16, 16))]
    for _ in range(steps):
        states.append(step(states[-1], params, substeps=8))
    return np.stack(states, axis=1), params


rng = np.random.default_rng(0)
(train, p_train), (test, p_test) = runs(8, rng), runs(4, rng)
Trajectories(train, test, p_train, p_test, metadata={"periodic": True}).save("trajectories.npz")

data = prepare_data(Trajectories.load("trajectories.npz", unroll=4), step)  # NON pairs, normalization
corrector = make_corrector(channels=1, n_fields=2, stats=data.stats, periodic=True, hidden=4)
oracle = SOLOracle(corrector, step, unroll=4)  # theta -> 4-step unrolled loss, from solver calls only
trainer = Trainer(oracle, CGE(mu=1e-4, joint=True), torch.optim.Adam(corrector.parameters(), lr=1e-2))
trainer.fit(SampledBatches(training_windows(data, unroll=4, batch_size=4)), max_steps=30)
src, zo = evaluate(data.trajectories, step), evaluate(data.trajectories, step, corrector)
print(f"test MAE: SRC {src['mae_mean']:.5f}, ZO-SOL {zo['mae_mean']:.5f} after {oracle.queries:,} queries")
