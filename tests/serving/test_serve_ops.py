"""Server operations: Prometheus metrics, the KServe v2 statistics extension, graceful drain.

In-process servers (``serve_blackbox``) for the counts; ``deepzero-oracle serve`` in a child
process for SIGTERM. Every server binds 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepzero_oracle.wire.codec import datatype_of, encode_raw
from deepzero_oracle.server import serve_blackbox
from deepzero_oracle.server import cli as serve_cli
from deepzero_oracle.wire import oracle_pb2 as pb
from deepzero_oracle.wire import oracle_pb2_grpc as pb_grpc
from support.server_process import ServerProcess

import prometheus_client.parser as prom_parser  # noqa: E402 -- the test extra installs the metrics extra

TESTS = Path(__file__).resolve().parents[1]
TOKEN = "ops-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def auth() -> dict:
    """Fresh headers per call: tritonclient.http adds its own entries to the dict it gets."""
    return {"authorization": f"Bearer {TOKEN}"}


def double(x):
    """``x [N, D] -> 2 x``."""
    return x * 2.0


def fails(x):
    """A black box with a bug: INTERNAL."""
    raise RuntimeError("simulator crashed")


def infer_request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    """A raw-contents ModelInferRequest of one input ``x [N, ...]``."""
    req = pb.ModelInferRequest(model_name=model, raw_input_contents=[encode_raw(x)])
    req.inputs.add(name="x", datatype=datatype_of(x), shape=x.shape)
    return req


def rest_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "datatype": datatype_of(x), "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}


def grpc_code(fn, *args, **kwargs) -> grpc.StatusCode:
    """The status a gRPC call ends with (OK when it answers)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def scrape(url: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of a Prometheus text page."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in prom_parser.text_string_to_metric_families(r.text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def server():
    """Models ``double`` and ``fails`` with a token, REST and a metrics port."""
    with serve_blackbox({"double": double, "fails": fails}, token=TOKEN, http_port=0, metrics_port=0) as s:
        yield s


@pytest.fixture
def stubs(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), pb_grpc.OracleStub(channel)


def test_metrics_count_every_outcome_over_both_protocols(server, stubs):
    kserve, oracle = stubs
    x = np.arange(4.0).reshape(2, 2)
    for _ in range(3):
        reply = kserve.ModelInfer(infer_request("double", x), metadata=AUTH, timeout=10)
        assert np.frombuffer(reply.raw_output_contents[0]).tolist() == (2 * x).ravel().tolist()
    bad = x.copy()
    bad[1, 0] = np.nan
    assert grpc_code(kserve.ModelInfer, infer_request("double", bad), metadata=AUTH, timeout=10) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(kserve.ModelInfer, infer_request("nope", x), metadata=AUTH, timeout=10) \
        == grpc.StatusCode.NOT_FOUND
    assert grpc_code(kserve.ModelInfer, infer_request("fails", x), metadata=AUTH, timeout=10) \
        == grpc.StatusCode.INTERNAL
    assert grpc_code(kserve.ModelInfer, infer_request("double", x), timeout=10) \
        == grpc.StatusCode.UNAUTHENTICATED
    batch = pb.QueryBatchRequest(request=infer_request("double", np.ones((3, 2))), query_rows=[1, 2])
    assert not oracle.QueryBatch(batch, metadata=AUTH, timeout=10).errors
    # A stream counts each message: one answered, one for an unknown model (answered in-band).
    stream = [pb.QueryBatchRequest(request=infer_request(name, np.ones((2, 2)))) for name in ("double", "nope")]
    answers = list(oracle.QueryStream(iter(stream), metadata=AUTH, timeout=10))
    assert not answers[0].errors and answers[1].errors[0].index == -1

    url = f"{server.rest_url}/v2/models/double/infer"
    for rows in (1, 4):
        r = httpx.post(url, json=rest_body(np.ones((rows, 2))), headers=auth(), timeout=10)
        assert r.status_code == 200, r.text
    assert httpx.post(url, content=b"{not json", headers=auth(), timeout=10).status_code == 400
    assert httpx.post(url, json=rest_body(x), timeout=10).status_code == 401
    assert httpx.post(f"{server.rest_url}/v2/models/nope/infer", json=rest_body(x), headers=auth(),
                      timeout=10).status_code == 404

    # Both endpoints answer without the token (the REST API itself wants it).
    assert httpx.get(f"{server.rest_url}/v2", timeout=10).status_code == 401
    for samples in (scrape(server.metrics_url), scrape(f"{server.rest_url}/metrics")):
        requests = {(dict(labels)["model"], dict(labels)["protocol"], dict(labels)["status"]): value
                    for (name, labels), value in samples.items()
                    if name == "deepzero_oracle_requests_total" and value}
        assert requests == {
            ("double", "grpc", "OK"): 5, ("double", "grpc", "INVALID_ARGUMENT"): 1, ("", "grpc", "NOT_FOUND"): 2,
            ("fails", "grpc", "INTERNAL"): 1, ("", "grpc", "UNAUTHENTICATED"): 1,
            ("double", "rest", "OK"): 2, ("double", "rest", "INVALID_ARGUMENT"): 1,
            ("double", "rest", "UNAUTHENTICATED"): 1, ("", "rest", "NOT_FOUND"): 1,
        }
        assert sample(samples, "deepzero_oracle_rows_total", model="double", protocol="grpc") == 3 * 2 + 3 + 2
        assert sample(samples, "deepzero_oracle_rows_total", model="double", protocol="rest") == 1 + 4
        # Every request (any outcome) in the latency histogram once; the +Inf bucket holds them all.
        assert sample(samples, "deepzero_oracle_request_duration_seconds_count", model="double", protocol="grpc") == 6
        assert sample(samples, "deepzero_oracle_request_duration_seconds_bucket", model="double",
                      protocol="rest", le="+Inf") == 4
        # Black-box calls: 3 + 1 batch + 1 stream message over gRPC, 2 over REST, the failing one.
        assert sample(samples, "deepzero_oracle_blackbox_duration_seconds_count", model="double") == 7
        assert sample(samples, "deepzero_oracle_blackbox_duration_seconds_count", model="fails") == 1
        assert sample(samples, "deepzero_oracle_queue_duration_seconds_count", model="double") == 7
        for protocol in ("grpc", "rest"):
            assert sample(samples, "deepzero_oracle_inflight_requests", protocol=protocol) == 0
        assert sample(samples, "deepzero_oracle_queued_calls") == 0
        assert sample(samples, "deepzero_oracle_running_calls") == 0


def test_servers_in_one_process_keep_their_own_metrics(server, stubs):
    with serve_blackbox(double, model_name="double", http_port=0, metrics_port=0) as other:
        stubs[0].ModelInfer(infer_request("double", np.ones((5, 1))), metadata=AUTH, timeout=10)
        ours, theirs = scrape(server.metrics_url), scrape(other.metrics_url)
    assert sample(ours, "deepzero_oracle_rows_total", model="double", protocol="grpc") == 5
    assert sample(theirs, "deepzero_oracle_rows_total", model="double", protocol="grpc") == 0
    # Zero series exist before the first request, so rate() sees it.
    assert ("deepzero_oracle_requests_total",
            frozenset({"model": "double", "protocol": "rest", "status": "OK"}.items())) in theirs


def test_metrics_port_speaks_tls_with_the_servers_certificate(tmp_path):
    import ssl

    from support.grpcbb_helpers import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    with serve_blackbox(double, model_name="double", tls_cert=cert.read_bytes(), tls_key=key.read_bytes(),
                        metrics_port=0) as s:
        assert s.metrics_url.startswith("https://")
        r = httpx.get(s.metrics_url, verify=ssl.create_default_context(cafile=str(cert)), timeout=10)
        assert r.status_code == 200 and "deepzero_oracle_requests_total" in r.text
        with pytest.raises(httpx.TransportError):
            httpx.get(s.metrics_url.replace("https://", "http://"), timeout=10)


def _check_stats(stats: dict, *, requests: int, rows: int, failed: int):
    infer = stats["inference_stats"]
    assert stats["inference_count"] == rows and stats["execution_count"] == requests
    assert infer["success"]["count"] == requests and infer["fail"]["count"] == failed
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert infer[phase]["count"] == requests, phase
    assert 0 < infer["compute_infer"]["ns"] < infer["success"]["ns"]
    assert stats["last_inference"] / 1000 == pytest.approx(time.time(), abs=600)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_reads_the_statistics(server, protocol):
    module = importlib.import_module(f"tritonclient.{protocol}")
    if protocol == "grpc":
        client = module.InferenceServerClient(server.address)
    else:
        client = module.InferenceServerClient(server.rest_url.removeprefix("http://"))
    try:
        rows = [1, 2, 3]
        for n in rows:
            tensor = module.InferInput("x", [n, 2], "FP32")
            tensor.set_data_from_numpy(np.full((n, 2), n, np.float32))
            out = client.infer("double", [tensor], headers=auth()).as_numpy("output_0")
            assert out.tolist() == np.full((n, 2), 2 * n).tolist()
        tensor = module.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[np.inf, 0]], np.float32))
        with pytest.raises(module.InferenceServerException):
            client.infer("double", [tensor], headers=auth())
        stats = client.get_inference_statistics("double", headers=auth())
        everything = client.get_inference_statistics(headers=auth())
        if protocol == "grpc":  # tritonclient's own messages: to Triton's JSON layout
            stats = {"model_stats": [_as_dict(m) for m in stats.model_stats]}
            everything = {"model_stats": [_as_dict(m) for m in everything.model_stats]}
    finally:
        client.close()
    (one,) = stats["model_stats"]
    assert (one["name"], one["version"]) == ("double", "1")
    _check_stats(one, requests=len(rows), rows=sum(rows), failed=1)
    assert sorted(m["name"] for m in everything["model_stats"]) == ["double", "fails"]


