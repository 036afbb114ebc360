"""Replicas of a served black box: a killed, stalled or restarted replica never changes a
result or a query count; every replica gone is a clear error with the checkpoint kept, and the
run resumes bit for bit once they are back. Also ``serve --workers N`` on one port."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, ModuleOracle, ParallelOracle, SampledBatches, Trainer
from deepzero_oracle.apps.cli import exit_code
from deepzero_oracle.blackbox import BlackBoxReplicasUnavailable, BlackBoxUnavailable, GrpcBlackBox
from deepzero_oracle.blackbox.spec import BlackBoxSpec, open_blackbox
from deepzero_oracle.blackbox.transport import worker_of
from deepzero_oracle.server import serve_blackbox
from deepzero_oracle.errors import EXIT_UNREACHABLE
from support.grpcbb_helpers import self_signed_cert
from support.server_process import ServerProcess

HERE = Path(__file__).resolve().parents[1]  # tests/: the servers import support.replica_functions
TARGET = "support.replica_functions:slow_head"


def _replica(*args: str) -> ServerProcess:
    return ServerProcess(TARGET, *args, cwd=HERE)


def _spec(*servers) -> str:
    return ",".join(f"grpc://{s.address}" for s in servers)


def _draw(generator: torch.Generator):
    """One step's batch: x [8, 4], y [8, 3]."""
    return torch.randn(8, 4, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator,
                                                                                     dtype=torch.float64)


def _train(box, steps: int, out_dir=None, callbacks=(), executor=None):
    """A tiny learner (51 parameters) before the served head, CGE through the Trainer: 52 queries
    per step in 7 black-box calls (``max_batch=8``). Returns (theta, queries, trainer)."""
    torch.manual_seed(0)
    learner = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    oracle = ModuleOracle(learner, F.mse_loss, blackbox=box, max_batch=8)
    wrapped = oracle if executor is None else ParallelOracle(oracle, executor)
    trainer = Trainer(wrapped, CGE(mu=1e-4), torch.optim.SGD(learner.parameters(), lr=0.05), out_dir=out_dir,
                      checkpoint_every=1 if out_dir else None, callbacks=callbacks, seed=0, progress=False)
    trainer.fit(SampledBatches(_draw, seed=0), max_steps=steps)
    theta = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
    return theta, wrapped.queries, trainer


@pytest.fixture(scope="module")
def reference():
    """Three steps against a single server: parameters, queries and black-box calls."""
    with _replica() as server, GrpcBlackBox(server.address, timeout=30) as box:
        theta, queries, _ = _train(box, steps=3)
        return theta, queries, box.calls


