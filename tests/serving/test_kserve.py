"""KServeBlackBox and GrpcBlackBox against real KServe v2 servers: MLServer (its own venv) and ours.

The MLServer fixture (support/mlserver_peer.py) creates .venv-mlserver with
tests/mlserver/setup_venv.sh when it is missing (once; MLServer pins protobuf<7, so it
cannot share the project's venv), starts `mlserver start` on 127.0.0.1 with
`parallel_workers: 0` serving tests/mlserver/kserve_function.py, waits for the models to be
ready and stops the server by its process id.
"""

from __future__ import annotations

import json
import runpy

import numpy as np
import pytest
import torch

from deepzero_oracle.blackbox import (
    BlackBoxInvalidArgument,
    BlackBoxNotFound,
    BlackBoxUnavailable,
    GrpcBlackBox,
    KServeBlackBox,
    LocalBlackBox,
)
from support.grpcbb_functions import affine as torch_affine
from support.grpcbb_helpers import start_server
from support.mlserver_peer import MLSERVER_DIR, VENV, ensure_mlserver_venv, free_port, function_model, start_mlserver

MODEL = "deepzero-affine"
STEP_MODEL = "deepzero-step"

# the functions MLServer serves, loaded from their file (MLServer imports them the same way)
_functions = runpy.run_path(str(MLSERVER_DIR / "kserve_function.py"))
affine, step = _functions["affine"], _functions["step"]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    ensure_mlserver_venv()
    models = {MODEL: function_model("kserve_function:affine", [("x", "FP32", [-1, -1])], [("y", "FP32", [-1, -1])]),
              STEP_MODEL: function_model("kserve_function:step",
                                         [("state", "FP64", [-1, -1, -1, -1]), ("params", "FP64", [-1, 2])],
                                         [("next_state", "FP64", [-1, -1, -1, -1])])}
    with start_mlserver(tmp_path_factory.mktemp("mlserver"), models, VENV,
                        files=[MLSERVER_DIR / "kserve_function.py"]) as peer:
        yield {"grpc": peer.grpc, "rest": peer.rest_url}


def test_mlserver_peer_waits_for_every_model(tmp_path):
    """A model that fails to load: start_mlserver raises, naming the model and showing
    MLServer's log (the import error), and yields no server."""
    ensure_mlserver_venv()
    models = {"broken": function_model("no_such_module:f", [("x", "FP32", [-1])], [("y", "FP32", [-1])])}
    with pytest.raises(RuntimeError, match="(?s)model 'broken' did not get ready.*no_such_module"):
        with start_mlserver(tmp_path, models, VENV, startup_timeout=60, attempts=1):
            pass


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlserver_gives_identical_outputs(mlserver, protocol, dtype):
    x = np.random.default_rng(3).normal(size=(64, 5)).astype(dtype)
    want = LocalBlackBox(affine, numpy=True)(x)
    with KServeBlackBox(mlserver[protocol], MODEL, protocol=protocol, timeout=30, max_batch_rows=20) as box:
        got = box(torch.from_numpy(x))
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert box.calls == 1 and box.rows == 64


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_mlserver_metadata_ready_and_errors(mlserver, protocol):
    box = KServeBlackBox(mlserver[protocol], MODEL, protocol=protocol, timeout=30)
    assert box.ready()
    md = box.metadata()
    assert [t["name"] for t in md["inputs"]] == ["x"] and md["inputs"][0]["datatype"] == "FP32"
    unknown = KServeBlackBox(mlserver[protocol], "no-such-model", protocol=protocol, timeout=30,
                             input_names=["x"])
    assert not unknown.ready()
    with pytest.raises(BlackBoxNotFound, match="no-such-model"):
        unknown(torch.ones(2, 2))
    box.close()


def test_grpc_black_box_against_mlserver_two_input_solver(mlserver):
    """GrpcBlackBox speaks the standard service to MLServer: inputs named from the model's
    metadata (the runtime finds them by name), answers bit-identical to the step in process."""
    rng = np.random.default_rng(5)
    state = rng.normal(size=(6, 2, 8, 8))
    params = np.column_stack([rng.uniform(0.05, 0.2, 6), rng.uniform(0.0, 0.1, 6)])
    want = LocalBlackBox(step, numpy=True)(state, params)
    with GrpcBlackBox(mlserver["grpc"], model=STEP_MODEL, timeout=30, max_batch_rows=4) as box:
        md = box.metadata()
        assert [(t["name"], t["datatype"]) for t in md["inputs"]] == [("state", "FP64"), ("params", "FP64")]
        assert md["outputs"][0]["name"] == "next_state"
        got = box(torch.from_numpy(state), params)
        assert got.dtype == torch.float64 and torch.equal(got, want)
        assert box.calls == 1 and box.rows == 6  # two messages underneath
        with pytest.raises(BlackBoxNotFound, match="no-such-model"):
            GrpcBlackBox(mlserver["grpc"], model="no-such-model", timeout=30)(state, params)


