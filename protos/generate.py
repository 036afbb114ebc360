"""Regenerate deepzero_oracle/wire/ from protos/oracle.proto.

    python protos/generate.py            # write into deepzero_oracle/wire/
    python protos/generate.py --out DIR  # write elsewhere (tests/serving/test_wire.py diffs the result)

The generator is pinned: grpcio-tools 1.66.2 bundles protoc for protobuf 5.27.2, so the
generated `_pb2.py` loads on every protobuf runtime >= 5.27.2 (5.x, 6.x and 7.x: a runtime
accepts gencode older than itself, never newer), and `_pb2_grpc.py` needs grpcio >= 1.66.2.
That is the oldest stack MLServer 1.7.1 allows (protobuf >= 5.27.2), so the package imports
beside MLServer, tritonclient and users' own pins.

grpcio-tools 1.66.2 itself requires protobuf < 6, which would downgrade the project's runtime
if installed into the same environment, so it is installed on its own with
`pip install --no-deps --target build/grpcio-tools-1.66.2` (`--install` does that) and run
from there: protoc is a compiled program that needs no protobuf runtime to generate code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.66.2"
REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "protos"
PROTO = "oracle.proto"
WIRE_DIR = REPO / "deepzero_oracle" / "wire"
DEFAULT_TOOLS_DIR = REPO / "build" / f"grpcio-tools-{GRPCIO_TOOLS_VERSION}"
GENERATED = ("oracle_pb2.py", "oracle_pb2.pyi", "oracle_pb2_grpc.py")


def tools_path(tools_dir: Path = DEFAULT_TOOLS_DIR, install: bool = False) -> str | None:
    """Return a PYTHONPATH entry holding grpcio-tools GRPCIO_TOOLS_VERSION, or None if absent.

    "" means the running environment already has the pinned version. With ``install=True``
    a missing copy is installed into ``tools_dir`` (pip, no dependencies).
    """
    try:
        if importlib.metadata.version("grpcio-tools") == GRPCIO_TOOLS_VERSION:
            return ""
    except importlib.metadata.PackageNotFoundError:
        pass
    marker = tools_dir / f"grpcio_tools-{GRPCIO_TOOLS_VERSION}.dist-info"
    if marker.is_dir():
        return str(tools_dir)
    if not install:
        return None
    # Install into a scratch dir first, then rename: a half-finished install is never used.
    tools_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="grpcio-tools-", dir=tools_dir.parent))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
         "--target", str(scratch), f"grpcio-tools=={GRPCIO_TOOLS_VERSION}"],
        check=True,
    )
    try:
        scratch.rename(tools_dir)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(scratch, ignore_errors=True)
    return str(tools_dir)


def generate(out_dir: Path, tools: str) -> list[Path]:
    """Run the pinned protoc on protos/oracle.proto into ``out_dir``; return the files written.

    Imports in the generated gRPC module are made package-relative (protoc writes
    ``import oracle_pb2``, which only works with the output folder on sys.path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if tools:
        env["PYTHONPATH"] = tools + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Run from protos/ with a relative proto path so no absolute path leaks into the output.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out_dir}",
         f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO],
        cwd=PROTO_DIR, env=env, check=True,
    )
    grpc_file = out_dir / "oracle_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = re.sub(r"^import oracle_pb2 as ", "from . import oracle_pb2 as ", text, flags=re.M)
    if fixed == text:
        raise RuntimeError("protoc output changed: no `import oracle_pb2` line to make relative")
    grpc_file.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    """Command line entry: regenerate the wire code (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WIRE_DIR, help="output folder")
    parser.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR)
    parser.add_argument("--no-install", action="store_true",
                        help="fail instead of installing the pinned grpcio-tools")
    args = parser.parse_args(argv)
    tools = tools_path(args.tools_dir, install=not args.no_install)
    if tools is None:
        print(f"grpcio-tools=={GRPCIO_TOOLS_VERSION} not found", file=sys.stderr)
        return 1
    for path in generate(args.out, tools):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
