import json

from deepzero_oracle.apps.cli import main


def test_engine_benchmark_runs_at_tiny_size(tmp_path, capsys):
    assert main(["bench", "--tiny", "--loop-coords", "2", "--engine-coords", "4", "--ablation-coords", "3", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("speedup_vs_loop", "coords_per_forward", "max_abs_diff"):
        assert report[key] > 0
    for result in report["results"]:
        # the engine and the loop compute the same gradient (float32 forward differences)
        assert result["max_abs_diff"] <= 1e-3 * max(1.0, result["max_abs_grad"])
        # delta propagation must do less arithmetic per coordinate than re-running the suffix
        assert result["flops_per_forward"] > 0
        assert result["engine_flops_per_coord"] < result["loop_flops_per_coord"]
        assert set(result["ablation"]) == {"engine", "no fused kernels", "no delta propagation", "no one-weight delta",
                                        "no feature reuse"}
    assert json.loads((tmp_path / "engine.json").read_text())["results"]
    assert "speedup" in (tmp_path / "engine.md").read_text()
