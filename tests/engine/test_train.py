import csv
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, RGE, Autograd, ModuleOracle, TensorBatches
from deepzero_oracle.apps.classify import Recipe, train_classifier
from deepzero_oracle.apps.cli import main
from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.pruning import MaskSchedule, class_balanced_sample, uniform_ratios
from deepzero_oracle.theta import assign_gradient
from deepzero_oracle.train import Trainer


def tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(96, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    torch.manual_seed(seed)
    learner = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return learner, x, y


def make_trainer(learner, estimator, out_dir=None, sparsity=0.0, seed=0):
    oracle = ModuleOracle(learner, F.cross_entropy)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    masks = MaskSchedule(oracle.slots, uniform_ratios(oracle.slots, sparsity), 1) if sparsity else None
    return Trainer(oracle, estimator, opt, scheduler=sched, mask_schedule=masks, out_dir=out_dir,
                   seed=seed, progress=False,
                   evaluate=lambda m: {"acc": float((m(x_eval).argmax(1) == y_eval).float().mean())})


x_eval = torch.rand(32, 1, 4, 4)
y_eval = (x_eval.mean((1, 2, 3)) > 0.5).long()


def params_of(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("estimator", [CGE(), RGE(q=20)])
def test_same_seed_same_trajectory(estimator):
    runs = []
    for _ in range(2):
        learner, x, y = tiny_problem()
        make_trainer(learner, estimator, sparsity=0.5).fit(TensorBatches(x, y, batch_size=32), epochs=2)
        runs.append(params_of(learner))
    assert torch.equal(runs[0], runs[1])


def test_resume_continues_the_same_trajectory(tmp_path):
    learner, x, y = tiny_problem()
    straight = make_trainer(learner, RGE(q=10), sparsity=0.5)
    straight.fit(TensorBatches(x, y, batch_size=32), epochs=3)
    # interrupted: one epoch, then a fresh process-like trainer resumes from the checkpoint
    learner2, _, _ = tiny_problem()
    make_trainer(learner2, RGE(q=10), tmp_path, sparsity=0.5).fit(TensorBatches(x, y, batch_size=32), epochs=1)
    learner3, _, _ = tiny_problem(seed=123)  # different init: everything must come from disk
    resumed = make_trainer(learner3, RGE(q=10), tmp_path, sparsity=0.5)
    resumed.fit(TensorBatches(x, y, batch_size=32), epochs=3)
    assert torch.equal(params_of(learner3), params_of(learner))
    assert resumed.oracle.queries == straight.oracle.queries
    assert resumed.history == straight.history[:1] + resumed.history[1:]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert torch.equal(learner3[2].running_mean, learner[2].running_mean)
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # header + epochs 0..3, each once


def test_zo_training_lowers_the_loss_and_fills_grads():
    learner, x, y = tiny_problem()
    trainer = make_trainer(learner, CGE())
    oracle = trainer.oracle.bind(x, y)
    before = float(oracle.loss(oracle.theta()))
    trainer.fit(TensorBatches(x, y, batch_size=32), epochs=3)
    oracle.bind(x, y)
    assert float(oracle.loss(oracle.theta())) < before
    assert all(p.grad is not None for p in learner.parameters())


def test_sparse_cge_queries_only_masked_coordinates():
    learner, x, y = tiny_problem()
    trainer = make_trainer(learner, CGE(), sparsity=0.75)
    trainer.fit(TensorBatches(x, y, batch_size=96), epochs=1)
    active = int(trainer.mask_schedule.mask.sum())
    assert active < trainer.oracle.dim / 2
    assert trainer.oracle.queries == active + 1


def test_max_queries_stops_before_exceeding():
    learner, x, y = tiny_problem()
    trainer = make_trainer(learner, CGE())
    per_step = trainer.oracle.dim + 1
    trainer.fit(TensorBatches(x, y, batch_size=32), epochs=5, max_queries=int(per_step * 2.5))
    assert trainer.oracle.queries == 2 * per_step
    assert "query budget" in trainer.stopped_reason


def test_fo_baseline_matches_autograd_step():
    learner, x, y = tiny_problem()
    reference = tiny_problem()[0]
    make_trainer(learner, Autograd()).fit(TensorBatches(x, y, batch_size=96), epochs=1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    assert torch.allclose(params_of(learner), params_of(reference), atol=1e-6)


def test_mask_schedule_redraws_on_schedule():
    learner, _, _ = tiny_problem()
    slots = ModuleOracle(learner, F.cross_entropy).slots
    sched = MaskSchedule(slots, uniform_ratios(slots, 0.9), redraw_every=5)
    g = torch.Generator().manual_seed(0)
    masks = [sched.mask_for(e, g).clone() for e in range(11)]
    assert all(torch.equal(masks[0], m) for m in masks[1:5])
    assert not torch.equal(masks[4], masks[5])
    assert all(torch.equal(masks[5], m) for m in masks[6:10])
    assert not torch.equal(masks[9], masks[10])
    for s in slots:  # each layer keeps its own ratio
        kept = int(masks[0][s.offset : s.offset + s.numel].sum())
        assert kept == max(1, round(0.1 * s.numel))


def test_assign_gradient_checks_sizes():
    learner, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="parameters hold"):
        assign_gradient(learner.parameters(), torch.zeros(3))


def test_datasets_load_offline_and_stratified():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.classes == 10
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    counts = torch.bincount(d.y_test)
    assert counts.min() >= 30  # stratified: every class held out
    xs, ys = class_balanced_sample(d.x_train, d.y_train, 5)
    assert torch.equal(torch.bincount(ys), torch.full((10,), 5))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_cli_train_writes_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "digits", "--model", "mlp", "--estimator", "cge", "--epochs", "1",
               "--sparsity", "0.5", "--out", str(out), "--quiet", "--json"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "queries", "seconds", "estimator", "sparsity"):
        assert key in metrics
    assert metrics["estimator"] == "cge" and metrics["sparsity"] == 0.5
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1: one half-sparse ZO epoch already learns
    assert (out / "curves.png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == metrics["queries"]


def test_cli_train_evaluates_and_checkpoints_within_epochs(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--model", "mlp", "--estimator", "fo", "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--eval-every", "10", "--checkpoint-every", "7", "--out", str(tmp_path / "often")]) == 0
    with open(tmp_path / "often" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    last = steps[-1]
    assert last > 40 and steps == [0, *range(10, last, 10), last]  # before training, every 10, epoch end
    plain, often = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "often"))
    assert often["test_correct"] == plain["test_correct"]  # the trajectory is the same
    with pytest.raises(SystemExit):
        main([*args, "--eval-every", "0", "--out", str(tmp_path / "bad")])
    assert "expected a positive whole number of steps, got '0'" in capsys.readouterr().err


def test_cli_rejects_bad_values(tmp_path, capsys):
    assert main(["train", "--sparsity", "1.5", "--out", str(tmp_path)]) == 2
    assert "sparsity must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "transformer", "--out", str(tmp_path)])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_cnn_cge_reaches_90_percent(tmp_path):
    metrics = train_classifier(Recipe(dataset="digits", model="cnn", estimator="cge", sparsity=0.0, epochs=3),
                               tmp_path, progress=False)
    assert metrics["test_accuracy"] >= 0.90


def test_any_iterable_of_batches_works_a_dataloader_too():
    from torch.utils.data import DataLoader, TensorDataset

    learner, x, y = tiny_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = make_trainer(learner, CGE())
    trainer.fit(loader, epochs=2)
    assert trainer.step == 2 * 3 and trainer.epoch == 2
    listed = make_trainer(tiny_problem()[0], CGE())
    listed.fit([(x[:48], y[:48]), (x[48:], y[48:])], max_steps=3)  # a plain list, stopped mid-epoch
    assert listed.step == 3 and listed.epoch == 1


@pytest.mark.parametrize("source", ["tensor-batches", "dataloader"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, source):
    from torch.utils.data import DataLoader, TensorDataset

    def batches(x, y):
        if source == "tensor-batches":
            return TensorBatches(x, y, batch_size=16, seed=3)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffled by the global RNG

    learner, x, y = tiny_problem()
    torch.manual_seed(11)
    straight = make_trainer(learner, RGE(q=6), sparsity=0.5)
    straight.fit(batches(x, y), epochs=2)
    learner2, _, _ = tiny_problem()
    torch.manual_seed(11)
    first = make_trainer(learner2, RGE(q=6), tmp_path, sparsity=0.5)
    first.checkpoint_every = 4
    first.fit(batches(x, y), epochs=2, max_steps=4)  # stops after 4 of 6 steps in epoch 0
    assert first.step == 4 and first.step_in_epoch == 4
    learner3, _, _ = tiny_problem(seed=5)
    torch.manual_seed(999)  # whatever the process did before: the checkpoint restores it
    resumed = make_trainer(learner3, RGE(q=6), tmp_path, sparsity=0.5)
    resumed.fit(batches(x, y), epochs=2)
    assert torch.equal(params_of(learner3), params_of(learner))
    assert resumed.oracle.queries == straight.oracle.queries and resumed.step == straight.step
    steps = (tmp_path / "steps.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in steps[1:]] == list(range(1, straight.step + 1))


def test_a_resume_with_other_settings_is_refused(tmp_path):
    from deepzero_oracle import SettingsMismatch

    learner, x, y = tiny_problem()
    oracle = ModuleOracle(learner, F.cross_entropy)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    Trainer(oracle, CGE(), opt, out_dir=tmp_path, settings={"lr": 0.1, "model": "mlp"},
            progress=False).fit(TensorBatches(x, y, batch_size=32), epochs=1)
    other = Trainer(oracle, CGE(), opt, out_dir=tmp_path, settings={"lr": 0.05, "model": "mlp"}, progress=False)
    with pytest.raises(SettingsMismatch, match=r"lr: 0\.1 in the run, 0\.05 now"):
        other.fit(TensorBatches(x, y, batch_size=32), epochs=2)
    other.fit(TensorBatches(x, y, batch_size=32), epochs=1, resume=False)  # starting over is fine
    assert other.step == 3


def test_divergence_keeps_the_last_checkpoint(tmp_path):
    from deepzero_oracle import TrainingDiverged

    def blows_up(out, t):  # a loss that turns NaN once the learner's outputs grow large
        return F.cross_entropy(out, t) if out.abs().max() < 5 else out.sum() * float("nan")

    learner, x, y = tiny_problem()
    oracle = ModuleOracle(learner, blows_up)
    trainer = Trainer(oracle, CGE(), torch.optim.SGD(learner.parameters(), lr=50.0), out_dir=tmp_path,
                      checkpoint_every=1, progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step (\d+).*last good checkpoint \(step \d+\)") as err:
        trainer.fit(TensorBatches(x, y, batch_size=32), epochs=50)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == err.value.checkpoint_step == err.value.step - 1
    assert all(torch.isfinite(v).all() for v in saved["learner"].values())


def test_cli_resume_refuses_a_changed_lr_and_restart_recomputes_ratios(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out), "--quiet",
            "--sparsity", "0.5", "--pruner", "uniform"]
    assert main(base) == 0
    assert main(base + ["--lr", "0.05"]) == 2
    assert "lr: 0.1 in the run, 0.05 now" in capsys.readouterr().err
    assert main([*base[:-1], "random"]) == 2  # other layer ratios without --restart: refused
    assert "pruner" in capsys.readouterr().err
    assert main([*base[:-1], "random", "--restart"]) == 0
    assert json.loads((out / "ratios.json").read_text())["pruner"] == "random"


def test_cli_exit_codes_and_version(tmp_path, capsys):
    from deepzero_oracle import __version__
    from deepzero_oracle.apps.cli import exit_code
    from deepzero_oracle import NonFiniteLossError, QueryBudgetExceeded, TrainingDiverged
    from deepzero_oracle.blackbox import BlackBoxUnavailable

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out
    codes = [exit_code(ValueError("bad")), exit_code(TrainingDiverged("x", step=1, checkpoint_step=None)),
             exit_code(NonFiniteLossError("nan")), exit_code(QueryBudgetExceeded("spent")),
             exit_code(BlackBoxUnavailable("down")), exit_code(RuntimeError("a bug"))]
    assert codes == [2, 3, 3, 4, 5, None]
    wrapped = RuntimeError("chunk failed")
    wrapped.__cause__ = BlackBoxUnavailable("down")
    assert exit_code(wrapped) == 5
    rc = main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--max-queries", "5000",
               "--out", str(tmp_path / "budget"), "--quiet"])
    assert rc == 4 and "stopped early: query budget of 5000 reached" in capsys.readouterr().err


@pytest.mark.slow
def test_sparse_example_reports_intervals_and_paired_tests(tmp_path, capsys):
    """examples/sparse_mnist.py over two seeds: per-seed and pooled tables with exact intervals
    over the test images and McNemar tests paired on them."""
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "sparse_mnist.py"))
    example["main"](["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--quick", "--seeds", "0,1",
                     "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"seed 0", "seed 1", "pooled"}
    pooled, seed0 = summary["pooled"], summary["seed 0"]
    fo = pooled["FO dense"]
    assert fo["images"] == 2 * seed0["FO dense"]["images"] == 2 * 360  # digits: 360 test images per seed
    assert fo["ci95"][0] <= fo["test_accuracy"] <= fo["ci95"][1]
    test = pooled["FO dense"]["vs_main"]
    assert test["n"] == 720 and test["a_only"] + test["b_only"] + test["both"] + test["neither"] == 720
    assert "CGE, ZO-GraSP ratios" in pooled and "vs_main" not in pooled["CGE, ZO-GraSP ratios"]
    assert "McNemar p" in (tmp_path / "table.md").read_text()
