"""One command-line convention for every subcommand, whoever registers it."""

from __future__ import annotations

import argparse

import pytest

from deepzero_oracle.apps.cli import build_parser, main
from support.cli import leaves

# commands that write a run folder: continued from --out by default, --restart starts over
RUN_FOLDERS = [("train",), ("sol", "generate"), ("sol", "train"), ("sol", "compare"), ("defense", "train"),
               ("defense", "certify"), ("defense", "compare")]
REPORTING = [("train",), ("bench",), ("sol", "generate"), ("sol", "train"), ("sol", "eval"), ("sol", "report"),
             ("sol", "compare"),
             ("defense", "train"), ("defense", "certify"), ("defense", "report"), ("defense", "compare")]


def flags(parser):
    return {s for a in parser._actions for s in a.option_strings}


@pytest.fixture(scope="module")
def commands():
    return dict(leaves(build_parser()))


def test_every_registered_command_is_there(commands):
    assert set(commands) >= {("train",), ("serve",), ("bench",), ("sol", "generate"), ("sol", "train"),
                             ("sol", "eval"), ("sol", "report"), ("defense", "train"), ("defense", "certify"),
                             ("defense", "report")}


def test_every_flag_has_help_and_batch_flags_are_named_batch_size(commands):
    for path, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{' '.join(path)} {action.option_strings or action.dest} has no help text"
        assert not {f for f in flags(parser) if f.startswith("--batch") and f != "--batch-size"}, path


def test_run_folders_resume_by_default_and_reports_speak_json(commands):
    for path in RUN_FOLDERS:
        assert {"--out", "--restart"} <= flags(commands[path]), path
        assert "--resume" not in flags(commands[path]), path  # continuing is the default
    for path in REPORTING:
        assert "--json" in flags(commands[path]), path


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.005)" in text and "(default: digits)" in text
