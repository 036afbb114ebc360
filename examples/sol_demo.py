"""Solver-in-the-loop on forced Burgers: SRC vs NON vs FO-SOL vs ZO-SOL, ZO-SOL through a gRPC solver.

The source solver is served on loopback by an embedded gRPC server (as a remote simulator would be);
ZO-SOL trains the corrector only by querying it. Prints the markdown table and writes plots.

    python examples/sol_demo.py [OUT_DIR]          # default runs/sol-demo; about two minutes on 2 cores

With the command line's defaults (16 training and 16 test simulations, test rollouts of 64 steps,
twice the training trajectories; 400 steps of SOL-4 with a cosine schedule), so it is the same
comparison as `deepzero-oracle sol generate` + `sol train` for each method + `sol report`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(out_dir: str = "runs/sol-demo", *, steps: int | None = None, progress: bool | None = None) -> dict:
    """Run the burgers comparison end to end; returns ``{method: {mae_mean, mae_std, queries, seconds}}``.

    Args:
        out_dir: comparison folder (data, checkpoints, report.md, plots); rerunning resumes.
        steps: optimizer steps per trained method (default: the recipe's).
        progress: tqdm bars (None: only when stderr is a terminal).
    """
    import torch

    from deepzero_oracle.adapters.sol.builtin import generate_trajectories, scenario_of
    from deepzero_oracle.adapters.sol.compare import report, run_method, write_config
    from deepzero_oracle.adapters.sol.data import SOLConfig
    from deepzero_oracle.adapters.sol.serving import serve_source_solver
    from deepzero_oracle.adapters.sol.solver import builtin_solver, open_solver
    from deepzero_oracle.adapters.sol.trajectories import load_trajectories

    torch.set_num_threads(1)
    out = Path(out_dir)
    cfg = SOLConfig(**({"steps": steps} if steps else {})).check()
    # the built-in scenario writes the same trajectories file a user's own solver would
    path = out / "trajectories.npz"
    if path.exists():
        traj = load_trajectories(path)
    else:
        traj = generate_trajectories("burgers", "small", cache_dir=out / "data", progress=progress)
        traj.save(path)
    write_config(out, cfg, traj, path)
    t0 = time.perf_counter()
    server = serve_source_solver(scenario_of(traj))  # loopback, free port; stopped below
    try:
        with open_solver(f"grpc://{server.address}", traj) as remote:
            for method in ("src", "non", "fo-sol", "zo-sol"):
                # FO-SOL back-propagates through the solver: the in-process step; the rest query the server
                solver = builtin_solver(traj) if method == "fo-sol" else remote
                run_method(cfg, method, out, traj, solver, progress=progress)
    finally:
        server.stop()
    table = report(out)
    print((out / "report.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s; plots in {out}/error_over_time.png, {out}/snapshot.png")
    return table


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sol-demo")
