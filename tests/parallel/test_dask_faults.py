"""A Dask worker killed mid-step: the step still completes, bit-identical to inline, with the
oracle's query count exact. And ``tls://``: client, scheduler and worker speaking TLS.

A real ``dask scheduler`` and two ``dask worker`` processes (no nanny, so a worker's PID is the
process that computes, and a killed worker is not restarted) run on 127.0.0.1, started here from
the environment's own ``bin`` and stopped by their PIDs. The black box sleeps a little per call
and leaves a marker naming its process, so the kill lands while that worker computes a chunk.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepzero_oracle import CGE, CallableOracle
from deepzero_oracle.parallel import ParallelOracle, open_executor

import distributed  # noqa: E402,F401 -- the test extra installs dask[distributed]

DIM = 160
BIN = Path(sys.executable).parent


class SlowBowl:
    """A float64 loss of theta [dim] that takes ``seconds`` per call and, when ``markers`` is a
    folder, leaves a file ``PID-NS`` there per call."""

    def __init__(self, seconds: float = 0.0, markers: str | None = None):
        self.seconds, self.markers = seconds, markers

    def __call__(self, theta):
        if self.markers:
            Path(self.markers, f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(self.seconds)
        return (theta - 0.25).pow(2).sum() + torch.cos(3 * theta).sum()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with code {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"dask scheduler did not listen on 127.0.0.1:{port} within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@contextlib.contextmanager
def dask_cluster(logs: Path, workers: int, protocol: str = "tcp", tls: list[str] = ()):
    """``(address, {pid: worker process})`` of a ``dask scheduler`` and one-thread ``dask worker``
    processes on 127.0.0.1 (``tls``: their TLS flags), stopped by PID on exit."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # workers import this module (the black box pickles by reference)
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    logs.mkdir(exist_ok=True)
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--protocol", protocol, "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard", *tls],
            stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"), env=env))
        wait_for_port(port, started[0])
        for i in range(workers):
            started.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", f"{protocol}://{address}", "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--name", f"worker-{i}", *tls],
                stdout=subprocess.DEVNULL, stderr=open(logs / f"worker-{i}.log", "w"), env=env))
        yield address, {p.pid: p for p in started[1:]}
    finally:
        for process in reversed(started):
            stop(process)


@pytest.fixture
def cluster(tmp_path):
    """``(address, {pid: worker process})`` of a scheduler and two one-thread workers."""
    with dask_cluster(tmp_path / "logs", 2) as running:
        yield running


def test_a_worker_killed_mid_step_changes_nothing(cluster, tmp_path):
    address, workers = cluster
    theta = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    inline = CGE(mu=1e-3).estimate(CallableOracle(SlowBowl(), DIM), theta)
    markers = tmp_path / "markers"
    markers.mkdir()
    with open_executor(f"dask://{address}", connect_timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        oracle = ParallelOracle(CallableOracle(SlowBowl(0.02, str(markers)), DIM), client)
        with cf.ThreadPoolExecutor(1) as here:
            step = here.submit(CGE(mu=1e-3).estimate, oracle, theta)
            deadline, victim = time.monotonic() + 120, None
            while victim is None:  # the first worker 3 calls into a coordinate chunk (32 calls)
                assert time.monotonic() < deadline and not step.done(), "no worker computed a chunk"
                calls = collections.Counter(int(p.name.split("-")[0]) for p in markers.iterdir())
                victim = next((pid for pid, n in calls.items() if n >= 3 and pid in workers), None)
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)  # mid-chunk: the chunk has ~0.6 s of calls left
            assert not step.done(), "the step ended before the kill landed"
            estimate = step.result(timeout=300)
        assert workers[victim].wait(timeout=30) == -signal.SIGKILL
        assert len(client.nthreads()) == 1  # the survivor finished the step
    assert torch.equal(estimate, inline)
    assert oracle.queries == DIM + 1  # every chunk counted once, the re-run one included


def test_tls_between_client_scheduler_and_worker(tmp_path, monkeypatch):
    from support.grpcbb_helpers import self_signed_cert

    cert, key = self_signed_cert(tmp_path)  # its own CA: every party trusts it
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    theta = torch.linspace(-1, 1, 40, dtype=torch.float64)
    with dask_cluster(tmp_path / "logs", 1, protocol="tls", tls=tls) as (address, _):
        with pytest.raises(ValueError, match="DEEPZERO_ORACLE_DASK_TLS_CA_FILE"):
            with open_executor(f"tls://{address}"):
                pass
        monkeypatch.setenv("DEEPZERO_ORACLE_DASK_TLS_CA_FILE", str(cert))
        monkeypatch.setenv("DEEPZERO_ORACLE_DASK_TLS_CERT", str(cert))
        monkeypatch.setenv("DEEPZERO_ORACLE_DASK_TLS_KEY", str(key))
        with open_executor(f"tls://{address}", connect_timeout=60) as client:
            assert client.scheduler.address == f"tls://{address}"
            estimate = CGE(mu=1e-3).estimate(ParallelOracle(CallableOracle(SlowBowl(), 40), client), theta)
    assert torch.equal(estimate, CGE(mu=1e-3).estimate(CallableOracle(SlowBowl(), 40), theta))


def test_a_scheduler_without_workers_is_refused(tmp_path):
    from deepzero_oracle.errors import ExecutorUnavailable

    with dask_cluster(tmp_path / "logs", 0) as (address, _):
        with pytest.raises(ExecutorUnavailable, match="has no workers") as err:
            with open_executor(f"dask://{address}", connect_timeout=2):
                pytest.fail("no executor should be yielded")
    assert f"dask worker tcp://{address}" in str(err.value)
