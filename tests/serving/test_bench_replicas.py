"""The replicas benchmark runs end to end at a tiny size (figures are reported, never asserted)."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_replicas.py"


@pytest.mark.slow  # ~40 s: three ZO-SOL runs and two servers
def test_bench_replicas_runs_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_replicas", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick"])
    runs = results["runs"]
    for name in ("in_process", "workers_1", "workers_2"):
        assert math.isfinite(runs[name]["steps_per_second"]) and runs[name]["steps_per_second"] > 0
    assert runs["workers_1"]["queries"] == runs["workers_2"]["queries"]  # the same work
    assert math.isfinite(results["ratio_2_vs_1"]) and math.isfinite(runs["workers_1"]["overhead_ms_per_call"])
    assert math.isfinite(results["solver_ratio_2_vs_1"])
    assert "ratio 2 vs 1 workers" in capsys.readouterr().out
