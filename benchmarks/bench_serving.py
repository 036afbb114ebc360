"""Serving beside MLServer: our `deepzero-oracle serve` vs MLServer 1.7.1, same function, same client.

    python benchmarks/bench_serving.py                     # full run (~3 min), prints a table
    python benchmarks/bench_serving.py --quick --json -    # one cell pair, seconds; what the test runs
    python benchmarks/bench_serving.py --protocols rest-json --batches 1 --threads 4 --repeats 5

Both servers serve :func:`linear` (``y = x @ W + b``, ``x [N, 16]`` FP32 -> ``y [N, 4]`` FP32)
from this file: ours as ``python -m deepzero_oracle.server bench_serving:linear`` (gRPC and,
with ``--http-port``, REST), MLServer (``mlserver start``, ``parallel_workers: 0``, in its own
virtual environment made by tests/mlserver/setup_venv.sh) through the runtime
tests/mlserver/function_runtime.py calling the same function, started by
tests/support/mlserver_peer.py like the tests start it. Both listen on 127.0.0.1 only, start
before the first cell, and are stopped by the process id started here (SIGTERM).

The client is tritonclient (the standard KServe v2 client), with no client timeout (its
default), one client per thread:

* ``grpc``: tritonclient.grpc (raw tensor contents);
* ``rest-json``: tritonclient.http with JSON tensors both ways (``binary_data=False``);
* ``rest-binary``: tritonclient.http with the binary-data extension both ways (ours only:
  MLServer has no binary extension, reported n/a).

A cell is (protocol, rows per request, client threads); each runs ``--seconds`` per server
and per repeat, ours and MLServer alternately (the first of the pair alternates per repeat), so
slow drift on a shared machine hits both. Per cell and server: requests/s and rows/s (median
of the repeats, and their range), p50/p99 latency over all requests, errors (exceptions), and
wrong answers (every answer is checked against :func:`linear` computed here); the ratio is
ours / MLServer requests/s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "linear"
IN_FEATURES, OUT_FEATURES = 16, 4
# Fixed weights with few significant bits (multiples of 1/8), identical in both processes.
W = ((np.arange(IN_FEATURES * OUT_FEATURES).reshape(IN_FEATURES, OUT_FEATURES) % 7) - 3).astype(np.float32) / 8
B = np.arange(OUT_FEATURES, dtype=np.float32) / 4
PROTOCOLS = ("grpc", "rest-json", "rest-binary")
# float32 sums of 16 products may be added in another order by another NumPy/BLAS build
RTOL, ATOL = 1e-5, 1e-5


def linear(x: np.ndarray) -> np.ndarray:
    """The served function: ``x [N, 16]`` -> ``x @ W + b`` ``[N, 4]``, float32."""
    return (np.asarray(x, dtype=np.float32) @ W + B).astype(np.float32)


# -- servers ----------------------------------------------------------------------------------
def _peer():
    """tests/support/mlserver_peer.py, the MLServer peer the tests start too (free ports, readiness,
    stop by pid). Imported on first use, not at the top: MLServer imports a copy of this file
    (for :func:`linear`) from a work folder with no tests/ beside it."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)  # appended: tests/mlserver must not shadow a real `mlserver` package
    from support import mlserver_peer

    return mlserver_peer


@contextlib.contextmanager
def our_server(startup_timeout: float = 120.0):
    """``deepzero-oracle serve bench_serving:linear`` on 127.0.0.1 (free ports) in a child
    process; yields ``{"grpc": HOST:PORT, "rest": HOST:PORT, "pid"}`` once the model is ready."""
    from deepzero_oracle.server.cli import serving_address, serving_rest_url

    cmd = [sys.executable, "-m", "deepzero_oracle.server", f"bench_serving:{MODEL}", "--host", "127.0.0.1",
           "--port", "0", "--http-port", "0", "--input", f"x:FP32:-1,{IN_FEATURES}",
           "--output", f"y:FP32:-1,{OUT_FEATURES}"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, text=True)
        lines: queue.Queue = queue.Queue()

        def drain():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        def tail():
            stderr.seek(0)
            return stderr.read()[-3000:].decode("utf-8", "replace")

        threading.Thread(target=drain, daemon=True).start()
        try:
            deadline = time.monotonic() + startup_timeout
            grpc_address = rest = None
            while grpc_address is None:
                try:
                    line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    raise RuntimeError(f"our server did not print its address (exit code {proc.poll()}): "
                                       f"{tail()}")
                grpc_address, rest = serving_address(line), serving_rest_url(line)
            rest = rest.removeprefix("http://")
            _peer().wait_ready(proc, f"http://{rest}/v2/models/{MODEL}/ready", startup_timeout, "our server", tail)
            yield {"grpc": grpc_address, "rest": rest, "pid": proc.pid}
        finally:
            _peer().stop(proc)