def test_rest_refuses_nan_instead_of_sending_invalid_json(mlserver):
    box = KServeBlackBox(mlserver["rest"], MODEL, protocol="rest", timeout=30, input_names=["x"])
    with pytest.raises(BlackBoxInvalidArgument, match="NaN"):
        box(torch.tensor([[1.0, float("nan")]]))


def test_kserve_client_against_our_server():
    """Our server speaks the standard service: a KServe client needs nothing else."""
    proc = start_server()
    try:
        x = torch.randn(33, 4)
        with KServeBlackBox(proc.address, "affine", timeout=30, max_batch_rows=10) as box:
            assert box.metadata()["inputs"][0]["name"] == "x"
            assert torch.equal(box(x), torch_affine(x))
            assert box.ready()
        with KServeBlackBox(proc.address, "pair", timeout=30, output_names=["output_1"]) as box:
            assert torch.equal(box(x, x), x * x)
        a, b = torch.randn(4, 2), torch.randn(4, 2)
        with KServeBlackBox(proc.address, "diff", timeout=30, input_names=["y", "x"]) as box:
            assert torch.equal(box(a, b), b - a)  # matched by name: x=b, y=a
        with KServeBlackBox(proc.address, "diff", timeout=30, input_names=["p", "q"]) as box:
            assert torch.equal(box(a, b), a - b)  # unknown names: by position
        with pytest.raises(BlackBoxNotFound):
            KServeBlackBox(proc.address, "nope", timeout=30, input_names=["x"])(x)
    finally:
        proc.stop()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unreachable_server_is_unavailable(protocol):
    port = free_port()
    url = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
    box = KServeBlackBox(url, "m", protocol=protocol, timeout=10, retries=1, input_names=["x"])
    with pytest.raises(BlackBoxUnavailable, match="is the server running"):
        box(torch.ones(1, 1))
    assert not box.ready(timeout=2)


def test_sol_trains_through_a_solver_served_by_mlserver(mlserver, tmp_path, monkeypatch):
    """A SOL corrector trained by ZO-SOL with MLServer answering the solver's queries
    (`--solver grpc://HOST:PORT/MODEL`, the standard inference service) follows the same
    trajectory as with the same step called in process."""
    from deepzero_oracle.adapters.sol.trajectories import Trajectories
    from deepzero_oracle.apps.cli import main

    rng = np.random.default_rng(7)

    def runs(n, steps=5):
        params = np.column_stack([rng.uniform(0.05, 0.2, n), rng.uniform(0.0, 0.1, n)])
        states = [rng.normal(size=(n, 2, 8, 8))]
        for _ in range(steps):  # the reference: two half steps of diffusion per step
            states.append(step(step(states[-1], params * [0.5, 0.5]), params * [0.5, 0.5]))
        return np.stack(states, axis=1), params

    (train, p_train), (test, p_test) = runs(3), runs(2)
    data = Trajectories(train, test, p_train, p_test, metadata={"periodic": True}).save(tmp_path / "traj.npz")
    monkeypatch.syspath_prepend(str(MLSERVER_DIR))  # for the in-process spec kserve_function:step
    recipe = ["--steps", "2", "--unroll", "2", "--batch-size", "2", "--hidden", "4", "--sparsity", "0.5",
              "--quiet", "--data", str(data)]
    results = {}
    for kind, spec in {"mlserver": f"grpc://{mlserver['grpc']}/{STEP_MODEL}", "python": "kserve_function:step"}.items():
        assert main(["sol", "train", "--method", "zo-sol", "--solver", spec, "--out", str(tmp_path / kind), *recipe]) == 0
        results[kind] = json.loads((tmp_path / kind / "zo-sol" / "eval.json").read_text())
    assert results["mlserver"]["queries"] == results["python"]["queries"] > 0
    assert results["mlserver"]["mae_mean"] == results["python"]["mae_mean"]
