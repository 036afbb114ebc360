"""The ``serve`` subcommand: serve ``MODULE:CALLABLE`` over gRPC (and REST) until SIGTERM/SIGINT.

    deepzero-oracle serve MODULE:CALLABLE --port 50051 [--http-port 8000]
    python -m deepzero_oracle.server MODULE:CALLABLE --port 50051      (same, without the CLI)

Once listening it prints one machine-readable line,
``deepzero-oracle: serving 'NAME', ... at HOST:PORT (tls|insecure, token on|off)``, followed by
``; REST at http(s)://HOST:PORT`` with ``--http-port``; scripts read the addresses from it
with :func:`serving_address` and :func:`serving_rest_url`.

``--workers N`` runs N server processes on one port (gRPC only): this process reserves the
port, starts the workers (each binds it with SO_REUSEPORT, so the kernel spreads client
connections over them), forwards SIGTERM/SIGINT to them and exits non-zero if one fails to
start. A Python black box then runs on N cores.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import queue
import re
import signal
import socket
import sys
import threading
import time

from deepzero_oracle.blackbox.protocol import DEFAULT_PORT, TOKEN_ENV, resolve_token
from deepzero_oracle.blackbox.spec import load_callable
from deepzero_oracle.errors import EXIT_USAGE
from deepzero_oracle.server.lifecycle import serve_blackbox
from deepzero_oracle.server.rest import require_rest_extra

log = logging.getLogger(__name__)

_ADDRESS_IN_LINE = re.compile(r" at (\S+) \(")
_REST_IN_LINE = re.compile(r"; REST at (\S+)")


def serving_address(line: str) -> str | None:
    """``HOST:PORT`` from the "serving ... at HOST:PORT (" line the subcommand prints, else None."""
    match = _ADDRESS_IN_LINE.search(line)
    return match.group(1) if match else None


def serving_rest_url(line: str) -> str | None:
    """``http(s)://HOST:PORT`` of the REST endpoint from the "serving ..." line, else None."""
    match = _REST_IN_LINE.search(line)
    return match.group(1) if match else None


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse subparsers object (sets ``func=``)."""
    p = subparsers.add_parser(
        "serve", help="serve a Python callable as a black box (KServe v2 gRPC, optionally REST)",
        description="Serve MODULE:CALLABLE, f(*inputs [N, ...]) -> [N, ...] on NumPy arrays, over gRPC "
                    "(KServe v2 inference protocol plus batched/streamed oracle queries, health, "
                    "reflection) and, with --http-port, the KServe v2 REST protocol.")
    p.add_argument("target", metavar="MODULE:CALLABLE",
                   help="e.g. mypkg.sim:step (a dict {name: callable} serves several models)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the black box to the network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC TCP port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the KServe v2 REST protocol on this port of --host (0 picks a free "
                        "one; needs the 'rest' extra); same token, TLS and limits as gRPC")
    p.add_argument("--model-name", default=None, help="name on the wire (default: the callable's name)")
    p.add_argument("--max-message-mb", type=float, default=64, help="message size limit in MiB, both ways")
    p.add_argument("--token", default=None,
                   help=f"shared token clients must send (default: ${TOKEN_ENV}; prefer the "
                        "environment variable, command lines are visible to other users)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--max-concurrency", type=int, default=1, help="black-box calls at once (1: the callable need not be thread-safe)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="RPCs admitted at once; more get RESOURCE_EXHAUSTED")
    p.add_argument("--torch", action="store_true",
                   help="pass torch tensors to the callable instead of NumPy arrays (the default)")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf inputs")
    p.add_argument("--cost-hint", type=float, default=None, help="declared seconds per row")
    p.add_argument("--input", action="append", default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an input, e.g. x:FP32:-1,64 (-1: any size; repeat per input, in "
                        "order); declared datatypes and shapes are checked and reported in the metadata")
    p.add_argument("--output", action="append", default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an output, e.g. y:FP64:-1,2 (repeat per output, in order); "
                        "undeclared outputs are reported as output_0, ... once a call has shown them")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on SIGTERM")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing --port (SO_REUSEPORT; gRPC only): a Python black box "
                        "then uses N cores; each client connection is served by one worker")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``deepzero-oracle serve``: run until SIGTERM/SIGINT, then stop gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.workers < 1:
        print(f"deepzero-oracle serve: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and args.http_port is not None:
        print("deepzero-oracle serve: error: --http-port serves REST from one process; with --workers > 1 "
              "serve gRPC only (clients: grpc:// or kserve:// specs)", file=sys.stderr)
        return EXIT_USAGE
    if args.http_port is not None:
        try:
            require_rest_extra()
        except ImportError as e:
            print(f"deepzero-oracle serve: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    fn = load_callable(args.target)  # a bad MODULE:CALLABLE fails here, before any worker starts
    if args.workers > 1:
        return _run_workers(args)
    stop = _stop_on_signals()
    server = _start(args, fn, args.port)
    print(_serving_line(args, list(server.models), server.address, server.rest_url), flush=True)
    while not stop.wait(0.5):
        pass
    log.info("signal received: stopping (grace %.1f s)", args.grace)
    server.stop(args.grace)
    print("deepzero-oracle: stopped", flush=True)
    return 0


def _start(args: argparse.Namespace, fn, port: int, worker: tuple[int, int] | None = None):
    """The server ``args`` describe, listening on ``port`` (shared, as ``worker = (index, count)``
    of ``serve --workers``)."""
    return serve_blackbox(
        fn, host=args.host, port=port, model_name=args.model_name, inputs=args.input,
        outputs=args.output, numpy=not args.torch, token=resolve_token(args.token), tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_message_mb=args.max_message_mb,
        max_concurrency=args.max_concurrency, max_pending=args.max_pending,
        allow_nonfinite=args.allow_nonfinite, cost_hint=args.cost_hint, http_port=args.http_port,
        reuse_port=worker is not None, worker=worker)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _serving_line(args: argparse.Namespace, models: list[str], address: str, rest_url: str | None,
                  workers: str = "") -> str:
    """The one machine-readable line: serving_address() (and scripts) read the address from it."""
    names = ", ".join(repr(n) for n in models)
    tls = args.tls_cert is not None
    rest = f"; REST at {rest_url}" if rest_url else ""
    return (f"deepzero-oracle: serving {names} at {address} ({'tls' if tls else 'insecure'}, "
            f"token {'on' if resolve_token(args.token) else 'off'}{workers}){rest}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _reserved_port(host: str, port: int):
    """Bind (without listening) ``host:port`` with SO_REUSEPORT, so port 0 picks one port for every
    worker and no process without SO_REUSEPORT can take it meanwhile; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _run_workers(args: argparse.Namespace) -> int:
    """Supervise ``args.workers`` server processes on one port until SIGTERM/SIGINT (forwarded)."""
    stop = _stop_on_signals()
    context = multiprocessing.get_context("spawn")  # no grpc state crosses a fork
    with contextlib.ExitStack() as stack:
        try:
            port = stack.enter_context(_reserved_port(args.host, args.port))
        except OSError as e:
            print(f"deepzero-oracle serve: error: cannot bind {_address(args.host, args.port)}: {e}",
                  file=sys.stderr)
            return EXIT_USAGE
        ready: multiprocessing.Queue = context.Queue()
        workers = [context.Process(target=_worker, args=(args, port, ready, i), name=f"serve-worker-{i}")
                   for i in range(args.workers)]
        stack.callback(_stop_workers, workers, args.grace)
        for w in workers:
            w.start()
        models, failure = _wait_ready(workers, ready, stop)
        if failure:
            print(f"deepzero-oracle serve: error: {failure}", file=sys.stderr)
            return 1
        pids = ", ".join(str(w.pid) for w in workers)
        print(_serving_line(args, models, _address(args.host, port), None,
                            f", {args.workers} workers: pids {pids}"), flush=True)
        exited: set[int] = set()
        while not stop.wait(0.5):
            for w in workers:
                if w.exitcode is not None and w.pid not in exited:
                    exited.add(w.pid)
                    log.warning("worker %d exited with %s; %d of %d serving", w.pid, w.exitcode,
                                len(workers) - len(exited), len(workers))
            if len(exited) == len(workers):
                print("deepzero-oracle serve: error: every worker has exited", file=sys.stderr)
                return 1
        log.info("signal received: stopping %d workers (grace %.1f s)", len(workers), args.grace)
    print("deepzero-oracle: stopped", flush=True)
    return 0