def test_spec_with_replicas_parses_and_refuses_mixtures():
    spec = BlackBoxSpec.parse("grpc://127.0.0.1:1/m,grpc://127.0.0.1:2/m")
    assert spec.targets == ["127.0.0.1:1", "127.0.0.1:2"] and spec.name == "m"
    assert str(spec) == "grpc://127.0.0.1:1/m,grpc://127.0.0.1:2/m"
    assert BlackBoxSpec.parse(str(spec)) == spec
    with pytest.raises(ValueError, match="share the scheme and the model"):
        BlackBoxSpec.parse("grpc://127.0.0.1:1,kserve://127.0.0.1:2/m")
    with pytest.raises(ValueError, match="share the scheme and the model"):
        BlackBoxSpec.parse("kserve://127.0.0.1:1/a,kserve://127.0.0.1:2/b")
    with pytest.raises(ValueError, match="only remote specs"):
        BlackBoxSpec.parse("grpc://127.0.0.1:1,mod:fn")
    with pytest.raises(ValueError, match="appears twice"):
        BlackBoxSpec.parse("grpc://127.0.0.1:1,grpc://127.0.0.1:1")
    tls = BlackBoxSpec.parse("grpcs://127.0.0.1:1/m,grpcs://127.0.0.1:2/m")
    assert tls.tls and tls.kind == "grpc" and BlackBoxSpec.parse(str(tls)) == tls
    assert BlackBoxSpec.parse("kserve+https://h:1/m") == BlackBoxSpec("kserve+http", "h:1", "m", tls=True)
    with pytest.raises(ValueError, match="share the scheme and the model"):
        BlackBoxSpec.parse("grpcs://127.0.0.1:1,grpc://127.0.0.1:2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_replica_is_named_before_any_work():
    dead = f"127.0.0.1:{_free_port()}"
    with _replica() as live:
        with pytest.raises(BlackBoxUnavailable, match=re.escape(dead)) as info:
            open_blackbox(f"grpc://{live.address},grpc://{dead}", timeout=5)
        assert live.address not in str(info.value).split("cannot reach")[1]
        assert exit_code(info.value) == EXIT_UNREACHABLE


def test_killed_replica_mid_step_changes_nothing(reference):
    a, b = _replica(), _replica()
    try:
        box = open_blackbox(_spec(a, b), timeout=30)
        # A step takes 7 calls of >= 50 ms: the kill lands in the middle of the first steps.
        killer = threading.Timer(0.5, a.kill)
        killer.start()
        theta, queries, _ = _train(box, steps=3)
        killer.join()
        assert a.proc.poll() is not None  # it was really killed during the run
        assert torch.equal(theta, reference[0])  # bit-identical parameters
        assert queries == reference[1] and box.calls == reference[2]  # every query counted once
    finally:
        a.kill()
        b.stop()


def test_stalled_replica_calls_go_elsewhere_after_the_deadline(reference):
    a, b = _replica(), _replica()
    try:
        box = open_blackbox(_spec(a, b), timeout=1.0)
        threading.Timer(0.3, os.kill, (a.pid, signal.SIGSTOP)).start()
        resume = threading.Timer(3.0, os.kill, (a.pid, signal.SIGCONT))
        resume.start()
        theta, queries, _ = _train(box, steps=3)
        resume.join()
        assert box.transport.resent >= 1  # a call met the stopped replica and went to the other
        assert torch.equal(theta, reference[0])
        assert queries == reference[1] and box.calls == reference[2]
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.stop()
        b.stop()


def test_all_replicas_gone_then_back_resumes_bit_for_bit(tmp_path, reference):
    a, b = _replica(), _replica()
    ports = (a.port, b.port)
    try:
        box = open_blackbox(_spec(a, b), timeout=2.0)

        class KillAllAfterStep2:
            def on_step_end(self, trainer, metrics):
                if trainer.step == 2:
                    a.kill()
                    b.kill()

            def on_epoch_end(self, trainer, metrics):
                pass

        with pytest.raises(BlackBoxReplicasUnavailable) as info:
            _train(box, steps=4, out_dir=tmp_path / "run", callbacks=[KillAllAfterStep2()])
        message = str(info.value)
        assert a.address in message and b.address in message and "no replica answered" in message
        assert exit_code(info.value) == EXIT_UNREACHABLE
        assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2
        a, b = _replica("--port", str(ports[0])), _replica("--port", str(ports[1]))
        theta, queries, trainer = _train(box, steps=4, out_dir=tmp_path / "run")  # the same box reconnects
        assert trainer.step == 4
        uninterrupted = _train(box, steps=4, out_dir=tmp_path / "straight")
        assert torch.equal(theta, uninterrupted[0]) and queries == uninterrupted[1]
        assert torch.equal(_train(box, steps=3)[0], reference[0])
    finally:
        a.kill()
        b.kill()


def test_replicas_pickle_and_serve_a_thread_pool(reference):
    with _replica() as a, _replica() as b:
        box = open_blackbox(_spec(a, b), timeout=30)
        copy = pickle.loads(pickle.dumps(box))
        x = torch.randn(5, 3, dtype=torch.float64)
        assert torch.equal(copy(x), box(x))
        with ThreadPoolExecutor(2) as pool:
            theta, queries, _ = _train(box, steps=3, executor=pool)
        assert torch.equal(theta, reference[0]) and queries == reference[1]


def test_serve_workers_share_one_port_and_stop_together():
    server = _replica("--workers", "2")
    try:
        pids = [int(p) for p in re.search(r"pids ([\d, ]+)\)", server.line).group(1).split(", ")]
        assert len(pids) == 2 and server.pid not in pids
        x = torch.randn(4, 3, dtype=torch.float64)
        answers = [GrpcBlackBox(server.address, timeout=30)(x) for _ in range(4)]
        assert all(torch.equal(y, answers[0]) for y in answers)
        os.kill(pids[0], signal.SIGKILL)  # a worker dies: the other one takes every new connection
        assert all(torch.equal(GrpcBlackBox(server.address, timeout=30)(x), answers[0]) for _ in range(4))
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0  # SIGTERM to the parent reaches the workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_threads_with_copies_reach_every_worker(tmp_path):
    """Two threads with pickled copies of one box (as ParallelOracle hands them out) land on the
    two workers every time, over TLS with a token; the kernel alone would pair them on one
    worker half the time."""
    cert, key = self_signed_cert(tmp_path)
    server = ServerProcess("support.replica_functions:worker_pid", "--workers", "2", "--tls-cert", str(cert),
                           "--tls-key", str(key), "--token", "t", cwd=HERE)
    try:
        pids = {int(p) for p in re.search(r"pids ([\d, ]+)\)", server.line).group(1).split(", ")}
        box = GrpcBlackBox(server.address, timeout=30, tls=str(cert), token="t")
        assert worker_of(box.transport.channel, box.transport.metadata) in {(0, 2), (1, 2)}
        x = torch.zeros(3, 2, dtype=torch.float64)
        for _ in range(5):  # new threads, new connections each time
            both = threading.Barrier(2)

            def answer(copy):
                both.wait()  # one copy per thread
                return int(copy(x)[0, 0])

            with ThreadPoolExecutor(2) as pool:
                answered = list(pool.map(answer, [pickle.loads(pickle.dumps(box)) for _ in range(2)]))
            assert set(answered) == pids
    finally:
        assert server.stop() == 0
    with _replica() as single:
        assert worker_of(GrpcBlackBox(single.address, timeout=30).transport.channel) is None


def test_replicas_over_tls_with_a_token_share_the_calls(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    calls = {"a": 0, "b": 0}

    def counting(name):
        def head(x):
            calls[name] += 1
            return 2 * x
        return head

    with serve_blackbox(counting("a"), model_name="head", tls_cert=str(cert), tls_key=str(key), token="t") as a, \
            serve_blackbox(counting("b"), model_name="head", tls_cert=str(cert), tls_key=str(key), token="t") as b:
        spec = f"grpcs://{a.address},grpcs://{b.address}"
        x = torch.ones(2, 3, dtype=torch.float64)
        with pytest.raises(BlackBoxUnavailable):  # the system's roots do not know a self-signed certificate
            open_blackbox(spec, timeout=5, token="t")
        monkeypatch.setenv("DEEPZERO_ORACLE_TLS_CA", str(tmp_path / "missing.pem"))
        with pytest.raises(FileNotFoundError, match="DEEPZERO_ORACLE_TLS_CA"):
            open_blackbox(spec, timeout=5, token="t")
        monkeypatch.setenv("DEEPZERO_ORACLE_TLS_CA", str(cert))
        box = open_blackbox(spec, timeout=30, token="t")
        copy = pickle.loads(pickle.dumps(box))  # the CA and the token travel with it
        for _ in range(4):
            assert torch.equal(box(x), 2 * x) and torch.equal(copy(x), 2 * x)
        assert calls["a"] > 0 and calls["b"] > 0 and calls["a"] + calls["b"] == 8
        rest = open_blackbox(f"kserve+https://{a.address}/head", timeout=5, token="t")
        assert rest.base.startswith("https://")


def test_serve_workers_refuse_rest_and_fail_when_a_worker_cannot_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 2"):
        _replica("--workers", "2", "--http-port", "0")
    # Bad flags stop the supervisor before any worker starts; this module imports there but
    # not in a worker process.
    (tmp_path / "not_in_workers.py").write_text(
        "import multiprocessing\n\nif multiprocessing.parent_process() is not None:\n"
        "    raise RuntimeError('not in a worker')\n\n\ndef head(x):\n    return x\n")
    with pytest.raises(RuntimeError, match="exited with 1.*failed to start"):
        ServerProcess("not_in_workers:head", "--workers", "2", cwd=tmp_path)


def test_rest_replicas_rotate_and_survive_a_killed_one():
    a, b = _replica("--http-port", "0"), _replica("--http-port", "0")
    try:
        dead = f"127.0.0.1:{_free_port()}"
        rest = [s.rest_url.removeprefix("http://") for s in (a, b)]
        with pytest.raises(BlackBoxUnavailable, match=re.escape(dead)):
            open_blackbox(f"kserve+http://{rest[0]}/slow_head,kserve+http://{dead}/slow_head", timeout=5)
        box = open_blackbox(",".join(f"kserve+http://{r}/slow_head" for r in rest), timeout=10)
        x = torch.randn(5, 3, dtype=torch.float64)
        first = box(x)
        a.kill()
        for _ in range(4):  # every other call goes to the dead address first, then to the live one
            assert torch.allclose(box(x), first, rtol=0, atol=1e-15)
        assert box.calls == 5
    finally:
        a.kill()
        b.stop()


def test_stalled_rest_replica_is_skipped_after_the_deadline():
    a, b = _replica("--http-port", "0"), _replica("--http-port", "0")
    try:
        box = open_blackbox(",".join(f"kserve+http://{s.rest_url.removeprefix('http://')}/slow_head" for s in (a, b)),
                            timeout=1.0)
        x = torch.randn(5, 3, dtype=torch.float64)
        first = box(x)
        os.kill(a.pid, signal.SIGSTOP)  # a stalls: it keeps its connections but never answers
        for _ in range(4):  # the calls whose turn is a's wait one deadline, then go to b
            assert torch.allclose(box(x), first, rtol=0, atol=1e-15)
        assert box.calls == 5
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.stop()
        b.stop()

