"""MLServer as a peer process: made, started on 127.0.0.1, waited for and stopped by its pid.

Used by the tests (``from support.mlserver_peer import ...``) and by
benchmarks/bench_serving.py (which puts the repository's ``tests`` folder on ``sys.path``).
Standard library only: MLServer lives in its own virtual environment (it pins protobuf < 7),
made once by tests/mlserver/setup_venv.sh.

The usual model is a NumPy function served by the generic runtime
tests/mlserver/function_runtime.py (see :func:`function_model`); any other MLServer runtime
can be named as ``Model(implementation, ...)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

REPO = Path(__file__).resolve().parents[2]
MLSERVER_DIR = REPO / "tests" / "mlserver"
#: MLServer's virtual environment (DEEPZERO_MLSERVER_VENV overrides the default).
VENV = Path(os.environ.get("DEEPZERO_MLSERVER_VENV", REPO / ".venv-mlserver"))
HOST = "127.0.0.1"
FUNCTION_RUNTIME = "function_runtime.FunctionModel"


class Model(NamedTuple):
    """One model of MLServer's repository: ``implementation`` (``module.Class``, importable from
    the work folder), ``inputs``/``outputs`` as ``(name, datatype, shape)`` tuples, and
    ``extra`` (the model settings' ``parameters.extra``, or None)."""

    implementation: str
    inputs: list
    outputs: list
    extra: dict | None = None


def function_model(function: str, inputs: list, outputs: list) -> Model:
    """A model served by tests/mlserver/function_runtime.py: ``function`` is ``module:name``
    (importable from the work folder), called with the request's tensors and answering the
    first output."""
    return Model(FUNCTION_RUNTIME, inputs, outputs, {"function": function})


@dataclass(frozen=True)
class Peer:
    """A started MLServer: its ports on 127.0.0.1, process id and work folder."""

    grpc_port: int
    http_port: int
    pid: int
    work_dir: Path

    @property
    def grpc(self) -> str:
        """``HOST:PORT`` of the gRPC service."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def rest(self) -> str:
        """``HOST:PORT`` of the REST service (what tritonclient.http takes)."""
        return f"{HOST}:{self.http_port}"

    @property
    def rest_url(self) -> str:
        """``http://HOST:PORT`` of the REST service."""
        return f"http://{self.rest}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before use)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_ready(url: str) -> bool:
    """True when a GET of ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process we started (by its pid), SIGKILL it if it is still up after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str,
               log_tail: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200; RuntimeError with ``log_tail()`` if ``proc`` exits or
    ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if http_ready(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not get ready at {url} in {timeout:.0f} s "
                       f"(exit code {proc.poll()}); log tail:\n{log_tail()}")


def ensure_venv(venv: Path = VENV) -> None:
    """Create MLServer's virtual environment with tests/mlserver/setup_venv.sh (a no-op when it
    is already there; the first time needs PyPI); RuntimeError with the script's stderr if not."""
    setup = subprocess.run(["bash", str(MLSERVER_DIR / "setup_venv.sh"), str(venv)],
                           env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
                           capture_output=True, text=True, timeout=1800)
    if setup.returncode != 0:
        raise RuntimeError(f"could not create {venv} (needs PyPI access once):\n{setup.stderr[-3000:]}")


def ensure_mlserver_venv(venv: Path = VENV) -> None:
    """For tests: :func:`ensure_venv`, skipped when DEEPZERO_SKIP_MLSERVER is set, a test
    failure (not an error deep in a fixture) when the venv cannot be made."""
    import pytest

    if os.environ.get("DEEPZERO_SKIP_MLSERVER"):
        pytest.skip("DEEPZERO_SKIP_MLSERVER is set")
    try:
        ensure_venv(venv)
    except RuntimeError as e:
        pytest.fail(str(e))


def _tensors(specs: list) -> list[dict]:
    return [{"name": name, "datatype": datatype, "shape": list(shape)} for name, datatype, shape in specs]


def _write_repository(work: Path, models: dict[str, Model | tuple], files) -> None:
    """The runtime, ``files`` and one ``<name>/model-settings.json`` per model in ``work``."""
    for path in (MLSERVER_DIR / "function_runtime.py", *map(Path, files)):
        shutil.copy(path, work / path.name)
    for name, model in models.items():
        model = Model(*model)
        settings = {"name": name, "implementation": model.implementation,
                    "inputs": _tensors(model.inputs), "outputs": _tensors(model.outputs)}
        if model.extra:
            settings["parameters"] = {"extra": model.extra}
        (work / name).mkdir(exist_ok=True)
        (work / name / "model-settings.json").write_text(json.dumps(settings))


def _start_once(work: Path, models, venv: Path, startup_timeout: float) -> tuple[subprocess.Popen, Peer]:
    settings = {"host": HOST, "http_port": free_port(), "grpc_port": free_port(), "parallel_workers": 0,
                "metrics_endpoint": None, "load_models_at_startup": True}
    (work / "settings.json").write_text(json.dumps(settings))
    log_path = work / "mlserver.log"
    # MLServer's own venv: the caller's PYTHONPATH / VIRTUAL_ENV would mix two environments
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", "."], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    peer = Peer(settings["grpc_port"], settings["http_port"], proc.pid, work)
    deadline = time.monotonic() + startup_timeout
    try:
        # every model, not only the server: a model that fails to load leaves the server 'ready'
        for name in models:
            wait_ready(proc, f"{peer.rest_url}/v2/models/{name}/ready", max(0.0, deadline - time.monotonic()),
                       f"MLServer model {name!r}", lambda: log_path.read_text(errors="replace")[-3000:])
    except BaseException:
        stop(proc)
        raise
    return proc, peer


@contextlib.contextmanager
def start_mlserver(work_dir: Path | None, models: dict[str, Model | tuple], venv: Path = VENV, *,
                   files=(), startup_timeout: float = 120.0, attempts: int = 2) -> Iterator[Peer]:
    """``mlserver start`` (from ``venv``) on 127.0.0.1 serving ``models``; yields a :class:`Peer`
    once every model answers ``/v2/models/<name>/ready``, and stops it by its pid on exit.

    ``work_dir`` (None: a temporary folder) receives settings.json (free ports,
    ``parallel_workers: 0``, no metrics endpoint), function_runtime.py, copies of ``files``
    (the modules the runtimes import), one ``<name>/model-settings.json`` per model, and
    mlserver.log. ``models`` maps a name to a :class:`Model` or its tuple. A start that fails
    (a free port can be taken between choosing and binding it) is retried ``attempts`` times in
    all; then RuntimeError with the log's tail.
    """
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlserver-peer-")))
        work_dir = Path(work_dir)
        _write_repository(work_dir, models, files)
        for attempt in range(1, attempts + 1):
            try:
                proc, peer = _start_once(work_dir, models, venv, startup_timeout)
                break
            except RuntimeError:
                if attempt == attempts:
                    raise
        try:
            yield peer
        finally:
            stop(proc)
