"""The ``proto`` subcommand: where the wire contract's ``oracle.proto`` is installed.

    deepzero-oracle proto --path        # the installed file's path
    deepzero-oracle proto > oracle.proto  # its text, to generate a server in another language

A server author in another language starts from this file (protos/README.md in the repository
says what the fields mean and what the clients rely on).
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from deepzero_oracle.errors import EXIT_USAGE

PROTO_PACKAGE = "deepzero_oracle.wire"
PROTO_NAME = "oracle.proto"


def proto_path() -> Path:
    """The installed ``oracle.proto`` (shipped in the package beside its generated code)."""
    return Path(str(files(PROTO_PACKAGE).joinpath(PROTO_NAME)))


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``proto`` subcommand to an argparse subparsers object (sets ``func=``)."""
    p = subparsers.add_parser(
        "proto", help="print the gRPC schema (oracle.proto) or its installed path",
        description="Print oracle.proto, the schema of the KServe v2 inference service and the "
                    "batched Oracle service that grpc:// and kserve:// black boxes speak, or with "
                    "--path where it is installed (generate a server in any language from it).")
    p.add_argument("--path", action="store_true", help="print the installed file's path instead of its text")
    p.set_defaults(func=run_proto)
    return p


def run_proto(args: argparse.Namespace) -> int:
    """Handler of ``deepzero-oracle proto``."""
    path = proto_path()
    if not path.is_file():
        print(f"deepzero-oracle proto: error: {path} is missing: reinstall the package "
              "(pip install deepzero-oracle)", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(f"{path}\n" if args.path else path.read_text())
    return 0


__all__ = ["PROTO_NAME", "proto_path", "register", "run_proto"]
