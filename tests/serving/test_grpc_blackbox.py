"""GrpcBlackBox against our server in a child process: same answers and errors as local."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from deepzero_oracle.blackbox import (
    BlackBoxError,
    BlackBoxInvalidArgument,
    BlackBoxNotFound,
    BlackBoxTimeout,
    BlackBoxUnavailable,
    GrpcBlackBox,
    LocalBlackBox,
)
from support.grpcbb_functions import affine, digits_head, pair, row_sum
from support.grpcbb_helpers import start_server


@pytest.fixture(scope="module")
def server():
    proc = start_server("--max-concurrency", "4")
    yield proc
    proc.stop()


@pytest.fixture()
def box(server):
    with GrpcBlackBox(server.address, model="affine", timeout=30) as b:
        yield b


@pytest.mark.parametrize("make", [
    lambda: torch.randn(17, 4),
    lambda: torch.randn(5, 2, 3, dtype=torch.float64),
    lambda: np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32),
    lambda: torch.arange(12, dtype=torch.int64).reshape(6, 2),
    lambda: torch.randn(3, 4).half(),
])
def test_same_answers_as_local(box, make):
    x = make()
    want = LocalBlackBox(affine)(x)
    got = box(x)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_multi_input_multi_output_and_chunking(server):
    x, y = torch.randn(50, 3), torch.randn(50, 3)
    with GrpcBlackBox(server.address, model="pair", timeout=30, max_batch_rows=7) as b:
        s, p = b(x, y)
        assert b.calls == 1 and b.rows == 50  # one query call, 8 messages underneath
    ws, wp = pair(x, y)
    assert torch.equal(s, ws) and torch.equal(p, wp)


def test_query_batch_stacks_queries_and_reports_errors_in_band(server, box):
    queries = [torch.randn(r, 4) for r in (1, 3, 1, 2)]
    queries[2][0, 1] = float("nan")
    answers = box.query_batch(queries, return_exceptions=True)
    assert isinstance(answers[2], BlackBoxInvalidArgument) and "NaN" in str(answers[2])
    for q, a in zip(queries, answers):
        if not isinstance(a, Exception):
            assert torch.equal(a, affine(q))
    with pytest.raises(BlackBoxInvalidArgument):
        box.query_batch(queries)
    # One row per query, many queries: the fast path (no query_rows on the wire).
    many = [torch.randn(1, 2) for _ in range(1000)]
    got = box.query_batch(many)
    assert all(torch.equal(g, affine(q)) for g, q in zip(got, many))


def test_query_batch_isolates_the_query_the_black_box_rejects(server):
    with GrpcBlackBox(server.address, model="rejects", timeout=30) as b:
        queries = [torch.full((2, 2), 4.0), -torch.ones(1, 2), torch.full((3, 2), 9.0)]
        answers = b.query_batch(queries, return_exceptions=True)
    assert torch.equal(answers[0], torch.full((2, 2), 2.0))
    assert isinstance(answers[1], BlackBoxInvalidArgument) and "non-negative" in str(answers[1])
    assert torch.equal(answers[2], torch.full((3, 2), 3.0))


def test_query_batch_multi_output(server):
    with GrpcBlackBox(server.address, model="pair", timeout=30) as b:
        queries = [(torch.randn(2, 3), torch.randn(2, 3)) for _ in range(4)]
        for (x, y), (s, p) in zip(queries, b.query_batch(queries)):
            assert torch.equal(s, x + y) and torch.equal(p, x * y)


def test_stream_in_order_with_in_band_errors(box):
    queries = [torch.randn(1 + i % 3, 4) for i in range(40)]
    queries[7][0, 0] = float("inf")
    answers = list(box.stream(queries, return_exceptions=True))
    assert len(answers) == 40
    assert isinstance(answers[7], BlackBoxInvalidArgument)
    assert all(torch.equal(a, affine(q)) for i, (a, q) in enumerate(zip(answers, queries)) if i != 7)
    with pytest.raises(BlackBoxInvalidArgument):
        list(box.stream(queries))
    with pytest.raises(BlackBoxInvalidArgument, match="same batch size"):
        list(GrpcBlackBox(box.target, model="pair", timeout=30).stream([(torch.ones(2, 1), torch.ones(3, 1))]))


def test_describe_and_ready(server, box):
    box(torch.ones(2, 4))
    md = box.describe()
    assert md["name"] == "affine" and md["inputs"][0]["name"] == "x"
    assert md["outputs"][0]["datatype"] == "FP32"
    assert md["max_concurrency"] == 4 and md["max_message_bytes"] == 64 * 2**20
    assert md["measured_seconds_per_row"] > 0
    assert box.ready()


def test_metadata_is_the_standard_v2_dict_fetched_once(server, box):
    md = box.metadata()
    assert md["name"] == "affine" and md["versions"] == ["1"] and md["platform"] == "deepzero-oracle"
    assert [t["name"] for t in md["inputs"]] == ["x"] and box.metadata() is md
    with GrpcBlackBox(server.address, model="pair", timeout=30) as b:
        assert [t["name"] for t in b.metadata()["inputs"]] == ["x", "y"]
    with pytest.raises(BlackBoxNotFound, match="nope"):
        GrpcBlackBox(server.address, model="nope", timeout=30).metadata()


def test_errors_are_black_box_errors(server, box):
    with pytest.raises(BlackBoxNotFound, match="unknown model 'nope'"):
        GrpcBlackBox(server.address, model="nope", timeout=30)(torch.ones(1, 1))
    with pytest.raises(BlackBoxError, match="one row per input row"):
        GrpcBlackBox(server.address, model="short", timeout=30)(torch.ones(3, 1))
    with pytest.raises(BlackBoxInvalidArgument, match="same batch size"):
        GrpcBlackBox(server.address, model="pair", timeout=30)(torch.ones(2, 1), torch.ones(3, 1))
    with pytest.raises(BlackBoxInvalidArgument, match="bfloat16"):
        box(torch.ones(2, 2, dtype=torch.bfloat16))
    with pytest.raises(BlackBoxInvalidArgument, match="NaN or Inf"):
        box(torch.tensor([[1.0, float("nan")]]))
    assert torch.equal(box(torch.ones(1, 1)), torch.full((1, 1), 3.0))


def test_deadline_is_enforced(server, box):
    slow = GrpcBlackBox(server.address, model="slow", timeout=0.5, retries=0)
    with pytest.raises(BlackBoxTimeout, match="DEADLINE_EXCEEDED"):
        slow(torch.ones(1, 1))
    assert torch.equal(box(torch.ones(1, 1)), torch.full((1, 1), 3.0))  # the server still answers


def test_killed_server_gives_clear_error_then_wait_for_ready_recovers():
    proc = start_server()
    port = proc.port
    try:
        box = GrpcBlackBox(proc.address, model="affine", timeout=10, retries=1)
        assert torch.equal(box(torch.ones(2, 2)), torch.full((2, 2), 3.0))
        proc.kill()
        with pytest.raises(BlackBoxUnavailable, match="is the server running"):
            box(torch.ones(2, 2))
        # A patient client: waits (until its deadline) for the server to come back.
        patient = GrpcBlackBox(proc.address, model="affine", timeout=90, wait_for_ready=True)
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("y", patient(torch.ones(2, 2))))
        thread.start()
        time.sleep(1.0)  # the call is now waiting for a server that is down
        proc = start_server("--port", str(port))
        thread.join(90)
        assert torch.equal(result["y"], torch.full((2, 2), 3.0))
        assert torch.equal(box(torch.ones(2, 2)), torch.full((2, 2), 3.0))  # same channel, reconnected
    finally:
        proc.stop()


def _module_oracle():
    from deepzero_oracle import ModuleOracle

    return ModuleOracle


def test_plugs_into_module_oracle_like_a_local_callable(server):
    """Same losses with the head served over gRPC as in-process; a dead server is an error."""
    ModuleOracle = _module_oracle()
    import torch.nn.functional as F

    torch.manual_seed(0)
    learner = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    x, y = torch.randn(16, 6), torch.randint(0, 10, (16,))
    local = ModuleOracle(learner, F.cross_entropy, blackbox=LocalBlackBox(digits_head)).bind(x, y)
    remote_box = GrpcBlackBox(server.address, model="digits_head", timeout=30)
    remote = ModuleOracle(learner, F.cross_entropy, blackbox=remote_box).bind(x, y)
    theta = local.theta()
    thetas = theta + 0.01 * torch.randn(5, theta.numel())
    assert torch.equal(remote.losses(thetas), local.losses(thetas))
    coords = torch.arange(0, theta.numel(), 7)
    assert torch.equal(remote.coordinate_losses(theta, coords, 1e-3),
                       local.coordinate_losses(theta, coords, 1e-3))
    assert remote_box.calls > 0


def test_module_oracle_fails_loudly_when_the_server_dies():
    ModuleOracle = _module_oracle()
    import torch.nn.functional as F

    proc = start_server()
    try:
        learner = torch.nn.Linear(4, 3)
        box = GrpcBlackBox(proc.address, model="row_sum", timeout=10, retries=1)
        oracle = ModuleOracle(learner, lambda out, t: F.mse_loss(out.squeeze(1), t), blackbox=box)
        oracle.bind(torch.randn(8, 4), torch.randn(8))
        theta = oracle.theta()
        before = oracle.losses(theta[None])
        assert torch.isfinite(before).all()
        proc.kill()
        with pytest.raises(BlackBoxUnavailable):
            oracle.losses(theta[None])
    finally:
        proc.stop()


def test_row_sum_matches_local(server):
    x = torch.randn(10, 5)
    with GrpcBlackBox(server.address, model="row_sum", timeout=30) as b:
        assert torch.equal(b(x), row_sum(x))