@contextlib.contextmanager
def mlserver(venv: Path, startup_timeout: float = 120.0):
    """MLServer serving :func:`linear` as model ``linear`` (through tests/mlserver/function_runtime.py,
    from a copy of this file) on 127.0.0.1 (free ports), from a temporary work folder; yields
    ``{"grpc", "rest", "pid"}`` once the model is ready."""
    peer = _peer()
    model = peer.function_model(f"bench_serving:{MODEL}", [("x", "FP32", [-1, IN_FEATURES])],
                                [("y", "FP32", [-1, OUT_FEATURES])])
    with peer.start_mlserver(None, {MODEL: model}, venv, files=[Path(__file__)],
                             startup_timeout=startup_timeout) as server:
        yield {"grpc": server.grpc, "rest": server.rest, "pid": server.pid}


# -- the client -------------------------------------------------------------------------------
class _Client:
    """One tritonclient of ``protocol`` (made in the thread that uses it: tritonclient.http is
    gevent-based, one hub per thread); ``infer(x [N, 16]) -> y [N, 4]``. No client timeout."""

    def __init__(self, protocol: str, address: dict):
        if protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(address["grpc"])
            self.outputs = [module.InferRequestedOutput("y")]
        else:
            import tritonclient.http as module

            self.binary = protocol == "rest-binary"
            self.client = module.InferenceServerClient(address["rest"])
            self.outputs = [module.InferRequestedOutput("y", binary_data=self.binary)]
        self.module, self.protocol = module, protocol

    def infer(self, x: np.ndarray) -> np.ndarray:
        tensor = self.module.InferInput("x", list(x.shape), "FP32")
        if self.protocol == "grpc":
            tensor.set_data_from_numpy(x)
        else:
            tensor.set_data_from_numpy(x, binary_data=self.binary)
        result = self.client.infer(MODEL, [tensor], outputs=self.outputs)
        return result.as_numpy("y")

    def close(self) -> None:
        self.client.close()


