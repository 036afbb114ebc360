"""Replicas benchmark: ZO-SOL burgers (small) steps per second with the built-in source solver
served by ``serve --workers 1`` and by ``serve --workers 2`` (each worker single-threaded),
side by side in one run, and the per-call overhead of serving it.

    python benchmarks/bench_replicas.py            # ~2 min, prints a table
    python benchmarks/bench_replicas.py --quick    # what tests/serving/test_bench_replicas.py runs

The server runs in child processes (``python -m deepzero_oracle.server
bench_replicas:burgers_source_step --workers N``), the ZO-SOL trainer in this process.

ZO-SOL sends one request per step (all perturbed correctors rolled out together, one solver
call per unroll step), so a second worker only helps if the client sends calls concurrently:
the oracle is wrapped in ``ParallelOracle(oracle, ThreadPoolExecutor(T))`` with the request cut
into T chunks, and each thread's copy of the black box opens its own connection. The kernel
spreads connections over the workers of one port by a hash (SO_REUSEPORT), so T connections
may land unevenly; the table reports how many each worker got. Both runs use the same client.

* steps/s: ZO-SOL steps per second after ``--warmup`` steps, for 1 and 2 workers, the median of
  ``--trials`` runs (each with new connections); the ratio, and the ratio over the trials where
  the kernel gave each worker as many connections.
* solver alone: calls/s of ZO-SOL-sized solver calls sent from ``--threads`` connections at once
  (no corrector work in between), 1 vs 2 workers: what the server side gains by itself.
* 2 servers, replica spec: the same against two one-worker servers on two ports named in one
  replica spec, whose single round robin alternates the calls of both threads (an even split).
* overhead: one solver call of a ZO-SOL-sized batch, served (1 worker) minus in process, in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import pickle
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_grpc import child_server  # noqa: E402


@functools.lru_cache(maxsize=1)
def _burgers_small():
    from deepzero_oracle.adapters.sol.builtin import builtin_scenario, source_solver

    return source_solver(builtin_scenario("burgers", "small"))


def burgers_source_step(state, params):
    """The served solver: burgers (small) source step, ``state [N, 1, 16, 16], params [N, K] -> [N, 1, 16, 16]``,
    on one thread (one worker = one core)."""
    torch.set_num_threads(1)
    return _burgers_small()(state, params)


def _connections_per_worker(server_pid: int, port: int) -> list[int] | None:
    """Established client connections each worker of the server holds on ``port`` (None without
    psutil, which comes with the dask extra)."""
    try:
        import psutil
    except ImportError:
        return None
    server = psutil.Process(server_pid)
    workers = [c for c in server.children() if "spawn_main" in " ".join(c.cmdline())] or [server]
    return [sum(c.status == "ESTABLISHED" and c.laddr.port == port for c in proc.net_connections(kind="tcp"))
            for proc in workers]


def _zo_sol(cfg, data, solver, threads: int, steps: int, warmup: int, at_last_step=None) -> dict:
    """Train ZO-SOL ``warmup + steps`` steps with ``solver``: ``{"steps_per_second"`` (after the
    warm-up), ``"queries"``, ``"call_rows"`` (rows of one solver call without threads),
    ``"at_last_step"`` (what ``at_last_step()`` returned then, while the connections are open)``}``."""
    from deepzero_oracle import ParallelOracle
    from deepzero_oracle.adapters.sol.methods import method_trainer

    trainer, windows = method_trainer(cfg, "zo-sol", data, None, solver=solver, progress=False)
    stamps: list[float] = []
    seen: list = [None]

    class Clock:
        def on_step_end(self, trainer, metrics):
            stamps.append(time.perf_counter())
            if trainer.step == warmup + steps and at_last_step is not None:
                seen[0] = at_last_step()

        def on_epoch_end(self, trainer, metrics):
            pass

    trainer.callbacks.append(Clock())
    call_rows = trainer.oracle.max_batch * cfg.batch_size
    pool = None
    if threads > 1:
        # The request in `threads` chunks, each one SOL rollout of its share of the thetas (the
        # oracle pads every solver call to max_batch thetas: keep that at one chunk).
        sol = trainer.oracle
        sol.max_batch = math.ceil(sol.max_batch / threads)
        pool = ThreadPoolExecutor(threads)
        trainer.oracle = ParallelOracle(sol, pool, chunk_size=sol.max_batch, block=sol.max_batch, workers=threads)
    try:
        trainer.fit(windows, max_steps=warmup + steps)
    finally:
        if pool is not None:
            pool.shutdown()
    return {"steps_per_second": steps / (stamps[-1] - stamps[warmup - 1]), "queries": trainer.oracle.queries,
            "call_rows": call_rows, "at_last_step": seen[0]}


def _solver_calls_per_second(box, state, params, threads: int, calls: int, connections) -> dict:
    """``threads`` threads, each with its own copy (connection) of ``box``, make ``calls`` calls each
    of ``state``/``params``: ``{"calls_per_second", "connections_per_worker"}``."""
    blob = pickle.dumps(box)

    def work():
        copy = pickle.loads(blob)
        copy(state, params)  # connect first
        barrier.wait()
        for _ in range(calls):
            copy(state, params)

    barrier = threading.Barrier(threads + 1)
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work) for _ in range(threads)]
        barrier.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
        seconds = time.perf_counter() - start
        split = connections()  # the pool's threads, and so their connections, are still alive
    return {"calls_per_second": threads * calls / seconds, "connections_per_worker": split}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and return the figures as a dict."""
    from deepzero_oracle.adapters.sol.builtin import generate_trajectories
    from deepzero_oracle.adapters.sol.data import SOLConfig, prepare_data
    from deepzero_oracle.blackbox import GrpcBlackBox, LocalBlackBox

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks that it runs)")
    p.add_argument("--steps", type=int, default=30, help="timed ZO-SOL steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="client threads (ParallelOracle) = connections")
    p.add_argument("--calls", type=int, default=20, help="solver calls per thread (solver-only rate)")
    p.add_argument("--trials", type=int, default=3,
                   help="runs per server (each with new connections, which the kernel spreads anew)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.trials, args.calls = 2, 1, 1, 2

    torch.set_num_threads(1)
    traj = generate_trajectories("burgers", "small", n_train=4, n_test=1, train_steps=8, test_steps=8)
    cfg = SOLConfig(steps=args.warmup + args.steps, checkpoint_every=10**6)
    data = prepare_data(traj, _burgers_small())
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "runs": {}}
    local = _burgers_small()
    results["runs"]["in_process"] = _zo_sol(cfg, data, LocalBlackBox(local, numpy=True), 1, args.steps, args.warmup)
    rows = results["runs"]["in_process"]["call_rows"]  # a ZO-SOL-sized solver call: every theta x window
    state = np.resize(traj.train_states[:, 0], (rows, *traj.train_states.shape[2:]))
    params = np.resize(traj.train_params, (rows, traj.train_params.shape[1]))

    def measure(box, split) -> dict:
        trials = [_zo_sol(cfg, data, box, args.threads, args.steps, args.warmup, at_last_step=split)
                  for _ in range(args.trials)]
        solver = [_solver_calls_per_second(box, state, params, args.threads, args.calls, split)
                  for _ in range(args.trials)]
        return {"steps_per_second": statistics.median(t["steps_per_second"] for t in trials),
                "queries": trials[0]["queries"], "call_rows": rows,
                "trials": [{"steps_per_second": t["steps_per_second"], "connections_per_worker": t["at_last_step"]}
                           for t in trials],
                "solver_calls_per_second": statistics.median(t["calls_per_second"] for t in solver),
                "solver_trials": solver}

    for workers in (1, 2):
        with child_server("bench_replicas:burgers_source_step", "--workers", str(workers)) as (address, pid):
            box = GrpcBlackBox(address, timeout=300)
            run = measure(box, functools.partial(_connections_per_worker, pid, int(address.rsplit(":", 1)[1])))
            if workers == 1:
                # One call, served vs in process.
                box(state, params)
                run["call_ms_served"] = statistics.median(_seconds(box, state, params) for _ in range(7)) * 1e3
                run["call_ms_in_process"] = statistics.median(_seconds(local, state, params) for _ in range(7)) * 1e3
                run["overhead_ms_per_call"] = run["call_ms_served"] - run["call_ms_in_process"]
            box.close()
            results["runs"][f"workers_{workers}"] = run
    # The even split: two one-worker servers on two ports, one replica spec (one round robin).
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(child_server("bench_replicas:burgers_source_step")) for _ in range(2)]
        box = GrpcBlackBox([address for address, _ in servers], timeout=300)

        def split():
            return [_connections_per_worker(pid, int(address.rsplit(":", 1)[1]))[0] for address, pid in servers]

        results["runs"]["replicas_2"] = measure(box, split)
        box.close()
    w1, w2 = results["runs"]["workers_1"], results["runs"]["workers_2"]
    results["ratio_2_vs_1"] = w2["steps_per_second"] / w1["steps_per_second"]
    even = [t["steps_per_second"] for t in w2["trials"]
            if t["connections_per_worker"] and len(set(t["connections_per_worker"])) == 1]
    results["ratio_2_vs_1_even_split"] = statistics.median(even) / w1["steps_per_second"] if even else None
    results["solver_ratio_2_vs_1"] = w2["solver_calls_per_second"] / w1["solver_calls_per_second"]
    r2 = results["runs"]["replicas_2"]
    results["replicas_ratio_2_vs_1"] = r2["steps_per_second"] / w1["steps_per_second"]
    results["replicas_solver_ratio_2_vs_1"] = r2["solver_calls_per_second"] / w1["solver_calls_per_second"]
    results["targets"] = {"ratio_2_vs_1>=1.6": results["ratio_2_vs_1"] >= 1.6}
    print(f"ZO-SOL burgers (small), {args.steps} steps after {args.warmup}; client: ParallelOracle with "
          f"{args.threads} threads")
    print(f"  {'in process (no server, 1 thread):':<34}{results['runs']['in_process']['steps_per_second']:8.2f} steps/s")
    configurations = (("serve --workers 1", w1), ("serve --workers 2", w2), ("2 servers, replica spec", r2))
    for name, run in configurations:
        trials = ", ".join(f"{t['steps_per_second']:.2f} {t['connections_per_worker']}" for t in run["trials"])
        print(f"  {name + ':':<34}{run['steps_per_second']:8.2f} steps/s (median; trials with connections "
              f"per server process: {trials})")
    print(f"  ratio 2 vs 1 workers: {results['ratio_2_vs_1']:.2f}x (goal >= 1.6x); trials where each worker got "
          f"as many connections: " + (f"{results['ratio_2_vs_1_even_split']:.2f}x" if even else "none"))
    print(f"  ratio 2 servers (replica spec) vs 1 worker: {results['replicas_ratio_2_vs_1']:.2f}x")
    for name, run in configurations:
        trials = ", ".join(f"{t['calls_per_second']:.1f} {t['connections_per_worker']}" for t in run["solver_trials"])
        print(f"  {'solver alone, ' + name + ':':<48}{run['solver_calls_per_second']:6.1f} calls/s of {run['call_rows']} rows "
              f"(median; trials: {trials})")
    print(f"  solver alone, ratio 2 vs 1 workers: {results['solver_ratio_2_vs_1']:.2f}x; 2 servers (replica spec) "
          f"vs 1 worker: {results['replicas_solver_ratio_2_vs_1']:.2f}x")
    print(f"  one solver call of {w1['call_rows']} rows: {w1['call_ms_served']:.1f} ms served, "
          f"{w1['call_ms_in_process']:.1f} ms in process: overhead {w1['overhead_ms_per_call']:.1f} ms per call")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
    sys.exit(0)
