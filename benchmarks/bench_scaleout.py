"""Scale-out benchmark: a CGE step on a CPU-bound black box, 1 vs 2 Dask workers, side by side.

    python benchmarks/bench_scaleout.py            # ~1 min, prints a table
    python benchmarks/bench_scaleout.py --quick    # ~30 s: fewer coordinates and repeats

* speedup: one forward-CGE step (129 calls of a black box that burns ~10 ms of CPU per
  call, NumPy element-wise work, single-threaded) on ``dask-local:1`` and on ``dask-local:2``
  (``open_executor``: one-thread worker processes on 127.0.0.1), both clusters up at once and
  steps alternated between them, so both see the same machine. ``speedup = t(1 worker) /
  t(2 workers)``; the goal is >= 1.7 on 2 free cores.
* latency-bound: the same comparison for a black box that waits ~10 ms per call instead of
  computing (a remote solver's round trip): it needs no free core, so it shows the fan-out's own
  parallel efficiency on a busy machine.
* cores free: the same CPU work (~0.5 s) on one worker alone, then on both workers at once;
  ``2 * t(alone) / t(both)`` is how many cores the machine gave the two workers (2 on a quiet
  2-core machine, about 1 when other jobs hold a core): the ceiling of the CPU-bound speedup.
* overhead: the same step on a trivial black box (microseconds per call), inline (the oracle
  itself) vs ``ParallelOracle`` on ``dask-local:1``: ``(t_dask - t_inline) / queries`` is what
  the fan-out adds per query (shipping the oracle, scheduling, gathering), and ``t_dask - t_inline``
  per step.

Each timing is the median over ``--repeats`` steps after one warm-up step per executor (which
ships the oracle and imports torch on the workers). Results are checked bit-identical across
executors before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepzero_oracle import CGE, CallableOracle
from deepzero_oracle.parallel import ParallelOracle, open_executor

TARGET_SPEEDUP = 1.7


class Wait:
    """``theta [dim] -> loss`` after sleeping ``seconds`` (a black box bound by latency, not CPU)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, theta):
        time.sleep(self.seconds)
        return (theta - 0.25).pow(2).sum()


