"""Solver-in-the-loop on forced Burgers: SRC vs NON vs FO-SOL vs ZO-SOL, ZO-SOL through a gRPC solver.

The source solver is served on loopback by an embedded gRPC server (as a remote simulator would be);
ZO-SOL trains the corrector only by querying it. Prints the markdown table and writes plots.

    python examples/sol_demo.py [OUT_DIR]          # default runs/sol-demo; a few minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(out_dir: str = "runs/sol-demo", *, steps: int = 100, progress: bool = True) -> dict:
    """Run the burgers comparison end to end; returns ``{method: {mae_mean, mae_std, queries, seconds}}``.

    Args:
        out_dir: comparison folder (data, checkpoints, report.md, plots); rerunning resumes.
        steps: optimizer steps per trained method.
        progress: tqdm bars.
    """
    import torch

    from deepzero_oracle.adapters.sol.cli import report, run_method
    from deepzero_oracle.adapters.sol.data import SOLConfig, scenario_for
    from deepzero_oracle.blackbox.grpc import GrpcBlackBox
    from deepzero_oracle.adapters.sol.serving import serve_source_solver

    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SOLConfig(scenario="burgers", size="small", steps=steps).check()
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    t0 = time.perf_counter()
    server = serve_source_solver(scenario_for(cfg))  # loopback, free port; stopped below
    try:
        with GrpcBlackBox(server.address, timeout=120) as box:
            for method in ("src", "non", "fo-sol", "zo-sol"):
                run_method(cfg, method, out, solver=box if method == "zo-sol" else None, progress=progress)
    finally:
        server.stop()
    table = report(out)
    print((out / "report.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s; plots in {out}/error_over_time.png, {out}/snapshot.png")
    return table


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sol-demo")
