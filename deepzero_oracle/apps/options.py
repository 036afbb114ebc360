"""The conventions every ``deepzero-oracle`` command follows, in one place: ``--out`` run
folders that continue by default (``--restart`` starts over), ``--json`` on commands that report,
``--quiet`` for no progress bars, and defaults shown in ``--help``."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless it is None/False or the help already says it) and
    keeps descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_command(subparsers, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help format (defaults shown)."""
    return subparsers.add_parser(name, help=help, description=description or help,
                                 formatter_class=HelpFormatter)


def add_run_folder(parser: argparse.ArgumentParser, what: str = "run", *, required: bool = True,
                   default: str | None = None) -> None:
    """``--out DIR`` (continue the run found there) and ``--restart`` (start it over)."""
    parser.add_argument("--out", required=required, default=default,
                        help=f"{what} folder; an existing {what} there is continued with the same "
                             "settings (other settings are refused)")
    parser.add_argument("--restart", action="store_true",
                        help=f"start the {what} over, ignoring what --out holds")


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: print the report as JSON on stdout instead of text."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


__all__ = ["HelpFormatter", "add_command", "add_json", "add_quiet", "add_run_folder"]
