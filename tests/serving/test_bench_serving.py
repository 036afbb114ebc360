"""benchmarks/bench_serving.py runs end to end at its quick size: our server and MLServer (its
own venv, made like tests/serving/test_kserve.py makes it), one REST JSON cell each, every answer
checked. Figures are reported, never asserted."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from support.mlserver_peer import VENV, ensure_mlserver_venv

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"

import tritonclient.grpc  # noqa: E402,F401 -- the test extra installs tritonclient[grpc,http]
import tritonclient.http  # noqa: E402,F401


def test_bench_serving_quick_both_servers_answer_right(tmp_path, capsys):
    ensure_mlserver_venv()
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serving.json"
    report = bench.main(["--quick", "--mlserver-venv", str(VENV), "--json", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"date", "machine", "config", "cells"}
    assert set(report["config"]["server_pids"]) == {"ours", "mlserver"}
    [cell] = report["cells"]
    assert (cell["protocol"], cell["batch"], cell["threads"]) == ("rest-json", 64, 1)
    for who in ("ours", "mlserver"):
        s = cell[who]
        assert s["requests"] > 0, who
        assert s["errors"] == 0 and s["wrong"] == 0, (who, s["error_messages"])
        assert s["rows_s"] == pytest.approx(64 * s["req_s"])
        assert s["req_s_range"][0] <= s["req_s"] <= s["req_s_range"][1]
        assert 0 < s["p50_ms"] <= s["p99_ms"]
        assert s["server_cpu_ms_per_request"] is None or s["server_cpu_ms_per_request"] >= 0
    assert math.isclose(cell["ratio"], cell["ours"]["req_s"] / cell["mlserver"]["req_s"])
    printed = capsys.readouterr().out
    assert "rest-json" in printed and "MLServer" in printed


def test_linear_is_the_documented_function():
    """The served function: x [N, 16] -> x @ W + b [N, 4], float32 (what answers are checked against)."""
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import numpy as np

    x = np.arange(32, dtype=np.float32).reshape(2, 16) / 7
    y = bench.linear(x)
    assert y.shape == (2, 4) and y.dtype == np.float32
    assert np.allclose(y, x.astype(np.float64) @ bench.W.astype(np.float64) + bench.B, rtol=bench.RTOL, atol=bench.ATOL)
