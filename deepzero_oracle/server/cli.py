"""The ``serve`` subcommand: serve ``MODULE:CALLABLE`` over gRPC (and REST) until SIGTERM/SIGINT.

    deepzero-oracle serve MODULE:CALLABLE --port 50051 [--http-port 8000]
    python -m deepzero_oracle.server MODULE:CALLABLE --port 50051      (same, without the CLI)

Once listening it prints one machine-readable line,
``deepzero-oracle: serving 'NAME', ... at HOST:PORT (tls|insecure, token on|off)``, followed by
``; REST at http(s)://HOST:PORT`` with ``--http-port`` and ``; metrics at
http(s)://HOST:PORT/metrics`` with ``--metrics-port``; scripts read the addresses from it with
:func:`serving_address`, :func:`serving_rest_url` and :func:`serving_metrics_url`.

SIGTERM (or SIGINT) drains the server: health turns NOT_SERVING, new requests are refused
(UNAVAILABLE, REST 503), running ones get ``--grace`` seconds; then it prints one
``deepzero-oracle: stopped ...`` line and exits 0.

``--workers N`` runs N server processes on one port (gRPC only): this process reserves the
port, starts the workers (each binds it with SO_REUSEPORT, so the kernel spreads client
connections over them), forwards SIGTERM/SIGINT to them and exits non-zero if one fails to
start. A Python black box then runs on N cores.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import multiprocessing
import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time

from deepzero_oracle.argtypes import bounded, one_line_error
from deepzero_oracle.blackbox.spec import load_callable_for
from deepzero_oracle.errors import EXIT_UNREACHABLE, EXIT_USAGE
from deepzero_oracle.logs import configure_logging, logging_level
from deepzero_oracle.server.lifecycle import serve_blackbox
from deepzero_oracle.server.metrics import require_metrics_extra
from deepzero_oracle.server.rest import require_rest_extra
from deepzero_oracle.server.specs import TensorSpec
from deepzero_oracle.wire.constants import DEFAULT_PORT, MAX_MESSAGE_MB, TOKEN_ENV, resolve_token

log = logging.getLogger(__name__)

_ADDRESS_IN_LINE = re.compile(r" at (\S+) \(")
_REST_IN_LINE = re.compile(r"; REST at ([^\s;]+)")
_METRICS_IN_LINE = re.compile(r"; metrics at ([^\s;]+)")


def serving_address(line: str) -> str | None:
    """``HOST:PORT`` from the "serving ... at HOST:PORT (" line the subcommand prints, else None."""
    match = _ADDRESS_IN_LINE.search(line)
    return match.group(1) if match else None


def serving_rest_url(line: str) -> str | None:
    """``http(s)://HOST:PORT`` of the REST endpoint from the "serving ..." line, else None."""
    match = _REST_IN_LINE.search(line)
    return match.group(1) if match else None


