"""The core install, for real: a fresh virtualenv with `pip install -c constraints.txt .` (no extra,
not editable), then what a core user runs.

    python tests/core_only/check.py [--keep] [--python PYTHON]

It copies the repository's files (git's list when there is one) to a temporary folder, builds
and installs the package there with torch pinned by constraints.txt, checks that no extra's
package came with it, and then, from outside the source tree:

1. imports the engine, the gRPC black box and server, and runs ``deepzero-oracle --help``,
   ``python -m deepzero_oracle --version`` and ``deepzero-oracle proto --path``;
2. runs examples/plain_function.py (a NumPy function minimised from its values alone);
3. serves a NumPy function with ``deepzero-oracle serve`` (127.0.0.1, port 0), queries it with
   ``GrpcBlackBox``, and stops it with SIGTERM;
4. asks for features of three extras and expects their one-line hints (exit code 2).

Exits non-zero, naming the step, on the first failure. `make test-core` runs it.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Top-level modules of the extras' packages: none may be installed by the core.
NOT_IN_CORE = ("matplotlib", "sklearn", "mlxtend", "PIL", "httpx", "phi", "phiml", "starlette", "uvicorn",
               "orjson", "dask", "distributed", "tensorboard", "prometheus_client", "nevergrad", "bayes_opt",
               "pandas")
IGNORED = (".git", ".venv", "build", "runs", "node_modules", "__pycache__", ".pytest_cache")

BLACK_BOX = '''
import numpy as np


def step(x):
    """x [N, 3] -> [N, 2]: a NumPy black box."""
    return np.stack([x.sum(axis=1), (x ** 2).sum(axis=1)], axis=1)
'''

QUERY = '''
import sys

import numpy as np
from deepzero_oracle.blackbox import GrpcBlackBox

with GrpcBlackBox(sys.argv[1], model="step", timeout=30) as box:
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    y = box(x).numpy()
assert np.allclose(y, [[3, 5], [12, 50]]), y
print("queried", sys.argv[1], y.tolist())
'''

IMPORTS = '''
import deepzero_oracle
from deepzero_oracle import CGE, RGE, CallableOracle, ModuleOracle, Trainer
from deepzero_oracle.blackbox import GrpcBlackBox
from deepzero_oracle.blackbox.spec import open_blackbox
from deepzero_oracle.server import serve_blackbox
from pathlib import Path
assert "site-packages" in deepzero_oracle.__file__, deepzero_oracle.__file__
assert (Path(deepzero_oracle.__file__).parent / "py.typed").is_file()
import torch
print("imports ok from", Path(deepzero_oracle.__file__).parent, "with torch", torch.__version__)
'''


class CheckFailed(Exception):
    """A step of the check failed; the message says which and why."""


def run(step: str, cmd: list[str], *, cwd: Path, expect: int = 0, timeout: float = 600, env=None) -> str:
    """Run ``cmd``; raise CheckFailed naming ``step`` unless it exits with ``expect``. Returns stdout+stderr."""
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    print(f"  {step}: exit {out.returncode} ({time.monotonic() - started:.1f} s)", flush=True)
    if out.returncode != expect:
        raise CheckFailed(f"{step}: exit {out.returncode}, expected {expect}\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def copy_sources(dest: Path) -> None:
    """The repository's files (tracked and new, not ignored) as a fresh clone would have them."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED, ".venv-*", "*.egg-info"))
        return
    for name in filter(None, listed):
        src, dst = ROOT / name, dest / name
        if not os.path.lexists(src):
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)


