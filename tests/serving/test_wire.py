"""The wire format: generated code is fresh, KServe-compatible, and decodes safely."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepzero_oracle.wire.codec import DATATYPES, datatype_of, decode_raw, decode_typed, encode_raw, fill_typed, nonfinite_rows
from deepzero_oracle.wire.constants import TOKEN_ENV, read_pem, resolve_token, status_name, status_number
from deepzero_oracle.wire.errors import WireError
from deepzero_oracle.wire import oracle_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path):
    """Regenerate from protos/oracle.proto with the pinned grpcio-tools; must equal the repo."""
    gen = _generator()
    try:
        tools = gen.tools_path(install=True)  # an isolated copy in build/ (see protos/generate.py)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"grpcio-tools=={gen.GRPCIO_TOOLS_VERSION} is not installed and could not be "
                    f"installed ({e}); run `python protos/generate.py` with network access")
    if tools is None:
        pytest.skip(f"grpcio-tools=={gen.GRPCIO_TOOLS_VERSION} is not installed")
    written = gen.generate(tmp_path, tools)
    stale = [p.name for p in written if p.read_bytes() != (gen.WIRE_DIR / p.name).read_bytes()]
    assert not stale, f"{stale} differ from protos/oracle.proto: run `python protos/generate.py`"


def test_generated_code_is_gencode_5_and_package_relative():
    wire = REPO / "deepzero_oracle" / "wire"
    assert "# Protobuf Python Version: 5.27.2" in (wire / "oracle_pb2.py").read_text()
    grpc_src = (wire / "oracle_pb2_grpc.py").read_text()
    assert "from . import oracle_pb2 as oracle__pb2" in grpc_src
    assert "\nimport oracle_pb2" not in grpc_src


# KServe v2 (open inference protocol) field numbers, from the protocol's grpc_predict_v2.proto.
KSERVE_FIELDS = {
    "ModelInferRequest": {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
                          "outputs": 6, "raw_input_contents": 7},
    "ModelInferRequest.InferInputTensor": {"name": 1, "datatype": 2, "shape": 3, "parameters": 4,
                                           "contents": 5},
    "ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
    "ModelInferResponse": {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5,
                           "raw_output_contents": 6},
    "ModelInferResponse.InferOutputTensor": {"name": 1, "datatype": 2, "shape": 3, "parameters": 4,
                                             "contents": 5},
    "ModelMetadataRequest": {"name": 1, "version": 2},
    "ModelMetadataResponse": {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
    "ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
    "ModelReadyRequest": {"name": 1, "version": 2},
    "ModelReadyResponse": {"ready": 1},
    "ServerLiveResponse": {"live": 1},
    "ServerReadyResponse": {"ready": 1},
    "ServerMetadataResponse": {"name": 1, "version": 2, "extensions": 3},
    "InferParameter": {"bool_param": 1, "int64_param": 2, "string_param": 3},
    "InferTensorContents": {"bool_contents": 1, "int_contents": 2, "int64_contents": 3,
                            "uint_contents": 4, "uint64_contents": 5, "fp32_contents": 6,
                            "fp64_contents": 7, "bytes_contents": 8},
}


def test_messages_match_kserve_v2_field_numbers():
    for path, fields in KSERVE_FIELDS.items():
        desc = pb.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
        for nested in path.split(".")[1:]:
            desc = desc.nested_types_by_name[nested]
        numbers = {f.name: f.number for f in desc.fields}
        for name, number in fields.items():
            assert numbers.get(name) == number, f"{path}.{name}"
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer"} <= set(service.methods_by_name)


_IN_OLD_RUNTIME = r"""
import importlib.util, sys
wire = sys.argv[1]
spec = importlib.util.spec_from_file_location("w", wire + "/__init__.py", submodule_search_locations=[wire])
m = importlib.util.module_from_spec(spec); sys.modules["w"] = m; spec.loader.exec_module(m)
import w.oracle_pb2 as ours, w.oracle_pb2_grpc
from mlserver.grpc import dataplane_pb2 as theirs   # both in one process: no symbol clash
import google.protobuf
req = ours.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x00" * 8])
req.inputs.add(name="x", datatype="FP32", shape=[2, 1])
back = theirs.ModelInferRequest.FromString(req.SerializeToString())
assert back.model_name == "m" and list(back.inputs[0].shape) == [2, 1] and back.raw_input_contents[0] == b"\x00" * 8
print(google.protobuf.__version__)
"""


def test_loads_under_protobuf_6_beside_mlserver():
    """The committed gencode loads under MLServer's protobuf<7 runtime, in one process with
    MLServer's own `inference.*` messages, and both parse each other's bytes."""
    python = REPO / ".venv-mlserver" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-mlserver is missing (tests/serving/test_kserve.py creates it)")
    out = subprocess.run([str(python), "-c", _IN_OLD_RUNTIME, str(REPO / "deepzero_oracle" / "wire")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().split(".")[0]) < 7


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_raw_round_trip_every_datatype(datatype):
    rng = np.random.default_rng(1)
    dt = DATATYPES[datatype]
    if dt.kind == "f":
        x = rng.normal(size=(3, 4)).astype(dt)
    elif dt.kind == "b":
        x = rng.random((3, 4)) > 0.5
    else:
        info = np.iinfo(dt)
        x = rng.integers(info.min, info.max, size=(3, 4), dtype=dt, endpoint=True)
    assert datatype_of(x) == datatype
    raw = encode_raw(x)
    assert len(raw) == x.size * dt.itemsize
    back = decode_raw(raw, datatype, [3, 4], "x")
    assert back.dtype == x.dtype and np.array_equal(back, x)


def test_raw_bytes_are_little_endian():
    x = np.array([[1.0, -2.5]], dtype=">f4")  # big-endian input still goes out little-endian
    raw = encode_raw(x)
    assert raw == np.array([[1.0, -2.5]], dtype="<f4").tobytes()
    assert raw[:4] == b"\x00\x00\x80\x3f"


def test_typed_round_trip():
    for x in (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int16).reshape(4, 1),
              np.array([[True], [False]])):
        contents = pb.InferTensorContents()
        fill_typed(contents, x)
        back = decode_typed(contents, datatype_of(x), x.shape, "x")
        assert back.dtype == x.dtype and np.array_equal(back, x)


@pytest.mark.parametrize("raw, datatype, shape, match", [
    (b"\x00" * 8, "FP33", [2], "unknown datatype 'FP33'"),
    (b"\x00" * 8, "BYTES", [2], "BYTES tensors are not supported"),
    (b"\x00" * 8, "BF16", [4], "BF16 is not supported"),
    (b"\x00" * 7, "FP32", [2], "7 bytes of raw contents, but shape \\[2\\] of FP32 needs 8"),
    (b"\x00" * 8, "FP32", [2, -1], "negative dimension"),
    (b"\x00" * 8, "FP32", [], "no batch dimension"),
    (b"\x00" * 8, "FP32", [2**62, 2**62], "needs"),
])
def test_decode_rejects_malformed(raw, datatype, shape, match):
    with pytest.raises(WireError, match=match):
        decode_raw(raw, datatype, shape, "x")


def test_bool_bytes_are_normalized():
    assert decode_raw(b"\x00\x02\xff", "BOOL", [3], "b").tolist() == [False, True, True]


def test_unsendable_dtypes():
    with pytest.raises(WireError, match="cannot be sent"):
        datatype_of(np.array([1 + 2j]))
    with pytest.raises(WireError, match="cannot be sent"):
        datatype_of(np.array(["a"]))


def test_nonfinite_rows():
    x = np.zeros((4, 2, 2), np.float32)
    x[1, 0, 1] = np.nan
    x[3, 1, 1] = -np.inf
    assert nonfinite_rows(x).tolist() == [False, True, False, True]
    assert nonfinite_rows(np.zeros((2, 2), np.int32)) is None


def test_status_codes_by_name_and_number():
    import grpc

    for code in grpc.StatusCode:
        assert status_name(status_number(code.name)) == code.name
    assert status_number("INVALID_ARGUMENT") == 3 and status_name(16) == "UNAUTHENTICATED"
    assert status_name(999) == "UNKNOWN"


def test_token_and_pem_reading(monkeypatch, tmp_path):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(None) == "from-env" and resolve_token("given") == "given"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert resolve_token(None) is None
    monkeypatch.delenv(TOKEN_ENV)
    assert resolve_token(None) is None
    pem = tmp_path / "cert.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    assert read_pem(pem) == read_pem(str(pem)) == read_pem(b"-----BEGIN CERTIFICATE-----\n")


def test_protocol_and_rest_client_import_without_grpc():
    """The REST client stays light: neither it nor the codec loads grpc or the generated code."""
    code = ("import sys, deepzero_oracle.wire.codec, deepzero_oracle.wire.constants, deepzero_oracle.blackbox.rest, "
            "deepzero_oracle.blackbox.kserve; "
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.endswith('oracle_pb2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_generator_cli_without_tools_fails_clearly(tmp_path, capsys):
    gen = _generator()
    try:
        if importlib.metadata.version("grpcio-tools") == gen.GRPCIO_TOOLS_VERSION:
            pytest.skip("the pinned grpcio-tools is installed in this environment")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert gen.main(["--out", str(tmp_path), "--tools-dir", str(tmp_path / "none"), "--no-install"]) == 1
    assert "not found" in capsys.readouterr().err


OLDEST = ("grpcio==1.66.2", "protobuf==5.27.2", "grpcio-health-checking==1.66.2",
          "grpcio-reflection==1.66.2")
_ON_OLDEST = r"""
import grpc, google.protobuf, torch
assert (grpc.__version__, google.protobuf.__version__) == ("1.66.2", "5.27.2"), grpc.__version__
from deepzero_oracle.server import serve_blackbox
from deepzero_oracle.blackbox import GrpcBlackBox, KServeBlackBox, BlackBoxInvalidArgument
with serve_blackbox(lambda x: x * 2, model_name="m", token="t") as s:
    b = GrpcBlackBox(s.address, token="t", timeout=30)
    x = torch.randn(5, 3)
    assert torch.equal(b(x), x * 2)
    r = b.query_batch([x[:1], x[1:3], torch.full((1, 3), float("nan"))], return_exceptions=True)
    assert isinstance(r[2], BlackBoxInvalidArgument)
    assert all(torch.equal(a, q * 2) for a, q in zip(b.stream([x[:2], x[2:]]), [x[:2], x[2:]]))
    assert b.ready() and b.describe()["name"] == "m"
    assert torch.equal(KServeBlackBox(s.address, "m", token="t")(x), x * 2)
print("ok")
"""


@pytest.mark.slow
def test_runs_on_the_oldest_declared_grpc_and_protobuf(tmp_path):
    """Server and clients work on grpcio 1.66.2 + protobuf 5.27.2, the declared minimums
    (installed into a scratch folder that shadows this environment's newer copies)."""
    target = tmp_path / "oldest"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "--target", str(target), *OLDEST], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"could not install {OLDEST}: {install.stderr[-500:]}")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", _ON_OLDEST], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
