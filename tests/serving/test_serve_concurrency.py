"""The server under concurrency from standard clients: tritonclient (gRPC and HTTP) with no
deadline and more threads than black-box slots, a full queue answering RESOURCE_EXHAUSTED /
429 (never INTERNAL / 500), the queue's own rules (:class:`CallQueue`), client-supplied numbers
that must never reach a timeout or an allocation unchecked, our clients' timeouts, and a soak
of mixed clients against ``deepzero-oracle serve`` with its memory checked.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from deepzero_oracle.blackbox import GrpcBlackBox, KServeBlackBox
from deepzero_oracle.wire.constants import NO_DEADLINE_SECONDS, check_timeout
from deepzero_oracle.wire.errors import WireError
from deepzero_oracle.server import serve_blackbox
from deepzero_oracle.server.host import CallQueue, deadline_of
from deepzero_oracle.wire import oracle_pb2 as pb
from support.server_process import ServerProcess

import tritonclient.grpc as grpcclient  # noqa: E402 -- the test extra installs tritonclient[grpc,http]
import tritonclient.http as httpclient  # noqa: E402

COLS = 3
THREADS = 8


def expected(x: np.ndarray) -> np.ndarray:
    """What every black box here answers: ``2 x + 1`` (exact in float32)."""
    return x * np.float32(2) + np.float32(1)


class SlowAffine:
    """``2 x + 1`` after a short sleep, so calls overlap and queue; remembers the most calls it
    ever saw running at once (the slots must bound it)."""

    def __init__(self, seconds: float = 0.003):
        self.seconds, self.running, self.peak, self.calls = seconds, 0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, x):
        with self._lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.seconds)
            return expected(x)
        finally:
            with self._lock:
                self.running -= 1


class QueueWatch:
    """Samples ``servicer.queued`` on a thread: the tests must show that requests really waited."""

    def __init__(self, servicer):
        self.servicer, self.peak = servicer, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.servicer.queued)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def run_threads(worker, count: int = THREADS) -> list[BaseException]:
    """Run ``worker(index)`` on ``count`` threads; the exceptions they raised."""
    errors: list[BaseException] = []

    def guarded(i):
        try:
            worker(i)
        except BaseException as e:  # noqa: BLE001 -- collected and asserted on by the caller
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return errors


@pytest.fixture(scope="module", params=[1, 2], ids=["1-slot", "2-slots"])
def served(request):
    """An in-process server (gRPC and REST) of SlowAffine with 1 or 2 slots."""
    fn = SlowAffine()
    with serve_blackbox(fn, model_name="affine", inputs=[f"x:FP32:-1,{COLS}"], max_concurrency=request.param,
                        max_pending=64, http_port=0) as server:
        yield server, fn


def _triton_infer(module, client, x: np.ndarray) -> np.ndarray:
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("affine", [tensor]).as_numpy("output_0")  # no client timeout: no deadline


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_threads_without_deadline_outnumber_slots(served, protocol):
    """8 tritonclient threads, no deadline, 1 or 64 rows a request, 1-2 slots: every request
    waits its turn and gets the right answer (a request without a deadline once overflowed the
    slot wait and failed INTERNAL)."""
    server, fn = served
    calls_before = fn.calls

    def worker(i):
        rng = np.random.default_rng(i)
        if protocol == "grpc":
            client = grpcclient.InferenceServerClient(server.address)
        else:
            client = httpclient.InferenceServerClient(server.rest_url.removeprefix("http://"))
        module = grpcclient if protocol == "grpc" else httpclient
        try:
            for rows in [1, 64] * 6:
                x = rng.standard_normal((rows, COLS)).astype(np.float32)
                np.testing.assert_array_equal(_triton_infer(module, client, x), expected(x))
        finally:
            client.close()

    with QueueWatch(server.servicer) as watch:
        errors = run_threads(worker)
    assert not errors, f"{len(errors)} of {THREADS} threads failed, first: {errors[0]!r}"
    assert fn.calls - calls_before == THREADS * 12
    assert fn.peak <= server.servicer.max_concurrency  # the slots held
    assert watch.peak >= 1, "no request ever queued: the test did not exercise the queue"
    assert server.servicer.queued == 0 and server.servicer.in_flight == 0


class Gate:
    """A black box that blocks until opened (``2 x + 1``), counting the calls that entered it."""

    def __init__(self):
        self.open, self.entered = threading.Event(), threading.Semaphore(0)

    def __call__(self, x):
        self.entered.release()
        assert self.open.wait(60), "the test never opened the gate"
        return expected(x)


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_full_queue_is_resource_exhausted_and_429_never_internal():
    """1 slot, room for 3: one call runs, two wait (no deadline), the fourth is refused at once
    with RESOURCE_EXHAUSTED (tritonclient gRPC, our client) or 429 (tritonclient HTTP, httpx);
    once the gate opens, the three admitted calls are answered correctly."""
    gate = Gate()
    with serve_blackbox(gate, model_name="affine", max_concurrency=1, max_pending=3, http_port=0) as server:
        x = np.arange(2 * COLS, dtype=np.float32).reshape(2, COLS)
        answers: list[np.ndarray] = []

        def admitted(i):
            client = grpcclient.InferenceServerClient(server.address)
            try:
                answers.append(_triton_infer(grpcclient, client, x + i))
            finally:
                client.close()

        errors: list[BaseException] = []
        waiting = threading.Thread(target=lambda: errors.extend(run_threads(admitted, 3)))
        waiting.start()
        try:
            assert gate.entered.acquire(timeout=30)
            _wait_until(lambda: server.servicer.queued == 2, "two calls queue")
            grpc_client = grpcclient.InferenceServerClient(server.address)
            with pytest.raises(Exception) as refused:
                _triton_infer(grpcclient, grpc_client, x)
            grpc_client.close()
            assert "RESOURCE_EXHAUSTED" in str(refused.value.status()), refused.value
            assert "--max-pending" in refused.value.message()
            http_client = httpclient.InferenceServerClient(server.rest_url.removeprefix("http://"))
            with pytest.raises(Exception) as refused_http:
                _triton_infer(httpclient, http_client, x)
            http_client.close()
            assert refused_http.value.status() == "429", refused_http.value
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, COLS], "data": [0.0] * COLS}]}
            r = httpx.post(server.rest_url + "/v2/models/affine/infer", json=body, timeout=30)
            assert r.status_code == 429 and "--max-pending" in r.json()["error"]
            with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
                GrpcBlackBox(server.address, timeout=30, retries=0)(x)
            assert server.servicer.queued == 2 and server.servicer.in_flight == 1
        finally:
            gate.open.set()
            waiting.join(60)
        assert not errors, errors
        got = sorted(answers, key=lambda a: float(a[0, 0]))
        for i, answer in enumerate(got):
            np.testing.assert_array_equal(answer, expected(x + i))


class FakeContext:
    """The two things ``OracleServicer.run`` asks a gRPC context."""

    def __init__(self, remaining, active: bool = True):
        self.remaining, self.active = remaining, active

    def time_remaining(self):
        return self.remaining

    def is_active(self):
        return self.active


def test_no_deadline_and_absurd_deadlines_mean_no_deadline():
    """grpc reports "no deadline" as ~9.2e18 s; that (or NaN, or more than the cap) is no
    deadline, a normal one is kept, a passed one is DEADLINE_EXCEEDED before queueing."""
    assert deadline_of(None) is None
    for remaining in (9.223372036854776e18, float("inf"), float("nan"), NO_DEADLINE_SECONDS * 2):
        assert deadline_of(FakeContext(remaining)) is None
    now = time.monotonic()
    assert now + 4 < deadline_of(FakeContext(5.0)) <= time.monotonic() + 5
    with serve_blackbox(SlowAffine(0.2), model_name="affine") as server:
        model = server.models["affine"]
        x = np.ones((1, COLS), np.float32)
        results = []
        first = threading.Thread(target=lambda: results.append(server.servicer.run(model, [x], FakeContext(9.2e18))))
        first.start()
        _wait_until(lambda: server.servicer.in_flight == 1, "the first call runs")
        # All slots busy and no deadline: this call waits (it used to overflow the lock's timeout).
        out = server.servicer.run(model, [x], FakeContext(9.223372036854776e18))
        first.join(30)
        np.testing.assert_array_equal(out[0], expected(x))
        np.testing.assert_array_equal(results[0][0], expected(x))
        with pytest.raises(WireError) as passed:
            server.servicer.run(model, [x], FakeContext(-1.0))
        assert passed.value.code == "DEADLINE_EXCEEDED"
        assert server.stop(float("inf")) == 0  # an endless grace reaches no clock either


def test_call_queue_rules():
    """Slots, FIFO admission, a full queue, deadlines, cancelled callers and closing."""
    with pytest.raises(ValueError, match="max_pending"):
        CallQueue(2, 1)
    q = CallQueue(1, 3)
    q.acquire()
    assert (q.in_flight, q.queued) == (1, 0)
    with pytest.raises(WireError) as late:
        q.acquire(deadline=time.monotonic() + 0.05)
    assert late.value.code == "DEADLINE_EXCEEDED" and q.queued == 0
    with pytest.raises(WireError) as gone:
        q.acquire(alive=lambda: False)
    assert gone.value.code == "CANCELLED" and q.queued == 0
    order: list[int] = []

    def waiter(i):
        q.acquire()
        order.append(i)

    threads = []
    for i in range(2):  # queue two callers, in a known order
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        _wait_until(lambda: q.queued == i + 1, f"waiter {i} queues")
    with pytest.raises(WireError) as full:
        q.acquire()
    assert full.value.code == "RESOURCE_EXHAUSTED" and full.value.http == 429
    q.release()
    _wait_until(lambda: order == [0], "the first waiter takes the slot")
    q.release()
    _wait_until(lambda: order == [0, 1], "the second waiter takes the slot")
    for t in threads:
        t.join(10)
    # Closing: new callers are refused, a waiting one gives up when the grace ends.
    outcome: list[str] = []

    def queued_then_closed():
        try:
            q.acquire()
            outcome.append("slot")
        except WireError as e:
            outcome.append(e.code)

    t = threading.Thread(target=queued_then_closed)
    t.start()
    _wait_until(lambda: q.queued == 1, "a caller queues")
    q.close(grace=0.05)
    t.join(10)
    assert outcome == ["UNAVAILABLE"]
    with pytest.raises(WireError) as stopping:
        q.acquire()
    assert stopping.value.code == "UNAVAILABLE"


def test_client_supplied_numbers_never_reach_an_allocation_unchecked():
    """Shapes too large for any array (even empty ones), too many dimensions, query_rows whose
    int64 sum wraps around: INVALID_ARGUMENT / 400, never INTERNAL / 500."""
    with serve_blackbox(expected, model_name="affine", http_port=0) as server:
        channel = grpc.insecure_channel(server.address)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        batch = channel.unary_unary("/deepzero_oracle.v1.Oracle/QueryBatch",
                                    request_serializer=pb.QueryBatchRequest.SerializeToString,
                                    response_deserializer=pb.QueryBatchResponse.FromString)
        bad_shapes = ([0, 10**18, 10**18], [2**62, 0], [1] * 40)
        for shape in bad_shapes:
            tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
            for request in (pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[b""]),
                            pb.ModelInferRequest(inputs=[tensor])):
                with pytest.raises(grpc.RpcError) as refused:
                    infer(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, refused.value.details())
        x = np.ones((3, COLS), np.float32)
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3, COLS])
        three_rows = pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[x.tobytes()])
        for rows in ([2**62, 2**62, 2**62, 2**62 + 3], [2**63 - 1, 2**63 - 1, 5], [0, 3], [1, 1, 1, 0]):
            with pytest.raises(grpc.RpcError) as refused:
                batch(pb.QueryBatchRequest(request=three_rows, query_rows=rows), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rows
        ok = batch(pb.QueryBatchRequest(request=three_rows, query_rows=[1, 2]), timeout=30)
        assert not ok.errors and list(ok.response.outputs[0].shape) == [3, COLS]
        channel.close()
        url = server.rest_url + "/v2/models/affine/infer"
        for shape in ([0, 10**30], [0, 2**62, 2**62], [1] * 40):
            as_json = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": []}]}
            head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                           "parameters": {"binary_data_size": 0}}]}).encode()
            for r in (httpx.post(url, json=as_json, timeout=30),
                      httpx.post(url, content=head, headers={"Inference-Header-Content-Length": str(len(head))},
                                 timeout=30)):
                assert r.status_code == 400, (shape, r.status_code, r.text)
        for header in ("9" * 5000, "-5", str(2**70)):
            r = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": header}, timeout=30)
            assert r.status_code == 400, (header, r.text)


def test_client_timeouts_are_checked_and_huge_ones_mean_no_deadline():
    """Our clients clamp huge timeouts (gRPC turns ~1e10 s into an already-passed deadline) and
    refuse zero, negative and NaN ones, naming the argument."""
    assert check_timeout(None) == NO_DEADLINE_SECONDS == check_timeout(float("inf")) == check_timeout(1e300)
    assert check_timeout(2.5) == 2.5
    for bad in (0, -1.0, float("nan"), "soon"):
        with pytest.raises(ValueError, match="timeout"):
            check_timeout(bad)
    with pytest.raises(ValueError, match="stream_timeout"):
        GrpcBlackBox("127.0.0.1:1", stream_timeout=-3)
    with pytest.raises(ValueError, match="max_message_mb"):
        GrpcBlackBox("127.0.0.1:1", max_message_mb=float("inf"))
    x = np.arange(2 * COLS, dtype=np.float32).reshape(2, COLS)
    with serve_blackbox(expected, model_name="affine", http_port=0) as server:
        for timeout in (1e12, float("inf"), None):
            boxes = [GrpcBlackBox(server.address, timeout=timeout),
                     KServeBlackBox(server.address, "affine", timeout=timeout),
                     KServeBlackBox(server.rest_url, "affine", protocol="rest", timeout=timeout)]
            for box in boxes:
                with box:
                    np.testing.assert_array_equal(box(x).numpy(), expected(x))
                    assert box.ready(timeout=timeout)


# -- soak: mixed clients against `deepzero-oracle serve`, memory checked ---------------------------
SOAK_FUNCTION = '''
import time

import numpy as np


def affine(x):
    time.sleep(0.001)
    return x * np.float32(2) + np.float32(1)
'''
# RSS may grow this much between the end of the warm-up and the end of the soak (allocator
# arenas and caches still settling); keeping one request's tensors (about 16 KiB on average
# here, in and out) per request would pass it within about 800 requests.
RSS_MARGIN_BYTES = 12 * 2**20


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _soak(tmp_path, seconds: float, warmup: float) -> dict:
    """Mixed clients (ours over gRPC, streams and REST; tritonclient gRPC and HTTP) with batches
    of 1..256 rows against a served function for ``seconds``; every answer checked."""
    (tmp_path / "soak_fn.py").write_text(SOAK_FUNCTION)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with ServerProcess("soak_fn:affine", "--http-port", "0", "--max-concurrency", "2", "--max-pending", "64",
                       "--input", "x:FP32:-1,16", cwd=tmp_path, env=env) as proc:
        rest_host = proc.rest_url.removeprefix("http://")
        stop = threading.Event()
        counts = {"requests": 0, "rows": 0}
        lock = threading.Lock()

        def one(kind: str):
            if kind == "ours-grpc":
                box = GrpcBlackBox(proc.address, timeout=None)
                return (lambda x: box(x).numpy()), box.close
            if kind == "ours-stream":
                box = GrpcBlackBox(proc.address, timeout=None)
                return (lambda x: next(iter(box.stream([x]))).numpy()), box.close
            if kind == "kserve-grpc":
                box = KServeBlackBox(proc.address, "affine", timeout=None)
                return (lambda x: box(x).numpy()), box.close
            if kind == "kserve-rest":
                box = KServeBlackBox(proc.rest_url, "affine", protocol="rest", timeout=None)
                return (lambda x: box(x).numpy()), box.close
            module = grpcclient if kind == "triton-grpc" else httpclient
            client = module.InferenceServerClient(proc.address if kind == "triton-grpc" else rest_host)
            return (lambda x: _triton_infer(module, client, x)), client.close

        kinds = ["ours-grpc", "ours-stream", "kserve-grpc", "kserve-rest", "triton-grpc", "triton-grpc",
                 "triton-http", "triton-http"]

        def worker(i):
            call, close = one(kinds[i])
            rng = random.Random(i)
            try:
                for _ in range(100_000):  # bounded; the time limit ends it long before
                    if stop.is_set():
                        return
                    rows = rng.choice((1, rng.randint(1, 256), 256))
                    x = np.random.default_rng(rng.getrandbits(32)).standard_normal((rows, 16)).astype(np.float32)
                    np.testing.assert_array_equal(call(x), expected(x))
                    with lock:
                        counts["requests"] += 1
                        counts["rows"] += rows
            finally:
                close()

        errors: list[BaseException] = []
        runner = threading.Thread(target=lambda: errors.extend(run_threads(worker, len(kinds))))
        runner.start()
        time.sleep(warmup)
        rss_warm = _rss_bytes(proc.pid)
        requests_warm = counts["requests"]
        time.sleep(seconds - warmup)
        stop.set()
        runner.join(120)
        rss_end = _rss_bytes(proc.pid)
        assert proc.proc.poll() is None, "the server died"
    assert not errors, f"{len(errors)} client(s) failed, first: {errors[0]!r}"
    assert counts["requests"] > requests_warm > 0, counts
    assert rss_end <= rss_warm + RSS_MARGIN_BYTES, (
        f"server RSS grew from {rss_warm / 2**20:.1f} MiB after the warm-up to {rss_end / 2**20:.1f} MiB "
        f"over {counts['requests'] - requests_warm} requests")
    return {**counts, "rss_warm": rss_warm, "rss_end": rss_end}


def test_soak_short(tmp_path):
    """A few seconds of the soak: mixed clients, every answer right, memory flat."""
    _soak(tmp_path, seconds=4.0, warmup=1.5)


@pytest.mark.slow
def test_soak_long(tmp_path):
    """The soak for 25 s."""
    _soak(tmp_path, seconds=25.0, warmup=5.0)
