"""The gRPC benchmark runs end to end at a tiny size (figures are reported, never asserted)."""

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_grpc.py"


def test_bench_grpc_runs_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_grpc", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick"])
    for key in ("unary_qps", "batched_qps", "rows_qps", "streamed_qps", "overhead_1ms_unary",
                "overhead_1ms_streamed", "overhead_1ms_batched", "one_ms_local_seconds_per_query"):
        assert math.isfinite(results[key]), key
    assert results["unary_qps"] > 0 and results["batched_qps"] > 0
    assert set(results["targets"]) == {"batched_qps>=50000", "overhead_1ms_batched<=0.05"}
    assert "queries/s" in capsys.readouterr().out