def serving_metrics_url(line: str) -> str | None:
    """``http(s)://HOST:PORT/metrics`` of the separate metrics endpoint from the "serving ..."
    line (``--metrics-port``), else None."""
    match = _METRICS_IN_LINE.search(line)
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
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="gRPC TCP port; 0 picks a free one")
    p.add_argument("--http-port", type=_port, default=None,
                   help="also serve the KServe v2 REST protocol on this port of --host (0 picks a free "
                        "one; needs the 'rest' extra); same token, TLS and limits as gRPC")
    p.add_argument("--model-name", default=None, help="name on the wire (default: the callable's name)")
    p.add_argument("--max-message-mb", type=_message_mb, default=64,
                   help=f"message size limit in MiB, both ways (at most {MAX_MESSAGE_MB:.0f})")
    p.add_argument("--token", default=None,
                   help=f"shared token clients must send (default: ${TOKEN_ENV}; prefer the "
                        "environment variable, command lines are visible to other users)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--max-concurrency", type=_count, default=1,
                   help="black-box calls running at once, gRPC and REST together (1: the callable need not "
                        "be thread-safe)")
    p.add_argument("--max-pending", type=_count, default=64,
                   help="black-box calls admitted at once: running plus queued for a free slot (>= "
                        "--max-concurrency); more get RESOURCE_EXHAUSTED (REST: 429) at once")
    p.add_argument("--torch", action="store_true",
                   help="pass torch tensors to the callable instead of NumPy arrays (the default)")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf inputs")
    p.add_argument("--cost-hint", type=_cost_hint, default=None, help="declared seconds per row")
    p.add_argument("--input", action="append", type=_tensor_spec, default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an input, e.g. x:FP32:-1,64 (-1: any size; repeat per input, in "
                        "order); declared datatypes and shapes are checked and reported in the metadata")
    p.add_argument("--output", action="append", type=_tensor_spec, default=None, metavar="NAME[:DT[:SHAPE]]",
                   help="declare an output, e.g. y:FP64:-1,2 (repeat per output, in order); "
                        "undeclared outputs are reported as output_0, ... once a call has shown them")
    p.add_argument("--metrics-port", type=_port, default=None,
                   help="serve Prometheus metrics at /metrics on this port of --host (0 picks a free one; "
                        "no token, TLS as the server; needs the 'metrics' extra); with --http-port the REST "
                        "port answers GET /metrics too")
    p.add_argument("--grace", type=_grace, default=5.0,
                   help="seconds running requests get to finish on SIGTERM/SIGINT (health turns NOT_SERVING "
                        "and new requests are refused meanwhile; a second signal stops at once)")
    p.add_argument("--workers", type=_count, default=1,
                   help="server processes sharing --port (SO_REUSEPORT; gRPC only): a Python black box "
                        "then uses N cores; each client connection is served by one worker")
    p.set_defaults(func=run_serve, log_default="INFO")  # a server logs what it serves
    p.error = functools.partial(one_line_error, p)  # no usage block: one line saying what to fix
    return p


# -- first-contact checks: each bad value is one line naming its flag, exit 2 -------------------
# argparse types: each refuses a value of the wrong kind, not finite or out of range in one line
_port = bounded(int, 0, 65535, "a TCP port 0..65535 (0: any free one)")
_grace = bounded(float, 0, 86400, "seconds from 0 to 86400")
_cost_hint = bounded(float, 0, None, "seconds per row >= 0")
_message_mb = bounded(float, 2**-20, MAX_MESSAGE_MB,
                      f"MiB more than 0 and at most {MAX_MESSAGE_MB:.0f} (gRPC's limit)")


def _tensor_spec(text: str) -> str:
    """argparse type: ``NAME[:DT[:SHAPE]]`` as ``TensorSpec.parse`` reads it, dims -1 or >= 0."""
    parts = text.split(":")
    shape = parts[2] if len(parts) == 3 else ""
    if shape and not all(re.fullmatch(r"-1|\d+", d.strip()) for d in shape.split(",")):
        raise argparse.ArgumentTypeError(f"tensor spec {text!r}: the shape must be whole numbers >= 0 or -1 "
                                         "(any size), separated by commas, e.g. x:FP32:-1,64")
    try:
        TensorSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# Largest --max-concurrency / --max-pending / --workers: each becomes threads or processes.
_MAX_COUNT = 4096
_count = bounded(int, 1, _MAX_COUNT, f"a whole number from 1 to {_MAX_COUNT}")


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``deepzero-oracle serve``: run until SIGTERM/SIGINT, then stop gracefully."""
    configure_logging(logging_level(args), default="INFO")  # as the command line set it, else INFO
    if args.workers < 1:
        print(f"deepzero-oracle serve: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and args.http_port is not None:
        print("deepzero-oracle serve: error: --http-port serves REST from one process; with --workers > 1 "
              "serve gRPC only (clients: grpc:// or kserve:// specs)", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and args.metrics_port is not None:
        print("deepzero-oracle serve: error: --metrics-port serves one process's metrics; with --workers > 1 "
              "leave it out", file=sys.stderr)
        return EXIT_USAGE
    if args.grace < 0:
        print(f"deepzero-oracle serve: error: --grace must be >= 0 seconds, got {args.grace}", file=sys.stderr)
        return EXIT_USAGE
    for needed, require in ((args.http_port, require_rest_extra), (args.metrics_port, require_metrics_extra)):
        if needed is not None:
            try:
                require()
            except ImportError as e:
                print(f"deepzero-oracle serve: error: {e}", file=sys.stderr)
                return EXIT_USAGE
    if args.max_pending < args.max_concurrency:
        return _usage(f"--max-pending ({args.max_pending}) counts running and queued calls, so it must be at "
                      f"least --max-concurrency ({args.max_concurrency}); raise --max-pending")
    if (args.tls_cert is None) != (args.tls_key is None):
        return _usage("TLS needs both --tls-cert and --tls-key (PEM files); give both or neither")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.path.isfile(path):
            return _usage(f"{flag} {path}: no such file; give the path of a PEM file")
    if args.tls_cert is not None:
        problem = _tls_problem(args.tls_cert, args.tls_key)
        if problem:
            return _usage(problem)
    try:
        fn = load_callable_for(args.target)  # a bad MODULE:CALLABLE fails here, before any worker starts
    except ValueError as e:
        return _usage(str(e))
    for flag, port in (("--port", args.port), ("--http-port", args.http_port),
                       ("--metrics-port", getattr(args, "metrics_port", None))):
        failure = _bind_problem(args.host, port, flag)
        if failure:
            print(f"deepzero-oracle serve: error: {failure[1]}", file=sys.stderr)
            return failure[0]
    if args.workers > 1:
        return _run_workers(args)
    stop = _stop_on_signals()
    try:
        server = _start(args, fn, args.port)
    except (OSError, RuntimeError) as e:  # grpc's bind failure is a RuntimeError; taken since the check
        return _fail(EXIT_UNREACHABLE, f"cannot listen on --host {args.host}: {_one_line(e)}; stop what uses "
                                       "the port or pick another (0: any free one)")
    except (ValueError, TypeError, ImportError) as e:  # e.g. --input names that fn does not take
        return _usage(_one_line(e))
    print(_serving_line(args, list(server.models), server.address, server.rest_url, metrics_url=server.metrics_url),
          flush=True)
    while not stop.wait(0.5):
        pass
    # Drain: NOT_SERVING at once, new requests refused, running ones get --grace seconds. A
    # second signal cuts the wait short.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.hurry())
    log.info("signal received: draining (health NOT_SERVING; up to --grace %.1f s for %d running "
             "request(s))", args.grace, server.telemetry.inflight)
    started = time.monotonic()
    cut = server.stop(args.grace)
    took = time.monotonic() - started
    if not cut:
        print(f"deepzero-oracle: stopped (drained in {took:.1f} s)", flush=True)
        return 0
    print(f"deepzero-oracle: stopped after {took:.1f} s; {cut} request(s) still running were cancelled "
          "(raise --grace to let them finish)", flush=True)
    # Their black-box calls still hold worker threads, which interpreter exit would wait for.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _usage(message: str) -> int:
    return _fail(EXIT_USAGE, message)


def _fail(code: int, message: str) -> int:
    """Print ``message`` as the one error line and return ``code``."""
    print(f"deepzero-oracle serve: error: {message}", file=sys.stderr)
    return code


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _tls_problem(cert: str, key: str) -> str | None:
    """Why ``cert`` and ``key`` are not a PEM certificate and its unencrypted private key, or None."""
    try:
        # An encrypted key gets an empty password (gRPC cannot use one either): never a prompt.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or _one_line(e)
        return (f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its unencrypted private key "
                f"({reason}); give the server's certificate and the key it was made with")
    return None


def _bind_problem(host: str, port: int | None, flag: str) -> tuple[int, str] | None:
    """Why ``host:port`` cannot be listened on, as (exit code, message), or None if it can (or
    ``port`` is None/0). Checked before the server starts, so the error is one clear line."""
    if port is None:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as e:
            return EXIT_USAGE, f"--host {host}: cannot resolve it ({e.strerror}); give an address of this machine"
        except OSError as e:
            where = _address(host, port)
            if e.errno == errno.EADDRINUSE:
                return EXIT_UNREACHABLE, (f"{flag} {port}: {where} is already in use; stop what listens there or "
                                          f"pick another port ({flag} 0: any free one)")
            if e.errno == errno.EACCES:
                return EXIT_USAGE, f"{flag} {port}: not allowed to listen on {where}; pick a port >= 1024"
            if e.errno == errno.EADDRNOTAVAIL:
                return EXIT_USAGE, f"--host {host}: not an address of this machine; use 127.0.0.1 or one of its own"
            return EXIT_UNREACHABLE, f"{flag} {port}: cannot listen on {where} ({e.strerror}); pick another port"
    return None


def _start(args: argparse.Namespace, fn, port: int, worker: tuple[int, int] | None = None):
    """The server ``args`` describe, listening on ``port`` (shared, as ``worker = (index, count)``
    of ``serve --workers``)."""
    return serve_blackbox(
        fn, host=args.host, port=port, model_name=args.model_name, inputs=args.input,
        outputs=args.output, numpy=not args.torch, token=resolve_token(args.token), tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_message_mb=args.max_message_mb,
        max_concurrency=args.max_concurrency, max_pending=args.max_pending,
        allow_nonfinite=args.allow_nonfinite, cost_hint=args.cost_hint, http_port=args.http_port,
        reuse_port=worker is not None, worker=worker, metrics_port=getattr(args, "metrics_port", None))


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _serving_line(args: argparse.Namespace, models: list[str], address: str, rest_url: str | None,
                  workers: str = "", metrics_url: str | None = None) -> str:
    """The one machine-readable line: serving_address() (and scripts) read the address from it."""
    names = ", ".join(repr(n) for n in models)
    tls = args.tls_cert is not None
    rest = f"; REST at {rest_url}" if rest_url else ""
    metrics = f"; metrics at {metrics_url}" if metrics_url else ""
    return (f"deepzero-oracle: serving {names} at {address} ({'tls' if tls else 'insecure'}, "
            f"token {'on' if resolve_token(args.token) else 'off'}{workers}){rest}{metrics}")


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
    configure_logging(logging_level(args), default="INFO")  # as the command line set it, else INFO
    try:
        server = _start(args, load_callable_for(args.target), port, worker=(index, args.workers))
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
