"""The serving stack's layout: one client per protocol (KServeBlackBox only picks one), a model
host with no transport in it, endpoints that never import each other, errors in one module
per layer."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import deepzero_oracle.errors as engine_errors
from deepzero_oracle.blackbox import BlackBoxError, BlackBoxNotFound, GrpcBlackBox, KServeBlackBox
from deepzero_oracle.blackbox import errors as client_errors
from deepzero_oracle.blackbox.spec import open_blackbox
from deepzero_oracle.server import serve_blackbox
from deepzero_oracle.wire.errors import WireError

SERVER = Path(__file__).resolve().parents[2] / "deepzero_oracle" / "server"


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_host_has_no_transport_and_the_endpoints_do_not_import_each_other():
    host = _imported(SERVER / "host.py")
    assert not {m for m in host if m.split(".")[0] in ("grpc", "google", "starlette", "uvicorn", "httpx")
                or m.endswith("oracle_pb2")}, host
    assert "deepzero_oracle.server.rest" not in _imported(SERVER / "servicer.py")
    assert "deepzero_oracle.server.servicer" not in _imported(SERVER / "rest.py")
    assert "deepzero_oracle.server.host" in _imported(SERVER / "rest.py") & _imported(SERVER / "servicer.py")


def test_errors_live_in_one_module_per_layer():
    client = {n for n, c in vars(client_errors).items() if inspect.isclass(c) and issubclass(c, Exception)}
    assert {"BlackBoxError", "BlackBoxRemoteError", "BlackBoxUnavailable"} <= client
    assert all(getattr(client_errors, n).__module__ == client_errors.__name__ for n in client)
    engine_defined = {n for n, c in vars(engine_errors).items()
                      if inspect.isclass(c) and c.__module__ == engine_errors.__name__}
    assert engine_defined and not {n for n in engine_defined if n.startswith("BlackBox")}
    assert engine_errors.BlackBoxError is BlackBoxError  # re-exported for the engine's users
    assert WireError.__module__ == "deepzero_oracle.wire.errors"


def test_kserve_black_box_is_a_factory_of_the_two_clients():
    box = KServeBlackBox("127.0.0.1:1", "m", version="2", output_names=["y"])
    assert type(box) is GrpcBlackBox and (box.model, box.version, box.output_names) == ("m", "2", ["y"])
    assert box.max_inflight == 1
    box.close()
    with pytest.raises(ValueError, match="protocol must be"):
        KServeBlackBox("127.0.0.1:1", "m", protocol="http2")
    with pytest.raises(ValueError, match="wait_for_ready is a gRPC option"):
        KServeBlackBox("http://127.0.0.1:1", "m", protocol="rest", wait_for_ready=True)
    from deepzero_oracle.blackbox.rest import RestBlackBox

    rest = KServeBlackBox("http://127.0.0.1:1", "m", protocol="rest", input_names=["x"])
    assert type(rest) is RestBlackBox and rest.input_names == ["x"]
    with open_blackbox("kserve+http://127.0.0.1:1/m") as spec_box:
        assert type(spec_box) is RestBlackBox and spec_box.model == "m"


def test_kserve_spec_is_the_grpc_client():
    with open_blackbox("kserve://127.0.0.1:1/m") as kserve, open_blackbox("grpc://127.0.0.1:1/m") as grpc_box:
        assert type(kserve) is type(grpc_box) is GrpcBlackBox
        assert kserve.model == grpc_box.model == "m"
        assert kserve.max_inflight == 1 < grpc_box.max_inflight


def _pair(x, y):
    return x + y, x * y


def test_grpc_client_version_outputs_and_ready():
    """What KServeBlackBox(protocol="grpc") offered is GrpcBlackBox's own: version, output
    names (asked of the server and returned in that order) and a per-model ready check."""
    with serve_blackbox({"pair": _pair, "other": _pair}) as server:
        x, y = torch.randn(6, 3), torch.randn(6, 3)
        with GrpcBlackBox(server.address, model="pair", version="1", output_names=["output_1", "output_0"],
                          timeout=30) as box:
            prod, total = box(x, y)
            assert torch.equal(prod, x * y) and torch.equal(total, x + y)
            (one,) = box.query_batch([(x[:2], y[:2])])
            assert torch.equal(one[0], x[:2] * y[:2])
            assert box.ready() and box.metadata()["name"] == "pair"
        with GrpcBlackBox(server.address, model="pair", version="7", timeout=30) as box:
            assert not box.ready()
            with pytest.raises(BlackBoxNotFound, match="version '7'"):
                box(x, y)
        with GrpcBlackBox(server.address, model="pair", output_names=["nope"], timeout=30) as box:
            with pytest.raises(BlackBoxError, match="nope"):
                box(x, y)
        assert server.model_host.in_flight == 0 and server.servicer is server.model_host
