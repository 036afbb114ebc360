"""The ``serve`` subcommand: serve ``MODULE:CALLABLE`` over gRPC (and REST) until SIGTERM/SIGINT.

    deepzero-oracle serve MODULE:CALLABLE --port 50051 [--http-port 8000]
    python -m deepzero_oracle.server MODULE:CALLABLE --port 50051      (same, without the CLI)

Once listening it prints one machine-readable line,
``deepzero-oracle: serving 'NAME', ... at HOST:PORT (tls|insecure, token on|off)``, followed by
``; REST at http(s)://HOST:PORT`` with ``--http-port``; scripts read the addresses from it
with :func:`serving_address` and :func:`serving_rest_url`.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading

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
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``deepzero-oracle serve``: run until SIGTERM/SIGINT, then stop gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.http_port is not None:
        try:
            require_rest_extra()
        except ImportError as e:
            print(f"deepzero-oracle serve: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    fn = load_callable(args.target)
    token = resolve_token(args.token)
    server = serve_blackbox(
        fn, host=args.host, port=args.port, model_name=args.model_name, inputs=args.input,
        outputs=args.output, numpy=not args.torch, token=token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_message_mb=args.max_message_mb,
        max_concurrency=args.max_concurrency, max_pending=args.max_pending,
        allow_nonfinite=args.allow_nonfinite, cost_hint=args.cost_hint, http_port=args.http_port)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    names = ", ".join(repr(n) for n in server.models)
    # One machine-readable line: serving_address() (and scripts) read the address from it.
    rest = f"; REST at {server.rest_url}" if server.rest_url else ""
    print(f"deepzero-oracle: serving {names} at {server.address} "
          f"({'tls' if server.tls else 'insecure'}, token {'on' if token else 'off'}){rest}", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("signal received: stopping (grace %.1f s)", args.grace)
    server.stop(args.grace)
    print("deepzero-oracle: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deepzero_oracle.server MODULE:CALLABLE [options]``."""
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
