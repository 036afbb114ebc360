"""Time the simulators: ms per source/reference step at several batch sizes, and JIT trace cost.

    python -m deepzero_oracle.simulators.bench [--scenarios burgers wake2d] [--batches 1 64]
                                               [--repeats 5] [--threads N]

The first call with a new batch shape traces PhiFlow's JIT; "first call" minus the median steady-state
time is reported as the trace cost. Timings on a shared machine are noisy: the median of
``--repeats`` calls is printed, and the load average is shown so runs can be compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from . import get_scenario


def _tile(a: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(a))
    return np.concatenate([a] * reps)[:n]


def bench(names=("burgers", "wake2d"), batches=(1, 64), repeats: int = 5) -> list[dict]:
    """One row per (scenario, solver, batch): trace_s, ms_per_call (median), ms_per_call_min,
    ms_per_sim_step (median / batch)."""
    rows = []
    for name in names:
        sc = get_scenario(name, **({"warmup_steps": 20} if name == "wake2d" else {}))
        cases = sc.generate_cases(4, seed=0)
        for which in ("source", "reference"):
            step = sc.source_step if which == "source" else sc.reference_step
            states = cases.source_states if which == "source" else cases.reference_states
            for b in batches:
                s, p = _tile(states, b), _tile(cases.params, b)
                t0 = time.perf_counter()
                step(s, p)
                first = time.perf_counter() - t0
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step(s, p)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                grid = sc.source_grid if which == "source" else sc.reference_grid
                rows.append({"scenario": name, "solver": which, "batch": b, "grid": f"{grid[0]}x{grid[1]}",
                             "trace_s": first - med, "ms_per_call": 1e3 * med, "ms_per_call_min": 1e3 * min(times),
                             "ms_per_sim_step": 1e3 * med / b})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=["burgers", "wake2d"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch threads {torch.get_num_threads()}, load average {load:.1f}, {os.cpu_count()} CPUs")
    print("| scenario | solver | grid (HxW) | batch | ms / call (median) | min | ms / sim-step | JIT trace s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in bench(args.scenarios, args.batches, args.repeats):
        print(f"| {r['scenario']} | {r['solver']} | {r['grid']} | {r['batch']} | {r['ms_per_call']:.1f} | "
              f"{r['ms_per_call_min']:.1f} | {r['ms_per_sim_step']:.2f} | {r['trace_s']:.1f} |")


if __name__ == "__main__":
    main()
