"""The server: statuses, fuzzing (gRPC and REST), auth, TLS, limits, health, reflection, SIGTERM."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepzero_oracle.blackbox import (
    BlackBoxInvalidArgument,
    BlackBoxResourceExhausted,
    BlackBoxUnauthenticated,
    BlackBoxUnavailable,
    GrpcBlackBox,
)
from deepzero_oracle.blackbox.grpc import request_for
from deepzero_oracle.server import TensorSpec, load_callable, register, serve_blackbox
from deepzero_oracle.server.cli import run_serve, serving_address, serving_rest_url
from deepzero_oracle.wire import oracle_pb2 as pb
from support.grpcbb_helpers import raw_unary, self_signed_cert, start_server

TOKEN = "s3cret-token"
MAX_MB = 1
KSERVE = "/inference.GRPCInferenceService/"
ORACLE = "/deepzero_oracle.v1.Oracle/"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REST_AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server():
    """Our server as a child process (gRPC and REST), with a token (from the environment) and a
    1 MiB limit."""
    proc = start_server("--max-message-mb", str(MAX_MB), "--max-concurrency", "2", "--http-port", "0",
                        env_extra={"DEEPZERO_ORACLE_TOKEN": TOKEN})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server):
    # The client may send more than the server accepts, so oversize requests reach the server.
    ch = grpc.insecure_channel(server.address, options=[
        ("grpc.max_send_message_length", 16 * 2**20), ("grpc.max_receive_message_length", 16 * 2**20)])
    yield ch
    ch.close()


def _good(model="affine", rows=2, cols=3):
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    return request_for([x], ["x"], model), x


def _code(fn, data, metadata=AUTH):
    try:
        fn(data, timeout=20, metadata=metadata)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_good_request_and_kserve_standard_path(channel):
    req, x = _good()
    for method in (KSERVE + "ModelInfer", "/deepzero_oracle.v1.GRPCInferenceService/ModelInfer"):
        resp = pb.ModelInferResponse.FromString(raw_unary(channel, method)(req.SerializeToString(),
                                                                          timeout=20, metadata=AUTH))
        y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
        np.testing.assert_array_equal(y, x * 2 + 1)
        assert resp.model_name == "affine" and list(resp.outputs[0].shape) == [2, 3]


def test_typed_contents_answered_typed(channel):
    """A standard client without raw contents gets typed contents back (KServe rule)."""
    req = pb.ModelInferRequest(model_name="affine", id="q7")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([1, 2, 3, 4])
    resp = pb.ModelInferResponse.FromString(
        raw_unary(channel, KSERVE + "ModelInfer")(req.SerializeToString(), timeout=20, metadata=AUTH))
    assert resp.id == "q7" and not resp.raw_output_contents
    assert list(resp.outputs[0].contents.fp32_contents) == [3, 5, 7, 9]


def test_liveness_readiness_metadata(channel):
    def call(method, msg, resp_cls):
        return resp_cls.FromString(raw_unary(channel, KSERVE + method)(msg.SerializeToString(),
                                                                      timeout=20, metadata=AUTH))
    assert call("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
    assert call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
    assert call("ModelReady", pb.ModelReadyRequest(name="affine"), pb.ModelReadyResponse).ready
    assert not call("ModelReady", pb.ModelReadyRequest(name="nope"), pb.ModelReadyResponse).ready
    md = call("ModelMetadata", pb.ModelMetadataRequest(name="pair"), pb.ModelMetadataResponse)
    assert [t.name for t in md.inputs] == ["x", "y"] and md.versions == ["1"]
    code, details = _code(raw_unary(channel, KSERVE + "ModelMetadata"),
                          pb.ModelMetadataRequest(name="nope").SerializeToString())
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details and "affine" in details


def test_health_needs_no_token_but_inference_does(server, channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "deepzero_oracle.v1.Oracle", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=20).status == \
            health_pb2.HealthCheckResponse.SERVING
    req, _ = _good()
    for metadata, word in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong")):
        code, details = _code(raw_unary(channel, KSERVE + "ModelInfer"), req.SerializeToString(), metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and word in details
    with pytest.raises(BlackBoxUnauthenticated, match="token"):
        GrpcBlackBox(server.address, model="affine", token="nope", timeout=20)(torch.ones(2, 3))
    box = GrpcBlackBox(server.address, model="affine", token=TOKEN, timeout=20)
    assert torch.equal(box(torch.ones(2, 3)), torch.full((2, 3), 3.0))


def test_black_box_failures_keep_the_server_up(server):
    box = lambda m: GrpcBlackBox(server.address, model=m, token=TOKEN, timeout=20)  # noqa: E731
    with pytest.raises(Exception) as info:
        box("fails")(torch.ones(2, 3))
    assert info.value.code == "INTERNAL" and "simulator crashed" in str(info.value)
    with pytest.raises(BlackBoxInvalidArgument, match="non-negative"):
        box("rejects")(-torch.ones(2, 3))
    with pytest.raises(Exception, match="one row per input row"):
        box("short")(torch.ones(4, 3))
    assert torch.equal(box("rejects")(torch.full((2, 3), 4.0)), torch.full((2, 3), 2.0))
    assert server.proc.poll() is None


def _malformed(rng: random.Random, i: int):
    """One malformed request: (method, bytes, metadata, allowed status codes, category)."""
    IA, NF, RE, UA = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)
    kind = i % 12
    req, x = _good(rows=rng.randint(1, 4), cols=rng.randint(1, 5))
    method = KSERVE + "ModelInfer"
    if kind == 0:
        method = rng.choice([KSERVE + "ModelInfer", ORACLE + "QueryBatch", ORACLE + "Describe",
                             KSERVE + "ModelMetadata"])
        return method, rng.randbytes(rng.randint(1, 300)), AUTH, {IA, NF}, "random bytes"
    if kind == 1:
        req.inputs[0].datatype = rng.choice(["FP33", "fp32", "", "BYTES", "BF16", "FLOAT", "INT128",
                                             "".join(rng.choice("ABCXYZ0123") for _ in range(4))])
        return method, req.SerializeToString(), AUTH, {IA}, "wrong datatype string"
    if kind == 2:
        variant = rng.randrange(4)
        if variant == 0:
            req.inputs[0].shape[0] += rng.randint(1, 3)
        elif variant == 1:
            req.inputs[0].shape.append(rng.randint(2, 4))
        elif variant == 2:
            req.raw_input_contents[0] = req.raw_input_contents[0][:-rng.randint(1, 4)]
        else:
            req.raw_input_contents[0] += b"\x00" * rng.randint(1, 8)
        return method, req.SerializeToString(), AUTH, {IA}, "shape/byte-count mismatch"
    if kind == 3:
        x = x.copy()
        x.flat[rng.randrange(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
        req.raw_input_contents[0] = x.tobytes()
        if rng.random() < 0.5:
            return method, req.SerializeToString(), AUTH, {IA}, "NaN/Inf"
        batch = pb.QueryBatchRequest(request=req, query_rows=[x.shape[0]])
        # A bad query inside a batch is an in-band error: the call itself succeeds.
        return ORACLE + "QueryBatch", batch.SerializeToString(), AUTH, {grpc.StatusCode.OK}, "NaN/Inf in batch"
    if kind == 4:
        if i % 48 == 4:  # oversize requests are 1+ MiB each: send a few dozen, not hundreds
            big = np.ones((MAX_MB * 2**20 // 16 + 1000, 4), np.float32)
            over = request_for([big], ["x"], "affine")
            return method, over.SerializeToString(), AUTH, {RE}, "oversize"
        req.inputs[0].shape[:] = [rng.choice([-1, -7]), 3]
        return method, req.SerializeToString(), AUTH, {IA}, "negative dimension"
    if kind == 5:
        variant = rng.randrange(6)
        if variant == 0:
            del req.inputs[:]
            del req.raw_input_contents[:]
        elif variant == 1:
            req.inputs[0].name = ""
        elif variant == 2:
            del req.raw_input_contents[:]  # no data at all
        elif variant == 3:
            req.raw_input_contents.append(b"\x00" * 12)
        elif variant == 4:
            req.model_name = ""  # the server serves several models: the name is required
            return method, req.SerializeToString(), AUTH, {NF}, "missing model name"
        else:
            del req.inputs[0].shape[:]
        return method, req.SerializeToString(), AUTH, {IA}, "missing fields"
    if kind == 6:
        metadata = rng.choice([(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                               (("authorization", f"Bearer {TOKEN}x"),)])
        return method, req.SerializeToString(), metadata, {UA}, "bad token"
    if kind == 7:
        if rng.random() < 0.5:
            req.model_name = "no-such-" + str(rng.randint(0, 999))
        else:
            req.model_version = str(rng.randint(2, 99))
        return method, req.SerializeToString(), AUTH, {NF}, "unknown model/version"
    if kind == 8:
        req.inputs[0].shape[:] = rng.choice([[2**62, 2**62], [0, 3], [2**40, 0, 3], [1, 2**63 - 1]])
        return method, req.SerializeToString(), AUTH, {IA}, "hostile shape"
    if kind == 9:
        rows = x.shape[0]
        query_rows = rng.choice([[rows + 1], [0, rows], [-1, rows + 1], [rows, 1]])
        batch = pb.QueryBatchRequest(request=req, query_rows=query_rows)
        return ORACLE + "QueryBatch", batch.SerializeToString(), AUTH, {IA}, "bad query_rows"
    if kind == 10:
        variant = rng.randrange(3)
        if variant == 0:  # typed contents with the wrong count
            del req.raw_input_contents[:]
            req.inputs[0].contents.fp32_contents.extend([1.0] * (x.size + rng.randint(1, 3)))
        elif variant == 1:  # raw and typed at once
            req.inputs[0].contents.fp32_contents.extend([1.0] * x.size)
        else:  # values out of range for INT8
            del req.raw_input_contents[:]
            req.inputs[0].datatype = "INT8"
            req.inputs[0].contents.int_contents.extend([1000] * x.size)
        return method, req.SerializeToString(), AUTH, {IA}, "bad typed contents"
    # kind == 11: wrong number of inputs for a two-input model
    req.model_name = "pair"
    return method, req.SerializeToString(), AUTH, {IA}, "wrong input count"


def test_fuzz_malformed_requests(server, channel):
    """1,200 malformed requests: each gets its expected status, the server survives."""
    rng = random.Random(1234)
    callables: dict[str, grpc.UnaryUnaryMultiCallable] = {}
    mismatches, seen = [], {}
    n = 1200
    for i in range(n):
        method, data, metadata, allowed, category = _malformed(rng, i)
        fn = callables.setdefault(method, raw_unary(channel, method))
        code, details = _code(fn, data, metadata)
        seen[category] = seen.get(category, 0) + 1
        if code not in allowed or (code != grpc.StatusCode.OK and not details):
            mismatches.append((i, category, code, details[:200]))
    assert not mismatches, f"{len(mismatches)} unexpected statuses, first: {mismatches[:5]}"
    assert server.proc.poll() is None, "the server died"
    assert seen["oversize"] >= 20 and seen["random bytes"] >= 90, seen
    req, x = _good()
    resp = pb.ModelInferResponse.FromString(raw_unary(channel, KSERVE + "ModelInfer")(
        req.SerializeToString(), timeout=20, metadata=AUTH))
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(x.shape), x * 2 + 1)


def _malformed_rest(rng: random.Random, i: int):
    """One malformed REST infer request: (path, body, headers, allowed statuses, category)."""
    kind = i % 12
    rows, cols = rng.randint(1, 4), rng.randint(1, 5)
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    tensor = {"name": "x", "datatype": "FP32", "shape": [rows, cols], "data": x.ravel().tolist()}
    body = {"inputs": [tensor]}
    path, headers = "/v2/models/affine/infer", dict(REST_AUTH)

    def as_json(**more):
        return path, json.dumps(body).encode(), {**headers, **more}

    if kind == 0:
        junk = rng.choice([rng.randbytes(rng.randint(1, 300)), b"[" * 50_000 + b"]" * 50_000,
                           b'{"inputs": [', json.dumps(rng.random()).encode(), b"\xff\xfe{}"])
        return path, junk, headers, {400}, "not JSON / not an object"
    if kind == 1:
        tensor["datatype"] = rng.choice(["FP33", "fp32", "", "BYTES", "BF16", 32, None])
        return (*as_json(), {400}, "wrong datatype")
    if kind == 2:
        variant = rng.randrange(3)
        if variant == 0:
            tensor["shape"][0] += rng.randint(1, 3)
        elif variant == 1:
            tensor["data"] = tensor["data"][:-1] or [1.0, 2.0]
        else:  # binary contents of the wrong size
            del tensor["data"]
            raw = x.tobytes()[:-rng.randint(1, 4)]
            tensor["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps(body).encode()
            framing = {**headers, "Inference-Header-Content-Length": str(len(head))}
            return path, head + raw, framing, {400}, "byte count"
        return (*as_json(), {400}, "shape/value-count mismatch")
    if kind == 3:
        bad = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
        text = json.dumps(body).replace(str(tensor["data"][0]), bad, 1)
        return path, text.encode(), headers, {400}, "NaN/Inf"
    if kind == 4:
        if i % 48 == 4:  # 1+ MiB bodies: a few dozen, not hundreds
            big = np.ones((MAX_MB * 2**20 // 16 + 1000, 4), np.float32)
            del tensor["data"]
            tensor.update(shape=list(big.shape), parameters={"binary_data_size": big.nbytes})
            head = json.dumps(body).encode()
            return (path, head + big.tobytes(), {**headers, "Inference-Header-Content-Length": str(len(head))},
                    {413}, "oversize")
        tensor["shape"] = [rng.choice([-1, -7]), cols]
        return (*as_json(), {400}, "negative dimension")
    if kind == 5:
        variant = rng.randrange(6)
        if variant == 0:
            body["inputs"] = rng.choice([[], {}, "x", None])
        elif variant == 1:
            tensor["name"] = rng.choice(["", 7, None])
        elif variant == 2:
            del tensor["data"]
        elif variant == 3:
            tensor["shape"] = rng.choice([None, "2,3", [2.0, 3], [True, 3], ["2", "3"]])
        elif variant == 4:
            tensor["data"] = rng.choice([None, "1,2", {"a": 1}, 3.0])
        else:
            body["outputs"] = rng.choice([[{"name": "nope"}], "y", [7], [{"name": "output_0", "parameters": 1}]])
        return (*as_json(), {400}, "missing or malformed fields")
    if kind == 6:
        headers.pop("Authorization")
        headers.update(rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                   {"Authorization": f"Bearer {TOKEN}x"}]))
        return (*as_json(), {401}, "bad token")
    if kind == 7:
        path = rng.choice(["/v2/models/no-such-%d/infer" % rng.randint(0, 999),
                           "/v2/models/affine/versions/%d/infer" % rng.randint(2, 99)])
        return (*as_json(), {404}, "unknown model/version")
    if kind == 8:
        tensor["shape"] = rng.choice([[2**62, 2**62], [0, 3], [2**40, 0, 3], [1, 2**63 - 1], [2**70]])
        return (*as_json(), {400}, "hostile shape")
    if kind == 9:
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": rng.choice([-1, 10**12, "8", 1.5])}
        head = json.dumps(body).encode()
        length = rng.choice([str(len(head)), "abc", "0", str(10**9), "-5"])
        framing = {**headers, "Inference-Header-Content-Length": length}
        return path, head + x.tobytes(), framing, {400}, "bad binary framing"
    if kind == 10:
        variant = rng.randrange(4)
        if variant == 0:
            tensor["data"][0] = rng.choice(["1", True, None, [1]])
        elif variant == 1:
            tensor["data"] = [tensor["data"]] * 2  # nested, but not as the shape
        elif variant == 2:
            tensor.update(datatype="INT8", data=[300] * x.size)
        else:
            tensor.update(datatype="INT32", data=[0.5] * x.size)
        return (*as_json(), {400}, "bad values")
    # kind == 11: wrong number of inputs for a two-input model
    path = "/v2/models/pair/infer"
    return (*as_json(), {400}, "wrong input count")


def test_fuzz_malformed_rest_requests(server):
    """600 malformed REST requests: each gets its status and a message; the server survives."""
    rng = random.Random(4321)
    mismatches, seen = [], {}
    with httpx.Client(base_url=server.rest_url, timeout=30) as http:
        for i in range(600):
            path, body, headers, allowed, category = _malformed_rest(rng, i)
            r = http.post(path, content=body, headers=headers)
            seen[category] = seen.get(category, 0) + 1
            if r.status_code not in allowed or not r.json().get("error"):
                mismatches.append((i, category, r.status_code, r.text[:200]))
        assert not mismatches, f"{len(mismatches)} unexpected statuses, first: {mismatches[:5]}"
        assert server.proc.poll() is None, "the server died"
        assert seen["oversize"] >= 10 and seen["not JSON / not an object"] >= 45, seen
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        r = http.post("/v2/models/affine/infer", headers=REST_AUTH, json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3), x * 2 + 1)


def test_stream_survives_malformed_messages(server, channel):
    """Garbage on the stream is answered in-band (index -1) and the stream goes on."""
    stream = channel.stream_stream(ORACLE + "QueryStream", request_serializer=None,
                                   response_deserializer=pb.QueryBatchResponse.FromString)
    req, x = _good()
    good = pb.QueryBatchRequest(request=req).SerializeToString()
    bad_dtype = pb.QueryBatchRequest(request=req)
    bad_dtype.request.inputs[0].datatype = "FP33"
    messages = [b"\xff\x01garbage", good, bad_dtype.SerializeToString(), good]
    answers = list(stream(iter(messages), timeout=30, metadata=AUTH))
    assert len(answers) == 4
    assert answers[0].errors[0].index == -1 and answers[0].errors[0].code == 3
    assert answers[2].errors[0].index == -1 and "FP33" in answers[2].errors[0].message
    for a in (answers[1], answers[3]):
        assert not a.errors
        np.testing.assert_array_equal(
            np.frombuffer(a.response.raw_output_contents[0], "<f4").reshape(x.shape), x * 2 + 1)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([good]), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_oversize_answer_is_resource_exhausted_and_client_chunks(server):
    """Both ends enforce the limit: the client splits big calls into messages that fit."""
    box = GrpcBlackBox(server.address, model="affine", token=TOKEN, timeout=30, max_message_mb=MAX_MB)
    x = torch.randn(200_000, 3)  # 2.3 MiB: three messages of < 1 MiB
    assert torch.equal(box(x), x * 2 + 1)
    too_big = GrpcBlackBox(server.address, model="affine", token=TOKEN, timeout=30, max_message_mb=8,
                           max_batch_rows=10**6)
    with pytest.raises(BlackBoxResourceExhausted, match="max_message_mb|message"):
        too_big(x)


def test_sigterm_is_graceful(tmp_path):
    """SIGTERM: the call in flight finishes, the process exits 0, later calls are refused."""
    marker = tmp_path / "started"
    proc = start_server("--token", "t", "--grace", "20",
                        env_extra={"GRPCBB_MARKER": str(marker), "GRPCBB_SLOW_SECONDS": "1.5"})
    try:
        box = GrpcBlackBox(proc.address, model="slow", token="t", timeout=60, retries=0)
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("y", box(torch.ones(2, 2))))
        thread.start()
        for _ in range(600):  # poll until the black box is running (bounded: 60 s)
            if marker.exists():
                break
            time.sleep(0.1)
        assert marker.exists(), proc.stderr_tail()
        code = proc.stop(timeout=60)
        thread.join(60)
        assert code == 0, proc.stderr_tail()
        assert torch.equal(result["y"], torch.ones(2, 2))
        with pytest.raises(BlackBoxUnavailable):
            GrpcBlackBox(proc.address, model="slow", token="t", timeout=5, retries=0)(torch.ones(1, 1))
    finally:
        proc.kill()


def test_tls_with_self_signed_certificate(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with serve_blackbox(lambda x: x + 1, model_name="inc", tls_cert=str(cert), tls_key=str(key)) as srv:
        assert srv.tls
        box = GrpcBlackBox(srv.address, tls=str(cert), timeout=20)
        assert torch.equal(box(torch.zeros(3, 2)), torch.ones(3, 2))
        assert box.ready()
        with pytest.raises(BlackBoxUnavailable):  # plaintext client against a TLS server
            GrpcBlackBox(srv.address, timeout=5, retries=0)(torch.zeros(1, 1))
        with pytest.raises(BlackBoxUnavailable):  # TLS client that does not trust the certificate
            GrpcBlackBox(srv.address, tls=True, timeout=5, retries=0)(torch.zeros(1, 1))


def test_concurrency_limit_answers_resource_exhausted():
    started, release = threading.Event(), threading.Event()

    def blocking(x):
        started.set()
        release.wait(30)
        return x

    with serve_blackbox(blocking, max_concurrency=1, max_pending=1) as srv:
        box = GrpcBlackBox(srv.address, timeout=30, retries=0)
        worker = threading.Thread(target=box, args=(torch.ones(1, 1),))
        worker.start()
        try:
            assert started.wait(30)
            with pytest.raises(BlackBoxResourceExhausted):
                GrpcBlackBox(srv.address, timeout=30, retries=0)(torch.ones(1, 1))
        finally:
            release.set()
            worker.join(30)
        assert torch.equal(box(torch.ones(1, 1)), torch.ones(1, 1))


def test_declared_inputs_are_enforced_and_reported():
    with serve_blackbox(lambda x: x.sum(1, keepdims=True), model_name="sum",
                        inputs=["x:FP32:-1,3"], outputs=[("total", "FP32", (-1, 1))]) as srv:
        box = GrpcBlackBox(srv.address, timeout=20)
        md = box.describe()
        assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert md["outputs"][0]["name"] == "total"
        assert torch.equal(box(torch.ones(4, 3)), torch.full((4, 1), 3.0))
        with pytest.raises(BlackBoxInvalidArgument, match="FP64 but model 'sum' expects FP32"):
            box(torch.ones(4, 3, dtype=torch.float64))
        with pytest.raises(BlackBoxInvalidArgument, match=r"expects \[-1, 3\]"):
            box(torch.ones(4, 2))


def test_reflection_lists_services():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with serve_blackbox(lambda x: x) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            database = ProtoReflectionDescriptorDatabase(ch)
            services = set(database.get_services())
            standard = database.FindFileContainingSymbol("inference.GRPCInferenceService")
    assert {"deepzero_oracle.v1.Oracle", "deepzero_oracle.v1.GRPCInferenceService",
            "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    # the standard service resolves to a file of its own package, with the v2 methods and messages
    assert standard.package == "inference"
    assert {m.name for m in standard.service[0].method} >= {"ModelInfer", "ModelMetadata", "ServerLive"}
    assert {"ModelInferRequest", "InferTensorContents"} <= {m.name for m in standard.message_type}
    assert "QueryBatchRequest" not in {m.name for m in standard.message_type}


def test_callables_get_numpy_arrays_unless_torch_is_asked():
    seen = []

    def step(state, params):
        seen.append((type(state), type(params)))
        return state * params[:, :1, None, None]

    state, params = torch.ones(2, 1, 3, 3, dtype=torch.float64), torch.full((2, 2), 2.0, dtype=torch.float64)
    with serve_blackbox(step) as srv, GrpcBlackBox(srv.address, timeout=20) as box:
        assert torch.equal(box(state, params), 2 * state)
    with serve_blackbox(lambda x: x.clamp(min=0), numpy=False) as srv, GrpcBlackBox(srv.address, timeout=20) as box:
        assert torch.equal(box(-torch.ones(2, 2)), torch.zeros(2, 2))
    assert seen == [(np.ndarray, np.ndarray)]


def test_metadata_reports_declared_and_observed_tensors():
    def step(state, params):
        return state + params.sum(1)[:, None, None, None]

    with serve_blackbox(step, inputs=["state::-1,1,4,4", "params:FP64"]) as srv, \
            GrpcBlackBox(srv.address, timeout=20) as box:
        before = box.describe()
        assert before["inputs"] == [{"name": "state", "datatype": "", "shape": [-1, 1, 4, 4]},
                                    {"name": "params", "datatype": "FP64", "shape": []}]
        assert before["outputs"] == []  # undeclared outputs: unknown before a call
        box(np.zeros((3, 1, 4, 4)), np.ones((3, 2)))
        after = box.describe()
        assert after["inputs"] == [{"name": "state", "datatype": "FP64", "shape": [-1, 1, 4, 4]},
                                   {"name": "params", "datatype": "FP64", "shape": [-1, 2]}]
        assert after["outputs"] == [{"name": "output_0", "datatype": "FP64", "shape": [-1, 1, 4, 4]}]
        assert box.metadata()["inputs"][0]["name"] == "state"  # the standard ModelMetadata


def test_cli_register_and_spec_parsing():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["serve", "grpcbb_functions:affine", "--port", "0", "--max-concurrency", "2",
                              "--input", "x:FP32:-1,3", "--max-message-mb", "8"])
    assert args.func is run_serve and args.max_concurrency == 2 and args.input == ["x:FP32:-1,3"]
    assert args.host == "127.0.0.1" and args.http_port is None and not args.torch
    args = parser.parse_args(["serve", "m:f", "--torch", "--http-port", "0"])
    assert args.torch and args.http_port == 0
    with pytest.raises(SystemExit):  # NumPy is the default: there is no --numpy
        parser.parse_args(["serve", "m:f", "--numpy"])
    assert TensorSpec.parse("x:fp64:-1,2") == TensorSpec("x", "FP64", (-1, 2))
    with pytest.raises(ValueError, match="unknown datatype"):
        TensorSpec.parse("x:FP33")
    assert callable(load_callable("support.grpcbb_functions:affine"))
    assert isinstance(load_callable("support.grpcbb_functions:MODELS"), dict)
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        load_callable("grpcbb_functions")


def test_serving_line_address():
    line = "deepzero-oracle: serving 'affine', 'pair' at 127.0.0.1:50051 (insecure, token on)\n"
    assert serving_address(line) == "127.0.0.1:50051" and serving_rest_url(line) is None
    line = "deepzero-oracle: serving 'm' at 127.0.0.1:5 (tls, token on); REST at https://127.0.0.1:6\n"
    assert serving_address(line) == "127.0.0.1:5" and serving_rest_url(line) == "https://127.0.0.1:6"
    assert serving_address("deepzero-oracle: serving 'm' at [::1]:7 (tls, token off)") == "[::1]:7"
    assert serving_address("deepzero-oracle: stopped\n") is None


def test_server_never_unpickles():
    """The server modules have no pickle path at all (the wire carries only numbers)."""
    from pathlib import Path

    import deepzero_oracle.wire.codec as protocol
    import deepzero_oracle.server as server

    files = sorted(Path(server.__file__).parent.glob("*.py")) + [Path(protocol.__file__)]
    assert len(files) >= 8  # __init__, __main__, specs, servicer, rest, lifecycle, cli + protocol
    for path in files:
        source = path.read_text()
        assert "pickle" not in source.replace("unpickle", "").replace("Never pickle", ""), path
        assert "allow_pickle=True" not in source, path


def test_black_box_specs_parse_and_refuse_clearly():
    from deepzero_oracle.blackbox.spec import BlackBoxSpec, open_blackbox

    assert BlackBoxSpec.parse("grpc://127.0.0.1:5000") == BlackBoxSpec("grpc", "127.0.0.1:5000", "")
    assert BlackBoxSpec.parse("grpc://h:1/step") == BlackBoxSpec("grpc", "h:1", "step")
    assert BlackBoxSpec.parse("kserve+http://h:8080/clf") == BlackBoxSpec("kserve+http", "h:8080", "clf")
    assert BlackBoxSpec.parse("grpcbb_functions:affine") == BlackBoxSpec("python", "grpcbb_functions", "affine")
    assert str(BlackBoxSpec.parse("kserve://h:2/m")) == "kserve://h:2/m"
    for bad, says in [("http://h:1", "unknown scheme 'http'"), ("grpc://nohost", "HOST:PORT"),
                      ("kserve://h:1", "names its model"), ("justaname", "not a black-box spec")]:
        with pytest.raises(ValueError, match=says):
            BlackBoxSpec.parse(bad)
    with open_blackbox("support.grpcbb_functions:affine", numpy=False) as box:  # in process, counted
        out = box(torch.ones(3, 4))
        assert out.shape[0] == 3 and box.calls == 1 and box.rows == 3
