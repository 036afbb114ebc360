"""The Node.js solver of examples/node-solver against our clients: a server in another language
that keeps the wire contract of protos/README.md.

Skipped where node or npm is missing or ``npm ci`` cannot install the example's packages.
Checks: (a) answers bit-identical to a NumPy twin of the step, through every client; (b) bad
input gets INVALID_ARGUMENT (NOT_FOUND, UNAUTHENTICATED) and the server keeps answering;
(c) a SOL corrector trained against it through the command line, on reference trajectories of a
finer version of the same PDE.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from deepzero_oracle.blackbox import BlackBoxInvalidArgument
from deepzero_oracle.wire.codec import encode_raw
from deepzero_oracle.wire.constants import KSERVE_SERVICE, MIRROR_SERVICE, TOKEN_ENV, bearer
from deepzero_oracle.blackbox.spec import open_blackbox
from deepzero_oracle.server.cli import serving_address
from deepzero_oracle.wire import oracle_pb2 as pb

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-solver"
MODEL = "advection_diffusion"
DT = 0.05  # passed as --dt; the NumPy twin uses the same
TOKEN = "node-solver-test-token"


# -- the same PDE in NumPy ------------------------------------------------------------------------
def advection_diffusion_step(state: np.ndarray, params: np.ndarray, dt: float) -> np.ndarray:
    """NumPy twin of examples/node-solver/step.js: ``state [N, C, H, W]``, ``params [N, 2]`` (rows of
    ``[nu, a]``) -> ``[N, C, H, W]``. Same expressions in the same order: bit-identical results."""
    _, _, height, width = state.shape
    dx, dy = 1 / width, 1 / height
    nu, a = params[:, 0, None, None, None], params[:, 1, None, None, None]
    kx, ky, ka = dt * nu / (dx * dx), dt * nu / (dy * dy), dt * a / dx
    left, right = np.roll(state, 1, axis=-1), np.roll(state, -1, axis=-1)
    up, down = np.roll(state, 1, axis=-2), np.roll(state, -1, axis=-2)
    lap_x = right - 2 * state + left
    lap_y = down - 2 * state + up
    upwind = np.where(a >= 0, state - left, right - state)
    return state + kx * lap_x + ky * lap_y - ka * upwind


def random_cases(rng: np.random.Generator, sims: int, channels: int, size: int):
    """Smooth periodic fields ``[sims, channels, size, size]`` and parameters ``[sims, 2]``."""
    x = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(x, x, indexing="ij")
    fields = np.zeros((sims, channels, size, size))
    for s in range(sims):
        for c in range(channels):
            for kx, ky in ((1, 0), (0, 1), (1, 1), (2, 1)):
                amplitude, phase = rng.normal(), rng.uniform(0, 2 * np.pi)
                fields[s, c] += amplitude * np.sin(2 * np.pi * (kx * xx + ky * yy) + phase)
    params = np.stack([rng.uniform(0.002, 0.01, sims), rng.uniform(-1.0, 1.0, sims)], axis=1)
    return fields, params


def reference_trajectories(rng: np.random.Generator, sims: int, steps: int, *, channels: int = 2,
                           size: int = 8, refine: int = 2, substeps: int = 4):
    """The step on a ``refine`` times finer grid with ``substeps`` steps per DT, averaged down to
    ``size``: trajectories ``[sims, steps + 1, channels, size, size]`` and params ``[sims, 2]``."""
    fine, params = random_cases(rng, sims, channels, size * refine)

    def coarse(f):
        return f.reshape(sims, channels, size, refine, size, refine).mean(axis=(3, 5))

    states = [coarse(fine)]
    for _ in range(steps):
        for _ in range(substeps):
            fine = advection_diffusion_step(fine, params, DT / substeps)
        states.append(coarse(fine))
    return np.stack(states, axis=1), params


# -- the Node server --------------------------------------------------------------------------
class NodeSolver:
    """``node server.js`` in a child process: its address, its process id, its output lines."""

    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 30.0):
        self.proc = subprocess.Popen([shutil.which("node"), "server.js", *args], cwd=EXAMPLE,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.output: list[str] = []
        self.address = ""
        while not self.address:
            line = self.next_line(startup_timeout)
            if line is None:
                self.stop()
                raise RuntimeError(f"node server.js {' '.join(args)} did not start: {''.join(self.output)}")
            self.address = serving_address(line) or ""

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next output line (None at the end of output or after ``timeout`` s)."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is not None:
            self.output.append(line)
        return line

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM our child by its process id; SIGKILL it if it does not exit in ``timeout`` s."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def node_example():
    """Installs the example's packages with ``npm ci`` (cache inside the example folder)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the Node.js solver example needs `node` and `npm` on PATH")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip("v\n").split(".")[0])
    if major < 18:
        pytest.skip(f"the Node.js solver example needs Node.js >= 18.3 (found {major})")
    done = subprocess.run([npm, "ci", "--prefer-offline", "--cache", str(EXAMPLE / ".npm-cache")],
                          cwd=EXAMPLE, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"`npm ci` failed in {EXAMPLE}: {(done.stderr or done.stdout)[-800:]}")