def _wait_ready(workers, ready, stop: threading.Event, timeout: float = 300.0) -> tuple[list[str], str | None]:
    """Wait until every worker listens: (the served model names, None), or ([], the reason) if one
    fails first (or a signal comes)."""
    waiting, models = {w.pid for w in workers}, []
    deadline = time.monotonic() + timeout
    while waiting:
        if stop.is_set():
            return [], "stopped by a signal while the workers started"
        try:
            pid, error, models = ready.get(timeout=0.2)
        except queue.Empty:
            dead = [w for w in workers if w.pid in waiting and not w.is_alive()]
            if dead:
                return [], f"worker {dead[0].pid} exited with {dead[0].exitcode} before serving"
            if time.monotonic() > deadline:
                return [], f"workers {sorted(waiting)} did not start in {timeout:.0f} s"
            continue
        if error:
            return [], f"worker {pid} failed to start: {error}"
        waiting.discard(pid)
    return models, None


def _stop_workers(workers, grace: float) -> None:
    """SIGTERM every live worker (each stops gracefully), then SIGKILL what outlives the grace."""
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)
    for w in workers:
        if w.pid is None:  # never started
            continue
        w.join(grace + 10.0)
        if w.is_alive():
            w.kill()
            w.join()


def _worker(args: argparse.Namespace, port: int, ready, index: int) -> None:
    """Worker ``index`` of ``serve --workers N``: serve on the shared port until SIGTERM."""
    stop = _stop_on_signals()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = _start(args, load_callable(args.target), port, worker=(index, args.workers))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which exits non-zero
        ready.put((os.getpid(), f"{type(e).__name__}: {e}", []))
        raise SystemExit(1) from e
    ready.put((os.getpid(), None, list(server.models)))
    while not stop.wait(0.5):
        pass
    server.stop(args.grace)


def main(argv: list[str] | None = None) -> int:
    """``python -m deepzero_oracle.server MODULE:CALLABLE [options]``."""
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