def _worker(protocol, address, pool, expected, start, stop_at, max_requests, out):
    """One client thread: warm up, then query until ``stop_at`` (or ``max_requests``)."""
    latencies, errors, wrong, messages = [], 0, 0, []
    try:
        client = _Client(protocol, address)
    except Exception as e:  # noqa: BLE001 -- reported as errors of the cell
        out.append({"latencies": [], "errors": 1, "wrong": 0, "messages": [f"{type(e).__name__}: {e}"]})
        start.wait()  # the other threads and the clock wait for every thread
        return
    try:
        for i in range(3):  # warm the connection up before the clock starts
            with contextlib.suppress(Exception):
                client.infer(pool[i % len(pool)])
        start.wait()
        i = 0
        while time.perf_counter() < stop_at[0] and i < max_requests:
            k = i % len(pool)
            i += 1
            t0 = time.perf_counter()
            try:
                got = client.infer(pool[k])
            except Exception as e:  # noqa: BLE001 -- counted, first few kept
                errors += 1
                if len(messages) < 3:
                    messages.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            latencies.append(time.perf_counter() - t0)
            if got is None or got.shape != expected[k].shape or not np.allclose(got, expected[k], rtol=RTOL,
                                                                                 atol=ATOL):
                wrong += 1
    finally:
        client.close()
        out.append({"latencies": latencies, "errors": errors, "wrong": wrong, "messages": messages})


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) used so far by process ``pid``; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cell(protocol: str, address: dict, batch: int, threads: int, seconds: float,
             max_requests: int = 1_000_000) -> dict:
    """``threads`` clients querying ``batch`` rows per request for ``seconds``: one measurement.
    Also the server's CPU time over it (a figure that other load on the machine disturbs less
    than wall-clock rates)."""
    rng = np.random.default_rng(batch * 31 + threads)
    pool = [rng.normal(size=(batch, IN_FEATURES)).astype(np.float32) for _ in range(8)]
    expected = [linear(x) for x in pool]
    start, stop_at, out = threading.Barrier(threads + 1), [float("inf")], []
    workers = [threading.Thread(target=_worker, args=(protocol, address, pool, expected, start, stop_at,
                                                      max_requests, out), daemon=True)
               for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    cpu0, t0 = _cpu_seconds(address["pid"]), time.perf_counter()
    stop_at[0] = t0 + seconds
    for w in workers:
        w.join()
    elapsed, cpu1 = time.perf_counter() - t0, _cpu_seconds(address["pid"])
    latencies = [t for o in out for t in o["latencies"]]
    return {"seconds": elapsed, "requests": len(latencies), "errors": sum(o["errors"] for o in out),
            "server_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "wrong": sum(o["wrong"] for o in out), "latencies": latencies,
            "messages": [m for o in out for m in o["messages"]][:3]}


def _summary(runs: list[dict], batch: int) -> dict:
    """Repeats of one (cell, server) -> req/s and rows/s (median, range), p50/p99 ms, counts."""
    rates = [r["requests"] / r["seconds"] for r in runs]
    latencies = np.array([t for r in runs for t in r["latencies"]]) * 1e3
    p50, p99 = (np.percentile(latencies, [50, 99]).tolist() if latencies.size else [float("nan")] * 2)
    cpu = [r["server_cpu"] for r in runs]
    requests = sum(r["requests"] for r in runs)
    cpu_ms = 1e3 * sum(cpu) / requests if requests and None not in cpu else None
    return {"req_s": statistics.median(rates), "req_s_range": [min(rates), max(rates)],
            "rows_s": statistics.median(rates) * batch, "p50_ms": p50, "p99_ms": p99,
            "server_cpu_ms_per_request": cpu_ms,
            "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "wrong": sum(r["wrong"] for r in runs), "error_messages": [m for r in runs for m in r["messages"]][:3]}


def _fmt(s: dict | None) -> str:
    if s is None:
        return "n/a"
    lo, hi = s["req_s_range"]
    cpu = s["server_cpu_ms_per_request"]
    return (f"{s['req_s']:6.0f} {f'{lo:.0f}-{hi:.0f}':>11} {s['rows_s']:7.0f} {s['p50_ms']:6.2f} "
            f"{s['p99_ms']:6.2f} {'-' if cpu is None else f'{cpu:.3f}':>6} {s['errors']:4d} {s['wrong']:4d}")


def table(cells: list[dict]) -> str:
    """The cells as a plain-text table: per server req/s (median, range over repeats), rows/s,
    p50/p99 latency (ms), server CPU ms per request, errors, wrong answers; ratio of req/s."""
    head = f"{'req/s':>6} {'range':>11} {'rows/s':>7} {'p50ms':>6} {'p99ms':>6} {'cpu/rq':>6} {'errs':>4} {'bad':>4}"
    width = len(head)
    lines = [f"{'':<21}| {'ours':<{width}} | {'MLServer':<{width}} |",
             f"{'protocol':<12} {'rows':>4} {'thr':>3}| {head} | {head} | ours/MLServer"]
    for c in cells:
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "n/a"
        lines.append(f"{c['protocol']:<12} {c['batch']:>4} {c['threads']:>3}| {_fmt(c['ours']):<{width}} | "
                     f"{_fmt(c['mlserver']):<{width}} | {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table and return (and optionally write) the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one cell pair (rest-json, 64 rows, 1 thread, 1 s, 1 repeat): checks that it runs")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="rows per request")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 4], help="client threads")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per cell, server and repeat")
    p.add_argument("--repeats", type=int, default=2, help="repeats of every cell (ranges are over them)")
    p.add_argument("--mlserver-venv", type=Path, default=_peer().VENV,
                   help="MLServer's virtual environment (made with tests/mlserver/setup_venv.sh if missing)")
    p.add_argument("--no-mlserver", action="store_true", help="measure our server only")
    p.add_argument("--json", default=None, help="write the figures as JSON to this file ('-': stdout)")
    p.add_argument("--out", default=None, help="same as --json FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.protocols, args.batches, args.threads, args.seconds, args.repeats = ["rest-json"], [64], [1], 1.0, 1
    for name, values in (("--batches", args.batches), ("--threads", args.threads)):
        if any(v < 1 or v > 4096 for v in values):
            raise SystemExit(f"{name} takes integers from 1 to 4096, got {values}")
    if not 0 < args.seconds <= 600 or not 1 <= args.repeats <= 100:
        raise SystemExit("--seconds takes (0, 600] and --repeats 1..100")
    if not args.no_mlserver:
        _peer().ensure_venv(args.mlserver_venv)

    cells = [{"protocol": pr, "batch": b, "threads": t} for pr in args.protocols for b in args.batches
             for t in args.threads]
    runs: dict = {}
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(our_server())}
        if not args.no_mlserver:
            servers["mlserver"] = stack.enter_context(mlserver(args.mlserver_venv))
        for repeat in range(args.repeats):
            for n, cell in enumerate(cells):
                order = ["ours", "mlserver"] if (repeat + n) % 2 == 0 else ["mlserver", "ours"]
                for who in order:
                    if who not in servers or (who == "mlserver" and cell["protocol"] == "rest-binary"):
                        continue
                    key = (cell["protocol"], cell["batch"], cell["threads"], who)
                    runs.setdefault(key, []).append(run_cell(cell["protocol"], servers[who], cell["batch"],
                                                             cell["threads"], args.seconds))
        pids = {who: s["pid"] for who, s in servers.items()}
    for cell in cells:
        for who in ("ours", "mlserver"):
            key = (cell["protocol"], cell["batch"], cell["threads"], who)
            cell[who] = _summary(runs[key], cell["batch"]) if key in runs else None
        cell["ratio"] = cell["ours"]["req_s"] / cell["mlserver"]["req_s"] if (
            cell["mlserver"] and cell["mlserver"]["req_s"] > 0) else None

    import importlib.metadata

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"protocols": args.protocols, "batches": args.batches, "threads": args.threads,
                   "seconds": args.seconds, "repeats": args.repeats, "features": [IN_FEATURES, OUT_FEATURES],
                   "tritonclient": importlib.metadata.version("tritonclient"), "server_pids": pids,
                   "mlserver": None if args.no_mlserver else "1.7.1 (parallel_workers 0)"},
        "cells": cells,
    }
    print(table(cells))
    target = args.out or args.json
    if target == "-":
        print(json.dumps(report, indent=1))
    elif target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