@pytest.fixture(scope="module")
def node_server(node_example):
    server = NodeSolver("--port", "0", "--dt", str(DT), "--token", TOKEN)
    yield server
    server.stop()


def _rpc(address: str, method: str, response_cls, service: str = KSERVE_SERVICE):
    """A raw unary call ``/service/method`` that takes bytes or a message (token sent)."""
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(f"/{service}/{method}", request_serializer=None,
                               response_deserializer=response_cls.FromString)

    def send(request, token: str | None = TOKEN):
        data = request if isinstance(request, bytes) else request.SerializeToString()
        metadata = (("authorization", bearer(token)),) if token else ()
        return call(data, timeout=30, metadata=metadata)

    return send


def _infer_request(state, params, names=("state", "params"), *, typed=False, model=MODEL):
    request = pb.ModelInferRequest(model_name=model, id="q1")
    for name, array in zip(names, (state, params)):
        tensor = request.inputs.add(name=name, datatype="FP64", shape=array.shape)
        if typed:
            tensor.contents.fp64_contents.extend(array.ravel().tolist())
        else:
            request.raw_input_contents.append(encode_raw(array))
    return request


def _case(rows: int = 5, channels: int = 2, size: int = 8, seed: int = 0):
    return random_cases(np.random.default_rng(seed), rows, channels, size)


# -- (a) the same numbers as NumPy, through every client ---------------------------------------
def test_answers_bit_identical_to_numpy(node_server):
    state, params = _case()
    want = advection_diffusion_step(state, params, DT)
    for spec in (f"grpc://{node_server.address}", f"kserve://{node_server.address}/{MODEL}"):
        with open_blackbox(spec, token=TOKEN) as box:
            got = box(state, params).numpy()
        assert got.dtype == np.float64 and got.tobytes() == want.tobytes(), spec
    # Rows are independent: a row's answer does not depend on the rows sent with it.
    with open_blackbox(f"grpc://{node_server.address}", token=TOKEN) as box:
        assert box(state[2:3], params[2:3]).numpy().tobytes() == want[2:3].tobytes()

    infer = _rpc(node_server.address, "ModelInfer", pb.ModelInferResponse)
    typed = infer(_infer_request(state, params, typed=True))  # typed in -> typed out
    assert not typed.raw_output_contents and typed.id == "q1"
    assert np.array(typed.outputs[0].contents.fp64_contents).tobytes() == want.tobytes()
    swapped = pb.ModelInferRequest(model_name=MODEL)  # matched by name when the names are declared
    for name, array in (("params", params), ("state", state)):
        swapped.inputs.add(name=name, datatype="FP64", shape=array.shape)
        swapped.raw_input_contents.append(encode_raw(array))
    out = infer(swapped)
    assert list(out.outputs[0].shape) == list(state.shape)
    assert out.raw_output_contents[0] == encode_raw(want)


def test_metadata_and_health_under_both_service_names(node_server):
    for service in (KSERVE_SERVICE, MIRROR_SERVICE):
        metadata = _rpc(node_server.address, "ModelMetadata", pb.ModelMetadataResponse, service)
        md = metadata(pb.ModelMetadataRequest(name=MODEL))
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
            ("state", "FP64", [-1, -1, -1, -1]), ("params", "FP64", [-1, 2])]
        assert [(t.name, t.datatype) for t in md.outputs] == [("next_state", "FP64")]
        ready = _rpc(node_server.address, "ModelReady", pb.ModelReadyResponse, service)
        assert ready(pb.ModelReadyRequest(name=MODEL)).ready
        assert not ready(pb.ModelReadyRequest(name="other")).ready
        live = _rpc(node_server.address, "ServerLive", pb.ServerLiveResponse, service)
        assert live(pb.ServerLiveRequest()).live


