import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, RGE, Autograd, ModuleOracle
from deepzero_oracle.classify import Recipe, train_classifier
from deepzero_oracle.cli import main
from deepzero_oracle.data import class_balanced_sample, load_dataset
from deepzero_oracle.pruning import MaskSchedule, uniform_ratios
from deepzero_oracle.train import Trainer, assign_gradient


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
        make_trainer(learner, estimator, sparsity=0.5).fit(x, y, epochs=2, batch_size=32)
        runs.append(params_of(learner))
    assert torch.equal(runs[0], runs[1])


def test_resume_continues_the_same_trajectory(tmp_path):
    learner, x, y = tiny_problem()
    straight = make_trainer(learner, RGE(q=10), sparsity=0.5)
    straight.fit(x, y, epochs=3, batch_size=32)
    # interrupted: one epoch, then a fresh process-like trainer resumes from the checkpoint
    learner2, _, _ = tiny_problem()
    make_trainer(learner2, RGE(q=10), tmp_path, sparsity=0.5).fit(x, y, epochs=1, batch_size=32)
    learner3, _, _ = tiny_problem(seed=123)  # different init: everything must come from disk
    resumed = make_trainer(learner3, RGE(q=10), tmp_path, sparsity=0.5)
    resumed.fit(x, y, epochs=3, batch_size=32)
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
    trainer.fit(x, y, epochs=3, batch_size=32)
    oracle.bind(x, y)
    assert float(oracle.loss(oracle.theta())) < before
    assert all(p.grad is not None for p in learner.parameters())


def test_sparse_cge_queries_only_masked_coordinates():
    learner, x, y = tiny_problem()
    trainer = make_trainer(learner, CGE(), sparsity=0.75)
    trainer.fit(x, y, epochs=1, batch_size=96)
    active = int(trainer.mask_schedule.mask.sum())
    assert active < trainer.oracle.dim / 2
    assert trainer.oracle.queries == active + 1


def test_max_queries_stops_before_exceeding():
    learner, x, y = tiny_problem()
    trainer = make_trainer(learner, CGE())
    per_step = trainer.oracle.dim + 1
    trainer.fit(x, y, epochs=5, batch_size=32, max_queries=int(per_step * 2.5))
    assert trainer.oracle.queries == 2 * per_step
    assert "query budget" in trainer.stopped_reason


def test_fo_baseline_matches_autograd_step():
    learner, x, y = tiny_problem()
    reference = tiny_problem()[0]
    make_trainer(learner, Autograd()).fit(x, y, epochs=1, batch_size=96)
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
               "--sparsity", "0.5", "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "queries", "seconds", "estimator", "sparsity"):
        assert key in metrics
    assert metrics["estimator"] == "cge" and metrics["sparsity"] == 0.5
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1: one half-sparse ZO epoch already learns
    assert (out / "curves.png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == metrics["queries"]


def test_cli_rejects_bad_values(tmp_path, capsys):
    assert main(["train", "--sparsity", "1.5", "--out", str(tmp_path)]) == 2
    assert "sparsity must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "transformer", "--out", str(tmp_path)])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_cnn_cge_reaches_90_percent(tmp_path):
    metrics = train_classifier(Recipe(dataset="digits", model="cnn", estimator="cge", epochs=3),
                               tmp_path, progress=False)
    assert metrics["test_accuracy"] >= 0.90
