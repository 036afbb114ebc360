"""The ``deepzero-oracle`` command line: one parser, subcommands registered by whoever owns them.

Each subcommand is a ``register(subparsers)`` function named by an entry point of the
``deepzero_oracle.commands`` group (pyproject.toml), so the engine never imports the apps or
adapters that add commands, and a user's package can add its own. The conventions every
command follows are in ``deepzero_oracle.apps.options``; the exit codes (``deepzero_oracle.errors``)
are mapped here.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from deepzero_oracle import __version__, retain_freed_memory
from deepzero_oracle.blackbox.errors import BlackBoxTimeout, BlackBoxUnavailable
from deepzero_oracle.apps.options import HelpFormatter
from deepzero_oracle.errors import (EXIT_BUDGET, EXIT_DIVERGED, EXIT_UNREACHABLE, EXIT_USAGE, ExecutorUnavailable,
                                    NonFiniteLossError, QueryBudgetExceeded, TrainingDiverged)
from deepzero_oracle.parallel.executors import DASK_MISSING

COMMANDS_GROUP = "deepzero_oracle.commands"
# the order commands are listed in --help; commands of other packages follow, by name
_ORDER = ("train", "serve", "sol", "defense", "bench")


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults (``HelpFormatter``) unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def registered_commands() -> list:
    """The ``deepzero_oracle.commands`` entry points, in help order."""
    found = {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}
    order = [n for n in _ORDER if n in found] + sorted(n for n in found if n not in _ORDER)
    return [found[n] for n in order]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="deepzero-oracle", formatter_class=HelpFormatter,
        description="Train neural networks in a loop with black boxes you can only query.",
        epilog="exit codes: 0 done, 2 usage or bad input, 3 training diverged, 4 query budget "
               "exhausted, 5 black box or executor unreachable")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    if isinstance(exc, ImportError) and str(exc) == DASK_MISSING:
        return EXIT_USAGE  # an --executor that needs the [dask] extra
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


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # queries reuse freed tensor pages (DEEPZERO_ORACLE_MALLOC=default: off)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - mapped to documented exit codes, else re-raised
        code = exit_code(exc)
        if code is None:
            raise
        print(f"deepzero-oracle {args.command}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
