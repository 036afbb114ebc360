"""Logs that behave: CSV logs appended in constant work per row (the header lives in memory),
new columns, rewinding on resume; TensorBoard refusing loudly without its extra; tqdm bars off
when stderr is not a terminal unless asked for; diagnostics through ``logging``, never print."""

from __future__ import annotations

import argparse
import ast
import csv
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, CSVLogger, ModuleOracle, TensorBatches, TensorBoardLogger, Trainer
from deepzero_oracle.apps.cli import build_parser, main
from deepzero_oracle.common.options import add_quiet, progress_of
from deepzero_oracle.logs import LOGGER, configure_logging, logging_level

ROOT = Path(__file__).resolve().parents[2]


def _read(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


# ---------------------------------------------------------------------- CSVLogger
def test_rows_are_appended_in_order_with_one_header(tmp_path):
    log = CSVLogger(tmp_path / "steps.csv", on="step")
    for step in range(1, 6):
        log.on_step_end(None, {"step": step, "epoch": 0, "queries": 10 * step, "lr": 0.1, "loss": 1.0 / step,
                               "grad_norm": None, "seconds": 0.5})
    fields, rows = _read(tmp_path / "steps.csv")
    assert fields == ["step", "epoch", "queries", "lr", "loss", "grad_norm", "seconds"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["queries"] == "30" and rows[0]["grad_norm"] == ""  # None is written empty
    assert (tmp_path / "steps.csv").read_text().count("step,epoch") == 1
    assert log.rows() == rows


def test_appending_never_rereads_the_file(tmp_path, monkeypatch):
    log = CSVLogger(tmp_path / "m.csv")
    log.on_epoch_end(None, {"step": 0, "loss": 1.0})  # the first row writes the header

    def reread(*_):
        raise AssertionError("an append read the whole file")

    monkeypatch.setattr(CSVLogger, "_read", reread)
    for step in range(1, 200):
        log.on_epoch_end(None, {"step": step, "loss": 1.0 / step})
    monkeypatch.undo()
    assert [int(r["step"]) for r in log.rows()] == list(range(200))
    # a logger opened on an existing file reads only its header line before appending
    again = CSVLogger(tmp_path / "m.csv")
    monkeypatch.setattr(CSVLogger, "_read", reread)
    again.on_epoch_end(None, {"step": 200, "loss": 0.0})
    monkeypatch.undo()
    assert [int(r["step"]) for r in again.rows()] == list(range(201))


def test_a_new_column_rewrites_the_file_once_with_the_union(tmp_path):
    log = CSVLogger(tmp_path / "m.csv")
    log.on_epoch_end(None, {"step": 0, "loss": 2.0})
    log.on_epoch_end(None, {"step": 1, "loss": 1.5, "test_accuracy": 0.4})  # a new column
    log.on_epoch_end(None, {"step": 2, "loss": 1.0, "test_accuracy": 0.6})
    log.on_epoch_end(None, {"step": 3, "test_accuracy": 0.7})  # a missing column stays empty
    fields, rows = _read(tmp_path / "m.csv")
    assert fields == ["step", "loss", "test_accuracy"]
    assert [(r["step"], r["loss"], r["test_accuracy"]) for r in rows] == [
        ("0", "2.0", ""), ("1", "1.5", "0.4"), ("2", "1.0", "0.6"), ("3", "", "0.7")]


def test_rewind_drops_rows_after_the_step_and_a_cut_last_line(tmp_path):
    path = tmp_path / "steps.csv"
    log = CSVLogger(path, on="step")
    for step in range(1, 9):
        log.on_step_end(None, {"step": step, "loss": float(step)})
    with open(path, "a") as f:
        f.write("9,0,9")  # a crash in the middle of a row: no newline
    fresh = CSVLogger(path, on="step")
    fresh.rewind(5)
    assert [int(r["step"]) for r in fresh.rows()] == [1, 2, 3, 4, 5]
    fresh.on_step_end(None, {"step": 6, "loss": 6.0})
    fields, rows = _read(path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["epoch"] == ""
    # a cut line left by a crash is repaired before the next append too
    with open(path, "a") as f:
        f.write("7,0")
    CSVLogger(path, on="step").on_step_end(None, {"step": 7, "loss": 7.0})
    assert [int(r["step"]) for r in _read(path)[1]] == [1, 2, 3, 4, 5, 6, 7]
    CSVLogger(path).rewind(-1)  # a fresh run owns its logs
    assert not path.exists()


def _trainer(out, seed=0, **kwargs):
    torch.manual_seed(seed)
    learner = nn.Sequential(nn.Linear(4, 3))
    oracle = ModuleOracle(learner, F.cross_entropy)
    return Trainer(oracle, CGE(mu=1e-3), torch.optim.SGD(learner.parameters(), lr=0.1), out_dir=out,
                   settings={"what": "logs"}, seed=seed, **{"progress": False, **kwargs})


def test_a_resumed_run_logs_every_step_once(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    out = tmp_path / "run"
    _trainer(out).fit(TensorBatches(x, y, batch_size=8, seed=0), max_steps=3)
    # steps written after the checkpoint by a run that then died: the resume drops them
    with open(out / "steps.csv", "a") as f:
        f.write("4,0,999,0.1,9.9,1.0,1.0\n5,0,999,0.1,9.9,1.0,1.0\n")
    _trainer(out).fit(TensorBatches(x, y, batch_size=8, seed=0), max_steps=7)
    _, steps = _read(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 8))
    assert all(r["queries"] != "999" for r in steps)
    # the same as an uninterrupted run's log, loss for loss
    _trainer(tmp_path / "straight").fit(TensorBatches(x, y, batch_size=8, seed=0), max_steps=7)
    _, straight = _read(tmp_path / "straight" / "steps.csv")
    assert [r["loss"] for r in steps] == [r["loss"] for r in straight]
    _, evals = _read(out / "metrics.csv")
    assert [int(r["step"]) for r in evals] == [0, 5]  # before training and at the epoch end, once each


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_logger_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'deepzero-oracle\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_train_with_tensorboard_but_without_the_extra_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    try:
        code = main(["train", "--tensorboard", "--model", "mlp", "--estimator", "fo", "--epochs", "1", "--quiet",
                     "--out", str(tmp_path / "run")])
    except ImportError as exc:  # unmapped by the command line: still the install line
        assert "pip install 'deepzero-oracle[tensorboard]'" in str(exc)
    else:
        assert code == 2 and "pip install 'deepzero-oracle[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------- progress bars
def test_progress_bars_follow_tqdm_convention(tmp_path, capsys):
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    batches = TensorBatches(x, y, batch_size=8, seed=0)
    torch.manual_seed(0)
    learner = nn.Linear(4, 3)
    auto = Trainer(ModuleOracle(learner, F.cross_entropy), CGE(), torch.optim.SGD(learner.parameters(), lr=0.1))
    assert auto.progress is None  # the default: tqdm decides (off when stderr is not a terminal)
    assert not sys.stderr.isatty()  # pytest captures stderr
    assert auto._progress_bar(batches, 1, None).disable is True
    forced = _trainer(None, progress=True)
    bar = forced._progress_bar(batches, 1, None)
    assert bar.disable is False
    bar.close()
    assert "step/s" in capsys.readouterr().err  # forced on: drawn although stderr is no terminal
    auto.fit(batches, epochs=1)
    assert "step/s" not in capsys.readouterr().err


def test_quiet_and_progress_flags():
    parser = argparse.ArgumentParser()
    add_quiet(parser)
    assert progress_of(parser.parse_args([])) is None
    assert progress_of(parser.parse_args(["--quiet"])) is False
    assert progress_of(parser.parse_args(["--progress"])) is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--quiet", "--progress"])


def test_every_tqdm_call_site_leaves_disable_to_the_progress_setting():
    """tqdm is built only where a ``progress`` setting decides ``disable`` (None: tqdm's auto)."""
    sites = []
    for path in [*ROOT.glob("deepzero_oracle/**/*.py"), *ROOT.glob("adapters/**/*.py"), *ROOT.glob("simulators/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tqdm":
                sites.append(path.name)
                disable = [k for k in node.keywords if k.arg == "disable"]
                assert disable, f"{path}: tqdm(...) without disable= (it would show on a non-terminal)"
                assert not (isinstance(disable[0].value, ast.UnaryOp) and isinstance(disable[0].value.op, ast.Not)), (
                    f"{path}: disable=not progress turns auto (None) into always on")
    assert {"train.py", "certification.py", "base.py"} <= set(sites)


# ---------------------------------------------------------------------- logging
def test_verbosity_flags_set_the_package_logger_once(monkeypatch):
    parser = build_parser()
    assert logging_level(parser.parse_args(["train", "--out", "x"])) is None
    assert logging_level(parser.parse_args(["-v", "train", "--out", "x"])) == "INFO"
    assert logging_level(parser.parse_args(["-vv", "train", "--out", "x"])) == "DEBUG"
    assert logging_level(parser.parse_args(["-v", "--log-level", "error", "train", "--out", "x"])) == "ERROR"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud", "train", "--out", "x"])
    logger = logging.getLogger(LOGGER)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    configure_logging(None, default="INFO")
    configure_logging("DEBUG")
    configure_logging(None, default="ERROR")  # a later default does not override the level set
    assert len(logger.handlers) == 1 and logger.level == logging.DEBUG


def test_library_messages_reach_stderr_through_logging(monkeypatch, capsys):
    logger = logging.getLogger(LOGGER)
    monkeypatch.setattr(logger, "handlers", [])
    configure_logging("WARNING")
    logging.getLogger("deepzero_oracle.adapters.defense.cli").warning("a note for the user")
    logging.getLogger("deepzero_oracle.train").info("not shown at WARNING")
    captured = capsys.readouterr()
    assert "deepzero_oracle.adapters.defense.cli WARNING a note for the user" in captured.err
    assert "not shown" not in captured.err and captured.out == ""


# command-line report output: each of these prints the command's result (stdout) or its one-line
# errors and notes (stderr); everything else in the package logs
_CLI_FILES = {"deepzero_oracle/apps/cli.py", "deepzero_oracle/apps/classify.py", "deepzero_oracle/apps/bench/command.py",
              "deepzero_oracle/server/cli.py", "adapters/sol/cli.py", "adapters/defense/cli.py",
              "deepzero_oracle/apps/proto.py", "simulators/bench.py"}


def test_no_print_in_library_code():
    offenders = []
    for path in [*ROOT.glob("deepzero_oracle/**/*.py"), *ROOT.glob("adapters/**/*.py"), *ROOT.glob("simulators/*.py")]:
        rel = str(path.relative_to(ROOT))
        if rel in _CLI_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"print() in library code (use logging.getLogger(__name__)): {offenders}"
