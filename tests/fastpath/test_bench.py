import json

import pytest
import torch

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
        for method in ("forward", "loop", "engine"):  # FLOP efficiency is reported for each
            assert 0 < result[f"{method}_gflops"] < 10 * result["matmul_gflops"]
        assert set(result["ablation"]) == {"engine", "no fused kernels", "no delta propagation", "no one-weight delta",
                                        "no feature reuse"}
    assert json.loads((tmp_path / "engine.json").read_text())["results"]
    assert "speedup" in (tmp_path / "engine.md").read_text()
    assert "engine GFLOP/s" in (tmp_path / "engine.md").read_text()


def test_released_cge_and_the_loop_agree_with_the_engine_on_a_resnet():
    """The two baselines of `bench --model resnet*` compute the same losses as the engine."""
    import torch
    import torch.nn.functional as F

    from deepzero_oracle import ModuleOracle
    from deepzero_oracle.apps.bench import ReferenceLoop, ReleasedCGE
    from deepzero_oracle.common.models import resnet

    learner = resnet((3, 6, 6), 10, 1, widths=(2, 4, 8)).double().train()
    x, y = torch.rand(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    coords = torch.tensor([0, 5, 60, 200, oracle.dim - 1])
    want = oracle.coordinate_losses(oracle.theta(), coords, 1e-3)
    for baseline in (ReleasedCGE(learner, F.cross_entropy, x, y), ReferenceLoop(learner, F.cross_entropy, x, y)):
        assert torch.allclose(baseline.losses(coords, 1e-3), want, rtol=0, atol=1e-12)
    # the released cge works on its own copy: the learner's parameters are where they were
    assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items() if "running" not in k
               and "num_batches" not in k)


@pytest.mark.slow
def test_sparse_resnet_benchmark_runs(tmp_path, capsys):
    assert main(["bench", "--model", "resnet8", "--batch-size", "2", "--engine-coords", "1", "--loop-coords", "1",
                 "--released-coords", "1", "--grasp-queries", "1", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (result,) = report["results"]
    for key in ("speedup_vs_loop", "speedup_vs_released", "coords_per_forward", "peak_rss_mb"):
        assert result[key] > 0
    assert result["max_abs_diff"] <= 1e-3 * 10  # float32 forward differences with mu = 5e-3
    assert set(result["methods"]) == {"engine", "loop", "released"}
    assert (tmp_path / "engine-resnet8.md").exists()


def test_profile_and_eval_mode_of_a_sparse_step(monkeypatch):
    """`bench --profile` attributes the engine's operator time to layer kinds; `--eval-mode`
    freezes BatchNorm statistics (those of the batch) before the step."""
    import torch.nn as nn

    import deepzero_oracle.fastpath.fused as fused
    from deepzero_oracle.apps.bench import SparseStep, markdown_profile, profile_sparse_step

    monkeypatch.setattr(fused, "MIN_NORM_PER_COPY", 1 << 62)  # library ops: no compile in this test
    result = profile_sparse_step("resnet8", 2, engine_coords=1, grasp_queries=1)
    kinds = {row["kind"] for row in result["rows"]}
    assert {"conv 16->16 32x32", "batchnorm", "moved weight"} <= kinds
    assert abs(sum(row["share"] for row in result["rows"]) - 1) < 1e-9
    convs = [row for row in result["rows"] if row["kind"].startswith("conv") and "(block)" not in row["kind"]]
    assert convs and all(row["gflop_per_step"] > 0 for row in convs)
    assert "| layer kind |" in markdown_profile([result])
    step = SparseStep("resnet8", 2, grasp_queries=1, eval_mode=True)
    assert step.mode == "eval" and not step.learner.training
    norms = [m for m in step.learner.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)


def test_profile_and_eval_mode_need_a_resnet(capsys):
    for flag in ("--profile", "--eval-mode"):
        with pytest.raises(SystemExit, match="resnet"):
            main(["bench", "--tiny", flag])