# -- (b) bad input gets a precise status; the server keeps answering ---------------------------
def _with(request: pb.ModelInferRequest, change) -> pb.ModelInferRequest:
    bad = pb.ModelInferRequest()
    bad.CopyFrom(request)
    change(bad)
    return bad


def test_bad_input_gets_invalid_argument(node_server):
    state, params = _case(rows=3)
    good = _infer_request(state, params)
    nan_state = state.copy()
    nan_state[1, 0, 2, 3] = np.nan
    invalid = {
        "FP32 state": _with(good, lambda r: setattr(r.inputs[0], "datatype", "FP32")),
        "byte count": _with(good, lambda r: r.raw_input_contents.__setitem__(0, encode_raw(state)[:-8])),
        "params [N, 3]": _infer_request(state, np.ones((3, 3))),
        "state [N, H, W]": _infer_request(state[:, 0], params),
        "row counts differ": _infer_request(state, params[:2]),
        "one input": _with(good, lambda r: (r.inputs.pop(), r.raw_input_contents.pop())),
        "NaN": _infer_request(nan_state, params),
        "negative diffusivity": _infer_request(state, params * [[-1.0, 1.0]]),
        "unstable dt": _infer_request(state, params * [[100.0, 1.0]]),
        "typed and raw": _with(good, lambda r: r.inputs[0].contents.fp64_contents.append(1.0)),
        "unknown output": _with(good, lambda r: r.outputs.add(name="pressure")),
        "not a protobuf": b"\xff\xff\xff",
    }
    infer = _rpc(node_server.address, "ModelInfer", pb.ModelInferResponse)
    for what, request in invalid.items():
        with pytest.raises(grpc.RpcError) as caught:
            infer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, caught.value.details())
    for request, token, code in ((_infer_request(state, params, model="other"), TOKEN, "NOT_FOUND"),
                                 (good, None, "UNAUTHENTICATED"), (good, "wrong", "UNAUTHENTICATED")):
        with pytest.raises(grpc.RpcError) as caught:
            infer(request, token=token)
        assert caught.value.code() == grpc.StatusCode[code], caught.value.details()
    # Our client maps the status to its error, with the server's message in it.
    with open_blackbox(f"grpc://{node_server.address}", token=TOKEN) as box:
        with pytest.raises(BlackBoxInvalidArgument, match="FP64"):
            box(state.astype(np.float32), params)
    assert infer(good).raw_output_contents[0] == encode_raw(advection_diffusion_step(state, params, DT))


def test_port_zero_and_sigterm(node_example):
    server = NodeSolver("--port", "0")
    assert server.address.startswith("127.0.0.1:") and int(server.address.rsplit(":", 1)[1]) > 0
    ready = _rpc(server.address, "ServerReady", pb.ServerReadyResponse)
    assert ready(pb.ServerReadyRequest(), token=None).ready
    assert server.stop() == 0
    assert server.next_line(5) == "node-solver: stopped\n"


# -- (c) a SOL corrector trained against the Node solver, through the command line -------------
def test_sol_trains_against_node_solver(node_server, tmp_path, monkeypatch, capsys):
    from deepzero_oracle.apps.cli import main

    rng = np.random.default_rng(1)
    train_states, train_params = reference_trajectories(rng, sims=4, steps=6)
    test_states, test_params = reference_trajectories(rng, sims=2, steps=6)
    data = tmp_path / "trajectories.npz"
    metadata = {"channels": ["u0", "u1"], "param_names": ["nu", "a"], "dt": DT, "periodic": True}
    np.savez(data, format="deepzero-oracle/sol-trajectories", format_version=1, train_states=train_states,
             test_states=test_states, train_params=train_params, test_params=test_params,
             metadata=json.dumps(metadata))
    out = tmp_path / "run"
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["sol", "train", "--data", str(data), "--solver", f"grpc://{node_server.address}",
                 "--method", "zo-sol", "--out", str(out), "--steps", "2", "--unroll", "2",
                 "--batch-size", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sol", "report", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isfinite(report["zo-sol"]["mae_mean"]) and report["zo-sol"]["queries"] > 0