def _as_dict(m) -> dict:
    """A ModelStatistics message as Triton's JSON layout."""
    phases = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    return {"name": m.name, "version": m.version, "last_inference": m.last_inference,
            "inference_count": m.inference_count, "execution_count": m.execution_count,
            "inference_stats": {p: {"count": getattr(m.inference_stats, p).count,
                                    "ns": getattr(m.inference_stats, p).ns} for p in phases}}


def test_statistics_unknown_model_and_extensions(server, stubs):
    kserve, _ = stubs
    assert grpc_code(kserve.ModelStatistics, pb.ModelStatisticsRequest(name="nope"), metadata=AUTH,
                     timeout=10) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(kserve.ModelStatistics, pb.ModelStatisticsRequest(), timeout=10) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(kserve.ModelStatistics, pb.ModelStatisticsRequest(version="7"), metadata=AUTH,
                     timeout=10) == grpc.StatusCode.NOT_FOUND
    fresh = kserve.ModelStatistics(pb.ModelStatisticsRequest(name="fails"), metadata=AUTH, timeout=10)
    assert fresh.model_stats[0].inference_count == 0 and fresh.model_stats[0].last_inference == 0
    r = httpx.get(f"{server.rest_url}/v2/models/nope/stats", headers=auth(), timeout=10)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = httpx.get(f"{server.rest_url}/v2/models/double/versions/1/stats", headers=auth(), timeout=10)
    assert r.status_code == 200 and r.json()["model_stats"][0]["name"] == "double"
    assert "model_statistics" in kserve.ServerMetadata(pb.ServerMetadataRequest(), metadata=AUTH).extensions
    assert "model_statistics" in httpx.get(f"{server.rest_url}/v2", headers=auth()).json()["extensions"]


