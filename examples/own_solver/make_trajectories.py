"""Write trajectories.npz for the solver in solver.py: reference runs on the fine grid, averaged onto
the source grid, in the SOL trajectories format (keys: format, format_version, train_states
[S, T+1, C, H, W], test_states, train_params [S, K], test_params, metadata).

    python make_trajectories.py [OUT.npz] [--n-train 8 --n-test 8 --steps 32]
"""

from __future__ import annotations

import argparse

import numpy as np

from solver import DT, downsample, initial_cases, reference_step


def trajectories(n: int, steps: int, seed: int):
    """``(states [n, steps + 1, 1, 16, 16], params [n, 2])`` of the reference, on the source grid."""
    params, fine = initial_cases(n, seed)
    states = [downsample(fine)]
    for _ in range(steps):
        fine = reference_step(fine, params)
        states.append(downsample(fine))
    return np.stack(states, axis=1), params


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="trajectories.npz", help="file to write")
    p.add_argument("--n-train", type=int, default=8, help="training simulations")
    p.add_argument("--n-test", type=int, default=8, help="test simulations")
    p.add_argument("--steps", type=int, default=32, help="solver steps per trajectory")
    args = p.parse_args(argv)
    train_states, train_params = trajectories(args.n_train, args.steps, seed=1)
    test_states, test_params = trajectories(args.n_test, args.steps, seed=2)
    # plain numpy.savez is all the format needs; deepzero_oracle.adapters.sol.save_trajectories
    # writes the same keys after validating them
    np.savez_compressed(
        args.out, format=np.array("deepzero-oracle/sol-trajectories"), format_version=np.array(1),
        train_states=train_states, test_states=test_states, train_params=train_params, test_params=test_params,
        metadata=np.array('{"channels": ["u"], "param_names": ["a", "D"], "dt": %g, "periodic": true}' % DT))
    print(f"wrote {args.out}: train {train_states.shape}, test {test_states.shape}")
    return args.out


if __name__ == "__main__":
    main()