class Burn:
    """``theta [dim] -> loss``: ``rounds`` passes of element-wise NumPy work on a 100,000-vector
    per call (single-threaded, ~0.1 ms a round on a laptop core), then a smooth bowl of theta."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def __call__(self, theta):
        loss = (theta - 0.25).pow(2).sum()
        if self.rounds:
            work = np.linspace(0.0, 1.0, 100_000) + float(theta.sum()) * 1e-9
            for _ in range(self.rounds):
                work = np.sin(work) + 0.5
            loss = loss + 1e-12 * float(work[0])
        return loss


def rounds_for(milliseconds: float) -> int:
    """Rounds of ``Burn`` that take about ``milliseconds`` here (measured now)."""
    probe = Burn(20)
    theta = torch.zeros(4)
    probe(theta)
    began = time.perf_counter()
    for _ in range(5):
        probe(theta)
    per_round = (time.perf_counter() - began) / (5 * 20)
    return max(1, round(milliseconds / 1000 / per_round))


def burn_seconds(rounds: int) -> float:
    """Wall seconds of one ``Burn(rounds)`` call (runs on a worker)."""
    began = time.perf_counter()
    Burn(rounds)(torch.zeros(4))
    return time.perf_counter() - began


def cores_free(client, rounds: int, repeats: int) -> float:
    """``2 * t(alone) / t(both)`` of ``burn_seconds(rounds)`` on the two workers of ``client``:
    the cores the machine gives them now (median over ``repeats``)."""
    first, second = sorted(client.nthreads())
    ratios = []
    for _ in range(repeats):
        alone = client.submit(burn_seconds, rounds, workers=[first], pure=False).result()
        both = [client.submit(burn_seconds, rounds, workers=[w], pure=False) for w in (first, second)]
        ratios.append(2 * alone / max(f.result() for f in both))
    return statistics.median(ratios)


def step_seconds(oracle, theta, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` forward-CGE steps at ``theta``."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        CGE(mu=1e-3).estimate(oracle, theta)
        times.append(time.perf_counter() - began)
    return times


def side_by_side(box, executors: dict, theta, repeats: int) -> dict[int, float]:
    """Median step seconds of ``box`` per executor (``{workers: executor}``), steps alternated
    between them after a warm-up step each (which checks the estimate against inline)."""
    oracles = {k: ParallelOracle(CallableOracle(box, len(theta)), ex) for k, ex in executors.items()}
    reference = CGE(mu=1e-3).estimate(CallableOracle(box, len(theta)), theta)
    for oracle in oracles.values():  # warm-up: ships the oracle, imports torch on the workers
        if not torch.equal(CGE(mu=1e-3).estimate(oracle, theta), reference):
            raise AssertionError("a Dask estimate differs from the inline one")
    times = {k: [] for k in oracles}
    for _ in range(repeats):  # alternated: both executors see the same machine load
        for k, oracle in oracles.items():
            times[k] += step_seconds(oracle, theta, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def run(*, dim: int = 128, repeats: int = 5, burn_ms: float = 10.0, trivial_dim: int = 512) -> dict:
    """All the measurements; returns the results dict (also what ``--json`` writes)."""
    torch.set_num_threads(1)
    theta = torch.linspace(-1, 1, dim, dtype=torch.float64)
    rounds = rounds_for(burn_ms)
    with open_executor("dask-local:1") as one, open_executor("dask-local:2") as two:
        cpu = side_by_side(Burn(rounds), {1: one, 2: two}, theta, repeats)
        free = cores_free(two, round(rounds * 500 / burn_ms), max(2, repeats // 2))
        waiting = side_by_side(Wait(burn_ms / 1000), {1: one, 2: two}, theta, max(2, repeats // 2))
        per_call = cpu[1] / (dim + 1)

        trivial = CallableOracle(Burn(0), trivial_dim)
        flat = torch.zeros(trivial_dim, dtype=torch.float64)
        fanned = ParallelOracle(CallableOracle(Burn(0), trivial_dim), one)
        step_seconds(fanned, flat, 1)
        inline_t, dask_t = [], []
        for _ in range(repeats):
            inline_t += step_seconds(trivial, flat, 1)
            dask_t += step_seconds(fanned, flat, 1)
    t1, t2 = cpu[1], cpu[2]
    ti, td = statistics.median(inline_t), statistics.median(dask_t)
    return {
        "dim": dim, "repeats": repeats, "burn_ms": burn_ms, "burn_rounds": rounds,
        "burn_ms_per_call": round(per_call * 1000, 2),
        "step_seconds_1_worker": round(t1, 4), "step_seconds_2_workers": round(t2, 4),
        "speedup": round(t1 / t2, 3), "target_speedup": TARGET_SPEEDUP, "cores_free": round(free, 2),
        "wait_step_seconds_1_worker": round(waiting[1], 4), "wait_step_seconds_2_workers": round(waiting[2], 4),
        "wait_speedup": round(waiting[1] / waiting[2], 3),
        "trivial_dim": trivial_dim, "trivial_step_seconds_inline": round(ti, 5),
        "trivial_step_seconds_dask": round(td, 5),
        "overhead_per_step_ms": round((td - ti) * 1000, 2),
        "overhead_per_query_us": round((td - ti) / (trivial_dim + 1) * 1e6, 2),
    }


def markdown(r: dict) -> str:
    """The results as a markdown table."""
    return "\n".join([
        "| measurement | value |", "|---|---:|",
        f"| black box CPU per call (1 worker) | {r['burn_ms_per_call']} ms |",
        f"| CGE step, {r['dim']} coordinates, dask-local:1 | {r['step_seconds_1_worker']:.3f} s |",
        f"| CGE step, {r['dim']} coordinates, dask-local:2 | {r['step_seconds_2_workers']:.3f} s |",
        f"| speedup 2 vs 1 worker (goal >= {r['target_speedup']}) | {r['speedup']:.2f}x |",
        f"| cores free for the 2 workers (2 x t(alone) / t(both), same CPU work) | {r['cores_free']:.2f} |",
        f"| latency-bound black box (waits {r['burn_ms']:g} ms a call): step on 1 / 2 workers | "
        f"{r['wait_step_seconds_1_worker']:.3f} s / {r['wait_step_seconds_2_workers']:.3f} s |",
        f"| latency-bound speedup 2 vs 1 worker | {r['wait_speedup']:.2f}x |",
        f"| trivial black box, {r['trivial_dim']} coordinates: step inline | "
        f"{r['trivial_step_seconds_inline'] * 1000:.1f} ms |",
        f"| same step, ParallelOracle on dask-local:1 | {r['trivial_step_seconds_dask'] * 1000:.1f} ms |",
        f"| fan-out overhead per step / per query | {r['overhead_per_step_ms']:.1f} ms / "
        f"{r['overhead_per_query_us']:.1f} us |",
    ])


def main(argv=None) -> dict:
    """Command line: run, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 coordinates, 2 repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per executor")
    parser.add_argument("--dim", type=int, default=128, help="coordinates of the CPU-bound step")
    parser.add_argument("--burn-ms", type=float, default=10.0, help="CPU milliseconds per black-box call")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    kw = dict(dim=64, repeats=2, trivial_dim=64) if args.quick else dict(dim=args.dim, repeats=args.repeats)
    result = run(burn_ms=args.burn_ms, **kw)
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
