"""The KServe v2 REST endpoint (`serve --http-port`): routes, JSON and binary tensors, token,
TLS, limits, statuses, graceful stop; and KServeBlackBox(protocol="rest") against it."""

from __future__ import annotations

import json
import ssl
import sys
import threading

import httpx
import numpy as np
import pytest
import torch

from deepzero_oracle.blackbox import (
    BlackBoxInvalidArgument,
    BlackBoxNotFound,
    BlackBoxUnauthenticated,
    GrpcBlackBox,
    KServeBlackBox,
)
from deepzero_oracle.wire.constants import BINARY_HEADER
from deepzero_oracle.server import serve_blackbox
from support.grpcbb_helpers import self_signed_cert

TOKEN = "rest-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def step(state, params):
    """A NumPy solver step: ``state [N, C, H, W]``, ``params [N, 2]`` -> ``[N, C, H, W]``."""
    return state * params[:, 0, None, None, None] + params[:, 1, None, None, None]


def scale(x):
    """``x [N, ...] -> 3 x`` (NumPy)."""
    return x * 3


@pytest.fixture(scope="module")
def server():
    """One in-process server with gRPC and REST, a token and a 1 MiB message limit."""
    with serve_blackbox({"step": step, "scale": scale}, token=TOKEN, http_port=0, max_message_mb=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.rest_url, headers=AUTH, timeout=30) as client:
        yield client


def _inputs(rows=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, 1, 4, 5)), rng.normal(size=(rows, 2))


def _json_body(state, params, **extra):
    return {"inputs": [{"name": "state", "datatype": "FP64", "shape": list(state.shape),
                        "data": state.ravel().tolist()},
                       {"name": "params", "datatype": "FP64", "shape": list(params.shape),
                        "data": params.tolist()}],  # nested data is accepted too
            **extra}


def test_json_infer_is_exact_and_matches_grpc(server, http):
    state, params = _inputs()
    r = http.post("/v2/models/step/infer", json=_json_body(state, params, id="q1"))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"] == "q1" and answer["model_name"] == "step"
    (out,) = answer["outputs"]
    assert out["datatype"] == "FP64" and out["shape"] == [3, 1, 4, 5]
    got = np.asarray(out["data"]).reshape(out["shape"])
    np.testing.assert_array_equal(got, step(state, params))  # bit for bit through JSON
    with GrpcBlackBox(server.address, model="step", token=TOKEN, timeout=30) as box:
        assert np.array_equal(box(state, params).numpy(), got)


def test_binary_extension_in_and_out(http):
    state, params = _inputs(2)
    head = {"inputs": [{"name": "state", "datatype": "FP64", "shape": list(state.shape),
                        "parameters": {"binary_data_size": state.nbytes}},
                       {"name": "params", "datatype": "FP64", "shape": [2, 2], "data": params.ravel().tolist()}],
            "parameters": {"binary_data_output": True}}
    header = json.dumps(head).encode()
    r = http.post("/v2/models/step/infer", content=header + state.tobytes(),
                  headers={BINARY_HEADER: str(len(header))})
    assert r.status_code == 200, r.text
    length = int(r.headers[BINARY_HEADER])
    answer = json.loads(r.content[:length])
    (out,) = answer["outputs"]
    assert out["parameters"]["binary_data_size"] == state.nbytes and "data" not in out
    got = np.frombuffer(r.content[length:], "<f8").reshape(out["shape"])
    np.testing.assert_array_equal(got, step(state, params))
    # a requested output without binary_data comes back as JSON
    r = http.post("/v2/models/step/infer", json=_json_body(state, params, outputs=[{"name": "output_0"}]))
    assert BINARY_HEADER not in r.headers and r.json()["outputs"][0]["name"] == "output_0"


def test_health_metadata_and_readiness(server, http):
    plain = httpx.Client(base_url=server.rest_url, timeout=30)  # no token: health checks only
    assert plain.get("/v2/health/live").status_code == 200
    assert plain.get("/v2/health/ready").json() == {"ready": True}
    assert plain.get("/v2").status_code == 401
    meta = http.get("/v2").json()
    assert meta["name"] == "deepzero-oracle" and "binary_tensor_data" in meta["extensions"]
    http.post("/v2/models/step/infer", json=_json_body(*_inputs()))  # outputs are known after a call
    for path in ("/v2/models/step", "/v2/models/step/versions/1"):
        md = http.get(path).json()
        assert md["name"] == "step" and md["versions"] == ["1"]
        assert [t["name"] for t in md["inputs"]] == ["state", "params"]
        assert md["inputs"][1] == {"name": "params", "datatype": "FP64", "shape": [-1, 2]}
        assert md["outputs"] == [{"name": "output_0", "datatype": "FP64", "shape": [-1, 1, 4, 5]}]
    assert http.get("/v2/models/step/ready").status_code == 200
    assert http.get("/v2/models/step/versions/1/ready").status_code == 200
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/step/versions/7"):
        r = http.get(path)
        assert r.status_code == 404 and "step" in r.json()["error"], path
    r = http.get("/v2/no/such/route")
    assert r.status_code == 404 and "/v2/models/NAME" in r.json()["error"]
    assert http.get("/v2/models/step/infer").status_code == 405
    plain.close()


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"inputs": []}).encode(), "non-empty list"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}]}).encode(),
     "unknown datatype 'FP33'"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}).encode(),
     "3 values in 'data', but shape [2, 2] needs 4"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, "2"]}]}).encode(),
     "is a str"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2.5]}]}).encode(),
     "is a float"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": ["1"], "data": [1]}]}).encode(),
     "list of integers"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[1], [2]]}]}).encode(),
     "does not follow shape"),
    (b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 2], "data": [1, NaN]}]}', "NaN or Inf"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]},
                            {"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}).encode(),
     "takes 1 input"),
])
def test_bad_requests_get_400_with_a_message(http, body, says):
    r = http.post("/v2/models/scale/infer", content=body)
    assert r.status_code == 400 and says in r.json()["error"], r.text


