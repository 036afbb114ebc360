"""One command-line convention, finished: every command that writes results takes ``--out``,
every trainer ``--max-queries`` (exit 4, checkpoint kept, continued by a larger budget), every
command reaching a remote black box a checked ``--timeout``, JSON on stdout only with ``--json``,
and ``--help`` showing every default that is a value (0 and False included)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from collections import Counter

import pytest

from deepzero_oracle.apps.cli import build_parser, main
from support.cli import leaves
from deepzero_oracle.common.options import MAX_TIMEOUT, HelpFormatter

# commands that write nothing: a server, and a schema printer
NO_RESULTS = {("serve",), ("proto",)}
TRAINERS = [("train",), ("sol", "train"), ("defense", "train")]
REMOTE = [("sol", "train"), ("sol", "eval"), ("sol", "compare"), ("defense", "train"), ("defense", "certify"),
          ("defense", "compare")]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.fixture(scope="module")
def commands(parser):
    return dict(leaves(parser))


def flags(parser):
    return {s for a in parser._actions for s in a.option_strings}


def test_every_command_that_writes_results_takes_out(commands):
    assert set(TRAINERS) | set(REMOTE) <= set(commands)
    for path, p in commands.items():
        if path not in NO_RESULTS:
            assert "--out" in flags(p), f"{' '.join(path)} writes results but has no --out"
            assert "--root" not in {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def test_every_trainer_takes_a_query_budget(commands):
    for path in TRAINERS:
        p = commands[path]
        assert "--max-queries" in flags(p), path
        action = next(a for a in p._actions if "--max-queries" in a.option_strings)
        assert action.default is None
        for bad in ("0", "-5", "many"):
            with pytest.raises(argparse.ArgumentTypeError, match="positive whole number of queries"):
                action.type(bad)
        assert action.type("1000") == 1000


@pytest.mark.parametrize("path", REMOTE, ids=" ".join)
def test_remote_commands_take_a_checked_timeout(commands, path, capsys):
    action = next(a for a in commands[path]._actions if "--timeout" in a.option_strings)
    assert 0 < action.default <= MAX_TIMEOUT
    assert action.type("2.5") == 2.5
    for bad in ("0", "-1", "nan", "inf", str(MAX_TIMEOUT * 2), "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected seconds"):
            action.type(bad)
    with pytest.raises(SystemExit) as done:
        main([*path, "--timeout", "0", "--out", "x"])
    assert done.value.code == 2 and "--timeout" in capsys.readouterr().err


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_help_shows_every_default_that_is_a_value(commands):
    for path, p in commands.items():
        text = _flat(p.format_help())
        assert "(default: None)" not in text, path
        expected = Counter()
        for a in p._actions:
            if not a.option_strings or a.default is None or a.default is argparse.SUPPRESS:
                continue
            if "%(default)" in (a.help or "") or a.help is argparse.SUPPRESS:
                continue
            shown = f"(default: {a.default})"
            assert HelpFormatter(prog="x")._get_help_string(a).endswith("(default: %(default)s)"), (path, a.dest)
            assert shown in text, f"{' '.join(path)} --help does not show {a.option_strings[0]} {shown}"
            expected[shown] += 1
        for shown, count in expected.items():  # each flag's own, e.g. two flags at (default: 0)
            assert text.count(shown) >= count, (path, shown)
    # 0 and False are shown, as any other value
    train = _flat(commands[("train",)].format_help())
    assert "(default: 0)" in train and "(default: False)" in train
    assert "(default: 0)" in _flat(build_parser().format_help())  # -v counts from 0


def test_every_command_with_quiet_can_force_bars_on(commands):
    for path, p in commands.items():
        if "--quiet" in flags(p):
            assert "--progress" in flags(p), path


# ---------------------------------------------------------------------- a tiny run
def test_train_prints_text_by_default_and_stops_at_its_query_budget(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", "mlp", "--estimator", "fo", "--epochs", "1", "--batch-size", "64", "--quiet",
              "--out", str(out)]
    assert main([*common, "--max-queries", "3"]) == 4  # the FO baseline spends one query per step
    captured = capsys.readouterr()
    assert "{" not in captured.out and "test accuracy" in captured.out  # text, not JSON, without --json
    budget = [line for line in captured.err.splitlines() if "--max-queries" in line]
    assert len(budget) == 1 and "after 3 queries" in budget[0] and str(out) in budget[0], captured.err
    assert (out / "checkpoint.pt").exists()
    with open(out / "steps.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # the same command with a larger budget continues the run from its checkpoint
    assert main([*common, "--max-queries", "5", "--json"]) == 4
    printed = json.loads(capsys.readouterr().out)  # with --json: one JSON document
    assert printed["queries"] == 5 and printed["stopped_reason"] == "query budget of 5 reached"
    with open(out / "steps.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def _certified_run(folder, method: str, correct: list[int]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "certify.tsv", "w") as f:
        f.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
        for i, c in enumerate(correct):
            f.write(f"{i}\t1\t{1 if c else 0}\t{0.6 if c else 0.0}\t{c}\t0.01\n")
    (folder / "certify.json").write_text(json.dumps({
        "method": method, "training_queries": 100, "training_blackbox_images": 1000, "sigma": 0.25, "n": 100,
        "alpha": 0.001, "samples_per_second": 1000.0}))


def test_defense_report_writes_to_out_and_accepts_the_old_root(tmp_path, capsys, caplog):
    root = tmp_path / "runs"
    _certified_run(root / "none", "none", [1, 0, 0, 1])
    _certified_run(root / "zo-ds", "zo-ds", [1, 1, 0, 1])
    assert main(["defense", "report", "--out", str(root), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["none", "zo-ds"] and table["zo-ds"]["0.0"] == 0.75
    assert (root / "report.md").exists() and (root / "certified_accuracy.png").exists()
    (root / "report.md").unlink()
    with caplog.at_level(logging.WARNING, logger="deepzero_oracle"):
        assert main(["defense", "report", "--root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == table
    assert (root / "report.md").exists()
    assert any("--root is deprecated: use --out" in r.getMessage() for r in caplog.records)


def test_hidden_alias_is_not_in_help(commands):
    assert "--root" not in commands[("defense", "report")].format_help()