def test_without_the_metrics_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    hint = "pip install 'deepzero-oracle[metrics]'"
    with pytest.raises(ImportError, match=re.escape(hint)):
        serve_blackbox(double, metrics_port=0)
    assert serve_cli.main(["support.serve_ops_functions:gated", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert hint in err and len(err.splitlines()) == 1
    with serve_blackbox(double, model_name="double", http_port=0) as s:  # the rest works without it
        r = httpx.get(f"{s.rest_url}/metrics", timeout=10)
        assert r.status_code == 501 and hint in r.json()["error"]
        httpx.post(f"{s.rest_url}/v2/models/double/infer", json=rest_body(np.ones((2, 1))), timeout=10)
        stats = httpx.get(f"{s.rest_url}/v2/models/double/stats", timeout=10).json()["model_stats"][0]
        assert stats["inference_count"] == 2


def test_stop_waits_for_running_calls_and_cuts_them_at_the_grace():
    gate, running = threading.Event(), threading.Event()

    def held(x):
        running.set()
        gate.wait(30)
        return x

    with serve_blackbox(held, model_name="held") as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(infer_request("held", np.ones((1, 1))), timeout=30)
        assert running.wait(30)
        try:
            assert s.stop(grace=0.2) == 1  # still running when the grace ended: cancelled
        finally:
            gate.set()
        assert call.exception(30).code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)

    gate.clear()
    running.clear()
    with serve_blackbox(held, model_name="held") as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(infer_request("held", np.ones((1, 1))), timeout=30)
        assert running.wait(30)
        with ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(s.stop, 60)
            _wait_until(lambda: s.telemetry.draining)
            s.hurry()  # a second signal: stop now, not after 60 s
            assert stopping.result(30) == 1
        gate.set()


def _wait_until(predicate, what: str = "condition", tries: int = 600) -> None:
    for _ in range(tries):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never came")


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _gated_server(tmp_path, *args):
    env = {**os.environ, "SERVE_OPS_MARKER": str(tmp_path / "running"),
           "SERVE_OPS_GATE": str(tmp_path / "gate")}
    return ServerProcess("support.serve_ops_functions:gated", "--http-port", "0", "--model-name", "gated", *args,
                         cwd=TESTS, env=env)


def test_sigterm_drains_then_exits_0(tmp_path):
    proc = _gated_server(tmp_path, "--grace", "60", "--metrics-port", "0")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            x = np.arange(3.0).reshape(3, 1)
            call = stub.ModelInfer.future(infer_request("gated", x), timeout=60)
            _wait_until((tmp_path / "running").exists, "the black-box call")
            proc.proc.send_signal(signal.SIGTERM)

            # Draining: health says NOT_SERVING everywhere, new requests are refused, the
            # running call goes on.
            _wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="gated"), timeout=5).ready
            assert grpc_code(stub.ModelInfer, infer_request("gated", x), timeout=5) == grpc.StatusCode.UNAVAILABLE
            assert httpx.get(f"{proc.rest_url}/v2/health/ready", timeout=5).status_code == 400
            assert httpx.get(f"{proc.rest_url}/v2/models/gated/ready", timeout=5).status_code == 400
            r = httpx.post(f"{proc.rest_url}/v2/models/gated/infer", json=rest_body(x), timeout=5)
            assert r.status_code == 503 and "draining" in r.json()["error"]
            assert proc.proc.poll() is None and not call.done()
            samples = scrape(serve_cli.serving_metrics_url(proc.line))
            assert sample(samples, "deepzero_oracle_inflight_requests", protocol="grpc") == 1
            assert sample(samples, "deepzero_oracle_running_calls") == 1
            # The refusals are counted (a gRPC one before its request is read: no model).
            assert sample(samples, "deepzero_oracle_requests_total", model="", protocol="grpc",
                          status="UNAVAILABLE") == 1
            assert sample(samples, "deepzero_oracle_requests_total", model="gated", protocol="rest",
                          status="UNAVAILABLE") == 1

            (tmp_path / "gate").touch()
            reply = call.result(60)
        assert np.frombuffer(reply.raw_output_contents[0]).tolist() == (x + 1).ravel().tolist()
        assert proc.proc.wait(60) == 0
        lines = _lines(proc)
        assert len(lines) == 1 and lines[0].startswith("deepzero-oracle: stopped (drained in"), lines
    finally:
        (tmp_path / "gate").touch()
        proc.stop()


def test_sigterm_cancels_what_outlives_the_grace_and_exits_0(tmp_path):
    proc = _gated_server(tmp_path, "--grace", "0.5")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer.future(infer_request("gated", np.ones((1, 1))), timeout=60)
            _wait_until((tmp_path / "running").exists, "the black-box call")
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0  # the gate never opens: the call is cut, not waited for
            assert call.exception(30).code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        lines = _lines(proc)
        assert len(lines) == 1 and "1 request(s) still running were cancelled" in lines[0], lines
    finally:
        (tmp_path / "gate").touch()
        proc.stop()


def _lines(proc: ServerProcess) -> list[str]:
    """What the child printed after its "serving" line (it has exited)."""
    out = []
    while True:
        line = proc.lines.get(timeout=10)
        if line is None:
            return out
        out.append(line.strip())