def test_binary_byte_counts_are_checked(http):
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 12}}]}).encode()
    r = http.post("/v2/models/scale/infer", content=head + b"\0" * 12, headers={BINARY_HEADER: str(len(head))})
    assert r.status_code == 400 and "12 bytes of raw contents" in r.json()["error"]
    right = head.replace(b'"binary_data_size": 12', b'"binary_data_size": 16')
    r = http.post("/v2/models/scale/infer", content=right + b"\0" * 20, headers={BINARY_HEADER: str(len(right))})
    assert r.status_code == 400 and "4 bytes of binary data are claimed by no input" in r.json()["error"]
    r = http.post("/v2/models/scale/infer", content=head, headers={BINARY_HEADER: "999999"})
    assert r.status_code == 400 and BINARY_HEADER in r.json()["error"]


def test_token_limits_and_unknown_model(server, http):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]})
    for headers, word in (({}, "missing token"), ({"Authorization": "Bearer nope"}, "wrong token")):
        r = httpx.post(server.rest_url + "/v2/models/scale/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 401 and word in r.json()["error"]
    r = http.post("/v2/models/nope/infer", content=body)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    big = np.ones((2**20 // 8 + 10, 1))  # over 1 MiB even as binary
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": list(big.shape),
                                   "parameters": {"binary_data_size": big.nbytes}}]}).encode()
    r = http.post("/v2/models/scale/infer", content=head + big.tobytes(), headers={BINARY_HEADER: str(len(head))})
    assert r.status_code == 413 and "--max-message-mb" in r.json()["error"]
    r = http.post("/v2/models/scale/infer", content=body)  # the server still answers
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [3.0]


def test_kserve_black_box_over_rest_keeps_one_connection(server):
    x = torch.randn(7, 3, dtype=torch.float64)
    with KServeBlackBox(server.rest_url, "scale", protocol="rest", token=TOKEN, timeout=30) as box:
        ports = set()
        box.http.event_hooks["response"].append(
            lambda r: ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1]))
        for _ in range(5):
            assert torch.equal(box(x), x * 3)
        assert len(ports) == 1  # one kept-alive connection for every call
        assert box.metadata()["inputs"][0]["name"] == "x" and box.ready()
    with KServeBlackBox(server.rest_url, "step", protocol="rest", token=TOKEN, timeout=30) as box:
        state, params = _inputs()
        assert np.array_equal(box(state, params).numpy(), step(state, params))
        with pytest.raises(BlackBoxInvalidArgument, match="takes 2 input"):
            KServeBlackBox(server.rest_url, "step", protocol="rest", token=TOKEN, input_names=["s"])(state)
    with pytest.raises(BlackBoxUnauthenticated, match="token"):
        KServeBlackBox(server.rest_url, "scale", protocol="rest", token="nope", input_names=["x"])(x)
    with pytest.raises(BlackBoxNotFound):
        KServeBlackBox(server.rest_url, "nope", protocol="rest", token=TOKEN, input_names=["x"])(x)


def test_tls_and_full_server(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    started, release = threading.Event(), threading.Event()

    def blocking(x):
        started.set()
        release.wait(30)
        return x

    with serve_blackbox(blocking, http_port=0, tls_cert=str(cert), tls_key=key.read_bytes(),
                        max_pending=1) as srv:
        assert srv.rest_url.startswith("https://")
        box = KServeBlackBox(srv.rest_url, "blocking", protocol="rest", tls=str(cert), timeout=30)
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the certificate
            httpx.get(srv.rest_url + "/v2/health/live", timeout=10)
        worker = threading.Thread(target=box, args=(np.ones((1, 1)),))
        worker.start()
        try:
            assert started.wait(30)
            r = httpx.post(srv.rest_url + "/v2/models/blocking/infer", timeout=30,
                           verify=ssl.create_default_context(cafile=str(cert)),
                           json={"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 1], "data": [1]}]})
            assert r.status_code == 429 and "full" in r.json()["error"]
        finally:
            release.set()
            worker.join(30)
        assert torch.equal(box(np.ones((2, 1))), torch.ones(2, 1, dtype=torch.float64))
        box.close()


def test_stop_lets_a_running_request_finish():
    started, release = threading.Event(), threading.Event()

    def blocking(x):
        started.set()
        release.wait(30)
        return x + 1

    srv = serve_blackbox(blocking, http_port=0)
    url = srv.rest_url + "/v2/models/blocking/infer"
    result = {}
    request = threading.Thread(target=lambda: result.setdefault("r", httpx.post(url, timeout=30, json={
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]})))
    request.start()
    assert started.wait(30)
    stopper = threading.Thread(target=srv.stop, args=(20,))
    stopper.start()
    release.set()
    request.join(30)
    stopper.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["outputs"][0]["data"] == [2.0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.rest_url + "/v2/health/live", timeout=5)


def test_missing_extra_is_named(monkeypatch, capsys):
    from deepzero_oracle.server.cli import main

    monkeypatch.setitem(sys.modules, "starlette", None)  # as if the 'rest' extra were not installed
    with pytest.raises(ImportError, match=r"deepzero-oracle\[rest\]"):
        serve_blackbox(scale, http_port=0)
    assert main(["test_rest:scale", "--http-port", "0"]) == 2
    assert "pip install 'deepzero-oracle[rest]'" in capsys.readouterr().err
