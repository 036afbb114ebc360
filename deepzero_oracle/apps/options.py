"""The conventions every ``deepzero-oracle`` command follows, in one place: ``--out`` run
folders that continue by default (``--restart`` starts over), ``--json`` on commands that report,
``--quiet`` for no progress bars, ``--executor`` where queries can fan out, and defaults shown
in ``--help``."""

from __future__ import annotations

import argparse
import contextlib
import sys

from deepzero_oracle.parallel.executors import EXECUTOR_FORMS, TLS_ENV, parse_executor_spec


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


def given_flags(args: argparse.Namespace, add_flags) -> list[str]:
    """The flags ``add_flags(parser)`` defines whose value in ``args`` is not None, as argv to
    pass on to another command that defines them too (``sol compare`` -> ``sol train``)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_flags(probe)
    argv = []
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


def int_list(text: str, flag: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` for ``flag`` (e.g. ``--seeds``); ValueError naming the flag for
    anything but distinct integers."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{flag} needs distinct integers, e.g. 0,1,2; got {text!r}")
    return values


def run_subcommand(register, argv: list[str]) -> None:
    """Run ``deepzero-oracle ARGV`` for the commands ``register(subparsers)`` adds, parsed as on
    the command line, with its stdout sent to stderr (the caller's stdout is its own report);
    RuntimeError if it does not exit with 0."""
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):
        code = args.func(args)
    if code != 0:
        raise RuntimeError(f"`deepzero-oracle {' '.join(argv)}` did not finish (exit code {code})")


def steps_count(text: str) -> int:
    """argparse type for a number of steps: a positive integer, or an error saying so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of steps, got {text!r}")
    return value


def executor_spec(text: str) -> str:
    """``--executor``'s argparse type: the spec as given, or an error listing the accepted forms."""
    try:
        parse_executor_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_executor(parser: argparse.ArgumentParser, what: str = "the oracle's queries") -> None:
    """``--executor SPEC``: where ``what`` run (``open_executor`` opens it; default inline)."""
    parser.add_argument(
        "--executor", type=executor_spec, default="inline", metavar="SPEC",
        help=f"where {what} run: {', '.join(EXECUTOR_FORMS)}. dask-local:N starts N one-thread worker "
             "processes on this machine; dask:// and tls:// join a running `dask scheduler` (tls:// reads "
             f"the client's PEM files from {', '.join(TLS_ENV.values())}). Results are bit-identical on "
             "every executor")


__all__ = ["HelpFormatter", "add_command", "add_executor", "add_json", "add_quiet", "add_run_folder",
           "executor_spec", "given_flags", "int_list", "run_subcommand", "steps_count"]
