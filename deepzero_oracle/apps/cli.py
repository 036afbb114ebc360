"""The ``deepzero-oracle`` command line: one parser, subcommands registered by whoever owns them.

Each subcommand is a ``register(subparsers)`` function named by an entry point of the
``deepzero_oracle.commands`` group (pyproject.toml), so the engine never imports the apps or
adapters that add commands, and a user's package can add its own. The conventions every
command follows are in ``deepzero_oracle.common.options``; the exit codes (``deepzero_oracle.errors``)
are mapped here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import entry_points

from deepzero_oracle import __version__, retain_freed_memory
from deepzero_oracle.argtypes import one_line_error
from deepzero_oracle.blackbox.errors import BlackBoxTimeout, BlackBoxUnavailable
from deepzero_oracle.common.options import HelpFormatter, add_logging, logging_level
from deepzero_oracle.logs import configure_logging
from deepzero_oracle.errors import (EXIT_BUDGET, EXIT_DIVERGED, EXIT_UNREACHABLE, EXIT_USAGE, ExecutorUnavailable,
                                    NonFiniteLossError, QueryBudgetExceeded, TrainingDiverged)
from deepzero_oracle.extras import MissingExtra
from deepzero_oracle.stops import StopRequested, stop_on_signals

COMMANDS_GROUP = "deepzero_oracle.commands"
# the order commands are listed in --help; commands of other packages follow, by name
_ORDER = ("train", "serve", "sol", "defense", "bench")


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults (``HelpFormatter``) unless told otherwise,
    and whose usage errors are one line naming the flag (exit 2), not a usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        one_line_error(self, message)


def registered_commands() -> list:
    """The ``deepzero_oracle.commands`` entry points, in help order."""
    found = {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}
    order = [n for n in _ORDER if n in found] + sorted(n for n in found if n not in _ORDER)
    return [found[n] for n in order]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = CommandParser(
        prog="deepzero-oracle", formatter_class=HelpFormatter,
        description="Train neural networks in a loop with black boxes you can only query.",
        epilog="exit codes: 0 done, 2 usage or bad input, 3 training diverged, 4 query budget "
               "exhausted, 5 black box or executor unreachable, 130 stopped by SIGINT (Ctrl-C) and 143 by "
               "SIGTERM: the run folder holds where it stopped, and the same command resumes it")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_logging(parser)
    # every command's parser (and its own subcommands') shows defaults, whoever registers it
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    commands = registered_commands()
    if not commands:
        parser.error("no subcommands are registered: reinstall the package (pip install -e .)")
    for ep in commands:
        ep.load()(sub)
    return parser


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code for an error, or None for an unexpected one."""
    if isinstance(exc, ExecutorUnavailable):
        return EXIT_UNREACHABLE
    if isinstance(exc, MissingExtra):
        return EXIT_USAGE  # a feature whose extra is not installed: the message names it
    cause = exc
    while cause is not None:  # a chunk failure wraps the black box's own error
        if isinstance(cause, (BlackBoxUnavailable, BlackBoxTimeout)):
            return EXIT_UNREACHABLE
        cause = cause.__cause__
    if isinstance(exc, (TrainingDiverged, NonFiniteLossError)):
        return EXIT_DIVERGED
    if isinstance(exc, QueryBudgetExceeded):
        return EXIT_BUDGET
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return EXIT_USAGE
    return None


def resume_command(argv) -> str:
    """The shell command that continues a stopped run: the same one, without ``--restart``."""
    return shlex.join(["deepzero-oracle", *(a for a in argv if a != "--restart")])


def stop_message(command: str, stop: StopRequested, argv) -> str:
    """The one stderr line of a run stopped by a signal: where, what was saved, how to resume
    (or, stopped outside a training or certification loop, how to run it again)."""
    again = "resume with" if stop.saved or stop.checkpoint else "rerun with"
    return f"deepzero-oracle {command}: {stop}; {again}: {resume_command(argv)}"


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit code.

    SIGINT and SIGTERM stop a command safely (``deepzero_oracle.stops``): exit code 130 or 143
    and one line on stderr saying where it stopped and the command that resumes it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "deepzero-oracle"
    try:
        # outside training and certification loops a signal stops at once: nothing is in flight
        with stop_on_signals(defer=False):
            args = build_parser().parse_args(argv)
            # "sol train", "defense certify": a command's own subcommand, if it has one
            command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
            # the package's diagnostics go to stderr through logging, configured once here
            configure_logging(logging_level(args), default=getattr(args, "log_default", "WARNING"))
            retain_freed_memory()  # queries reuse freed tensor pages (DEEPZERO_ORACLE_MALLOC=default: off)
            try:
                return args.func(args)
            except Exception as exc:  # noqa: BLE001 - mapped to documented exit codes, else re-raised
                code = exit_code(exc)
                if code is None:
                    raise
                print(f"deepzero-oracle {args.command}: error: {exc}", file=sys.stderr)
                return code
    except StopRequested as stop:
        print(stop_message(command, stop, argv), file=sys.stderr, flush=True)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
