"""tritonclient (Triton's own gRPC and HTTP clients) against our server: health, metadata with
datatypes and shapes, inference (JSON and binary tensors over HTTP), the shared token.

tritonclient.grpc registers its own generated ``inference.*`` messages; ours live in the
package ``deepzero_oracle.v1`` (and reflection's ``inference`` copy in a pool of its own), so
both load in this one process.
"""

from __future__ import annotations

import numpy as np
import pytest

from support.grpcbb_helpers import start_server

import tritonclient.grpc as grpcclient  # noqa: E402 -- the test extra installs tritonclient[grpc,http]
import tritonclient.http as httpclient  # noqa: E402

TOKEN = "triton-token"


def auth() -> dict:
    """A fresh headers dict per call: tritonclient.http adds its own entries to the one it gets."""
    return {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server():
    """Our server (child process) with gRPC and REST; `pair` is declared in its metadata."""
    proc = start_server("--http-port", "0", "--token", TOKEN, "--input", "x:FP32:-1,3",
                        "--input", "y:FP32:-1,3", "--output", "sum:FP32:-1,3", "--output", "product:FP32:-1,3",
                        "--model-name", "pair", target="support.grpcbb_functions:pair")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def clients(server):
    grpc_client = grpcclient.InferenceServerClient(server.address)
    http_client = httpclient.InferenceServerClient(server.rest_url.removeprefix("http://"))
    yield {"grpc": grpc_client, "http": http_client}
    grpc_client.close()
    http_client.close()


def _pair_inputs(module, binary: bool | None = None):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.full((2, 3), 0.5, np.float32)
    inputs = [module.InferInput("x", [2, 3], "FP32"), module.InferInput("y", [2, 3], "FP32")]
    for tensor, value in zip(inputs, (x, y)):
        if binary is None:
            tensor.set_data_from_numpy(value)
        else:
            tensor.set_data_from_numpy(value, binary_data=binary)
    return inputs, x, y


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_health_and_metadata(clients, protocol):
    client = clients[protocol]
    assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
    assert client.is_model_ready("pair", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    md = client.get_model_metadata("pair", headers=auth())
    if protocol == "grpc":
        inputs = [(t.name, t.datatype, list(t.shape)) for t in md.inputs]
        outputs = [(t.name, t.datatype, list(t.shape)) for t in md.outputs]
        server_name = client.get_server_metadata(headers=auth()).name
    else:
        inputs = [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]]
        outputs = [(t["name"], t["datatype"], t["shape"]) for t in md["outputs"]]
        server_name = client.get_server_metadata(headers=auth())["name"]
    assert inputs == [("x", "FP32", [-1, 3]), ("y", "FP32", [-1, 3])]
    assert outputs == [("sum", "FP32", [-1, 3]), ("product", "FP32", [-1, 3])]
    assert server_name == "deepzero-oracle"


@pytest.mark.parametrize("protocol, binary", [("grpc", None), ("http", None), ("http", True), ("http", False)])
def test_infer(clients, protocol, binary):
    """tritonclient.http sends binary tensors by default: the server supports the extension."""
    module = grpcclient if protocol == "grpc" else httpclient
    inputs, x, y = _pair_inputs(module, binary)
    if protocol == "http" and binary is not None:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("product", "sum")]
    else:
        outputs = None
    result = clients[protocol].infer("pair", inputs, outputs=outputs, headers=auth())
    np.testing.assert_array_equal(result.as_numpy("sum"), x + y)
    np.testing.assert_array_equal(result.as_numpy("product"), x * y)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_errors_reach_the_client(clients, protocol):
    from tritonclient.utils import InferenceServerException

    module = grpcclient if protocol == "grpc" else httpclient
    inputs, _, _ = _pair_inputs(module)
    with pytest.raises(InferenceServerException, match="token"):
        clients[protocol].infer("pair", inputs)  # no Authorization header
    with pytest.raises(InferenceServerException, match="nope"):
        clients[protocol].infer("nope", inputs, headers=auth())
    bad = module.InferInput("x", [2, 3], "FP64")
    bad.set_data_from_numpy(np.ones((2, 3)))
    with pytest.raises(InferenceServerException, match="FP64 but model 'pair' expects FP32"):
        clients[protocol].infer("pair", [bad, inputs[1]], headers=auth())
