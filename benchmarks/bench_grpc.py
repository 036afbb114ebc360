"""gRPC benchmark: query rates over loopback and the cost of serving a ~1 ms black box.

    python benchmarks/bench_grpc.py            # full run (~1 min), prints a table
    python benchmarks/bench_grpc.py --quick    # seconds; what tests/serving/test_bench_grpc.py runs

The server runs in a child process (`python -m deepzero_oracle.server bench_grpc:MODELS`), as it
would on another machine; the client is this process. One query = one row here.

* unary:    one query per call (``box(x[1, D])``), sequential.
* batched:  ``box.query_batch`` with many one-row queries per call (in-band per-query errors).
* rows:     one call with many rows (``box(x[K, D])``): what ModuleOracle does with P x B rows.
* streamed: ``box.stream`` over one bidirectional stream, one query per message.
* overhead: a black box that costs ~1 ms per query (it sleeps, like an external solver would),
  served vs the same function in-process (LocalBlackBox), for the same queries:
  ``overhead = t_served / t_local - 1``, per mode (unary calls one by one; streamed; batched
  in one call against one local call of the same rows).
Targets: batched >= 50,000 trivial queries/s; overhead <= 5% for the 1 ms black box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DIM = 8


def trivial(x):
    """The trivial black box: ``x [N, D] -> 2 x``."""
    return x * 2.0


def one_ms(x):
    """~1 ms per query (row): ``x [N, D] -> row sums [N, 1]`` after sleeping N ms."""
    time.sleep(0.001 * x.shape[0])
    return x.sum(dim=1, keepdim=True)


MODELS = {"trivial": trivial, "one_ms": one_ms}


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def child_server(target: str, *args: str, startup_timeout: float = 60.0):
    """``python -m deepzero_oracle.server TARGET --port 0 ARGS`` started here; yields
    ``(address, pid)`` once it prints its address, and stops it (SIGTERM) on exit."""
    from deepzero_oracle.server.cli import serving_address

    cmd = [sys.executable, "-m", "deepzero_oracle.server", target, "--port", "0", *args]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, text=True)
        # A child that never prints its address is killed, which ends the read below.
        watchdog = threading.Timer(startup_timeout, proc.kill)
        watchdog.start()
        try:
            address = next(filter(None, map(serving_address, proc.stdout)), None)
            watchdog.cancel()
            if address is None:
                stderr.seek(0)
                raise RuntimeError(f"server {target} ended (exit code {proc.wait()}) without printing "
                                   f"its address: {stderr.read()[-2000:].decode('utf-8', 'replace')}")
            yield address, proc.pid
        finally:
            watchdog.cancel()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and return the figures as a dict."""
    from deepzero_oracle.blackbox import GrpcBlackBox, LocalBlackBox

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks that it runs)")
    p.add_argument("--unary", type=int, default=2000, help="unary queries")
    p.add_argument("--batch", type=int, default=20000, help="queries per batched call")
    p.add_argument("--stream", type=int, default=4000, help="streamed queries")
    p.add_argument("--repeats", type=int, default=5, help="repeats (median) for batched/rows")
    p.add_argument("--overhead-queries", type=int, default=200, help="queries of the 1 ms black box")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.unary, args.batch, args.stream, args.repeats, args.overhead_queries = 20, 200, 20, 1, 5

    torch.manual_seed(0)
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    results["config"]["dim"] = DIM
    with child_server("bench_grpc:MODELS", "--max-concurrency", "1", "--torch") as (address, pid):
        results["config"]["server_pid"] = pid
        box = GrpcBlackBox(address, model="trivial", timeout=120)
        one = torch.randn(1, DIM)
        xs = torch.randn(args.batch, DIM)
        queries = list(xs.split(1))
        for _ in range(20):  # warm up the channel and both processes
            box(one)
        box.query_batch(queries[:100])

        t = _timed(lambda: [box(one) for _ in range(args.unary)], 1)
        results["unary_qps"] = _rate(args.unary, t)
        t = _timed(lambda: box.query_batch(queries), args.repeats)
        results["batched_qps"] = _rate(len(queries), t)
        t = _timed(lambda: box(xs), args.repeats)
        results["rows_qps"] = _rate(len(xs), t)
        stream_queries = queries[: args.stream] if args.stream <= len(queries) else \
            list(torch.randn(args.stream, DIM).split(1))
        t = _timed(lambda: list(box.stream(stream_queries)), 1)
        results["streamed_qps"] = _rate(len(stream_queries), t)

        # The ~1 ms black box: served vs in-process, same queries.
        q = args.overhead_queries
        served = GrpcBlackBox(address, model="one_ms", timeout=120)
        local = LocalBlackBox(one_ms)
        rows = list(torch.randn(q, DIM).split(1))
        stacked = torch.cat(rows)
        served(rows[0])
        t_local_each = _timed(lambda: [local(r) for r in rows], 3)
        t_unary = _timed(lambda: [served(r) for r in rows], 3)
        t_stream = _timed(lambda: list(served.stream(rows)), 3)
        t_local_one = _timed(lambda: local(stacked), 3)
        t_batched = _timed(lambda: served.query_batch(rows), 3)
        results["one_ms_local_seconds_per_query"] = t_local_each / q
        results["overhead_1ms_unary"] = t_unary / t_local_each - 1
        results["overhead_1ms_streamed"] = t_stream / t_local_each - 1
        results["overhead_1ms_batched"] = t_batched / t_local_one - 1
        box.close()
        served.close()

    results["targets"] = {
        "batched_qps>=50000": results["batched_qps"] >= 50_000,
        "overhead_1ms_batched<=0.05": results["overhead_1ms_batched"] <= 0.05,
    }
    print(f"gRPC over loopback (server pid {results['config']['server_pid']}, D={DIM})")
    for key in ("unary_qps", "batched_qps", "rows_qps", "streamed_qps"):
        print(f"  {key:<24}{results[key]:>14,.0f} queries/s")
    print(f"  1 ms black box, local: {results['one_ms_local_seconds_per_query'] * 1e3:.3f} ms/query")
    for key in ("overhead_1ms_unary", "overhead_1ms_streamed", "overhead_1ms_batched"):
        print(f"  {key:<24}{results[key] * 100:>13.1f} %")
    print(f"  targets met: {results['targets']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