def serve_and_query(venv_bin: Path, work: Path) -> None:
    """``deepzero-oracle serve`` in the background, one query, SIGTERM by pid."""
    (work / "blackbox_fn.py").write_text(BLACK_BOX)
    (work / "query.py").write_text(QUERY)
    log = work / "serve.log"
    with log.open("w") as err:
        server = subprocess.Popen([str(venv_bin / "deepzero-oracle"), "serve", "blackbox_fn:step", "--host",
                                   "127.0.0.1", "--port", "0"], cwd=work, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # the "serving ... at HOST:PORT (" line, printed once listening
        ready, _, _ = select.select([server.stdout], [], [], 120)
        line = server.stdout.readline() if ready else ""
        address = subprocess.run(
            [str(venv_bin / "python"), "-c", "import sys; from deepzero_oracle.server.cli import serving_address; "
             "print(serving_address(sys.argv[1]) or '')", line], capture_output=True, text=True, check=True,
        ).stdout.strip()
        if not address:
            server.kill()
            raise CheckFailed(f"serve: no address in its first line {line!r}\n{log.read_text()}")
        print(f"  serve: {line.strip()}", flush=True)
        run("query (GrpcBlackBox)", [str(venv_bin / "python"), "query.py", address], cwd=work, timeout=120)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise CheckFailed("serve: still running 60 s after SIGTERM") from None
    if code != 0:
        raise CheckFailed(f"serve: exit {code} after SIGTERM\n{log.read_text()}")
    print("  serve: stopped by SIGTERM, exit 0", flush=True)


def expect_hint(venv_bin: Path, work: Path, extra: str, *args: str) -> None:
    """A feature of ``extra`` fails with exit 2 and one line naming ``pip install 'deepzero-oracle[EXTRA]'``."""
    out = run(f"deepzero-oracle {' '.join(args[:2])} without [{extra}]", [str(venv_bin / "deepzero-oracle"), *args],
              cwd=work, expect=2, timeout=300)
    lines = out.strip().splitlines()
    if len(lines) != 1 or f"pip install 'deepzero-oracle[{extra}]'" not in lines[0]:
        raise CheckFailed(f"without [{extra}]: expected one line naming the extra, got:\n{out}")


def check(tmp: Path, python: str) -> None:
    src, venv, work = tmp / "src", tmp / "venv", tmp / "work"
    work.mkdir()
    copy_sources(src)
    run("create venv", [python, "-m", "venv", str(venv)], cwd=tmp)
    bin_ = venv / "bin"
    pip = [str(bin_ / "python"), "-m", "pip", "--disable-pip-version-check"]
    run("pip install -c constraints.txt . (core only)", [*pip, "install", "-q", "-c", str(src / "constraints.txt"),
                                                          str(src)], cwd=tmp, timeout=1800)
    present = run("no extra installed", [str(bin_ / "python"), "-c", textwrap.dedent(f"""
        import importlib.util
        print(' '.join(m for m in {NOT_IN_CORE!r} if importlib.util.find_spec(m)))""")], cwd=work).strip()
    if present:
        raise CheckFailed(f"the core install brought in extras' packages: {present}")
    out = run("import the engine, gRPC black box and server", [str(bin_ / "python"), "-c", IMPORTS], cwd=work)
    pinned = next(line.split("==")[1] for line in (src / "constraints.txt").read_text().splitlines()
                  if line.startswith("torch=="))
    if f"torch {pinned}" not in out:
        raise CheckFailed(f"constraints.txt pins torch {pinned}, but: {out}")
    run("deepzero-oracle --help", [str(bin_ / "deepzero-oracle"), "--help"], cwd=work)
    run("python -m deepzero_oracle --version", [str(bin_ / "python"), "-m", "deepzero_oracle", "--version"], cwd=work)
    proto = run("deepzero-oracle proto --path", [str(bin_ / "deepzero-oracle"), "proto", "--path"], cwd=work).strip()
    if "service GRPCInferenceService" not in Path(proto).read_text():
        raise CheckFailed(f"proto --path: {proto} is not the schema")
    print(run("examples/plain_function.py", [str(bin_ / "python"), str(src / "examples" / "plain_function.py")],
              cwd=work).rstrip(), flush=True)
    serve_and_query(bin_, work)
    expect_hint(bin_, work, "rest", "serve", "blackbox_fn:step", "--port", "0", "--http-port", "0")
    expect_hint(bin_, work, "sim", "sol", "generate", "--out", str(work / "sol"))
    expect_hint(bin_, work, "apps", "train", "--dataset", "digits", "--out", str(work / "train"), "--quiet")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that creates the virtualenv")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="deepzero-core-"))
    started = time.monotonic()
    print(f"core-only check in {tmp}", flush=True)
    try:
        check(tmp, args.python)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"core-only check FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"core-only check passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
