"""The conventions every ``deepzero-oracle`` command follows, in one place:

- ``--out``: where a command writes its results; run folders continue by default (``--restart``
  starts over);
- ``--json``: the report as JSON on stdout (text otherwise; nothing else goes to stdout);
- ``--quiet`` / ``--progress``: progress bars on stderr never / always (default: when stderr is a
  terminal, tqdm's convention);
- ``--max-queries N`` on every trainer: stop before spending more, keep the checkpoint, exit 4;
- ``--timeout SECONDS`` where a remote black box answers: a positive, finite, capped deadline;
- ``--executor`` where queries can fan out;
- ``-v`` / ``--log-level`` (top level): how much of the package's logging reaches stderr;
- every default shown in ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from deepzero_oracle.argtypes import bounded
from deepzero_oracle.logs import LEVELS, log_level, logging_level
from deepzero_oracle.parallel.executors import EXECUTOR_FORMS, TLS_ENV, parse_executor_spec

log = logging.getLogger(__name__)

#: The longest ``--timeout`` accepted (seconds): a deadline, not a way to wait forever.
MAX_TIMEOUT = 86_400.0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default when it is a value, 0 and False included (not None, not
    ``SUPPRESS``, not where the help already shows it) and keeps descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is argparse.SUPPRESS
                or not action.option_strings):
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
    """``--quiet`` (no progress bars) or ``--progress`` (always); neither: bars when stderr is a
    terminal. Read them with :func:`progress_of`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--progress", action="store_true",
                       help="progress bars on stderr even when it is not a terminal (without --quiet or "
                            "--progress: only on a terminal)")


def progress_of(args: argparse.Namespace) -> bool | None:
    """The ``progress`` argument of the library for ``--quiet`` / ``--progress``: False, True, or
    None (bars when stderr is a terminal)."""
    if getattr(args, "quiet", False):
        return False
    return True if getattr(args, "progress", False) else None


def progress_flags(args: argparse.Namespace) -> list[str]:
    """``--quiet`` / ``--progress`` as given, for a command that runs other commands."""
    return ["--quiet"] if getattr(args, "quiet", False) else ["--progress"] if getattr(args, "progress", False) else []


def _log_level(text: str) -> str:
    try:
        return log_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_logging(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` (INFO; twice: DEBUG) and ``--log-level LEVEL``: how much of the package's
    logging reaches stderr (default WARNING; ``serve`` INFO). Read them with :func:`logging_level`."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more to stderr: -v info, -vv debug")
    parser.add_argument("--log-level", type=_log_level, default=None, metavar="LEVEL",
                        help=f"log level of the package's messages on stderr, one of {', '.join(LEVELS)} "
                             "(overrides -v; default WARNING, INFO for serve)")


query_count = bounded(int, 1, None, "a positive whole number of queries")
"""argparse type for a query budget: a positive integer."""

def add_max_queries(parser: argparse.ArgumentParser, what: str = "oracle queries") -> None:
    """``--max-queries N``: stop training before it spends more than N ``what`` (exit 4)."""
    parser.add_argument("--max-queries", type=query_count, default=None, metavar="N",
                        help=f"stop before spending more than N {what}: the checkpoint is kept, the exit "
                             "code is 4, and the same command with a larger N continues the run "
                             "(default: no budget)")


def budget_message(command: str, reason: str, spent: int, out) -> str:
    """The one line a trainer prints when ``--max-queries`` stopped it."""
    return (f"deepzero-oracle {command}: stopped early: {reason} after {spent:,} queries; the checkpoint "
            f"in {out} is kept: run the same command with a larger --max-queries to continue")


timeout_seconds = bounded(float, 0, MAX_TIMEOUT, f"seconds, a number > 0 and <= {MAX_TIMEOUT:g}",
                          low_open=True)
"""argparse type for ``--timeout``: positive, finite seconds, at most ``MAX_TIMEOUT``."""

def add_timeout(parser: argparse.ArgumentParser, default: float, what: str = "black-box call") -> None:
    """``--timeout SECONDS``: the deadline of each remote ``what`` (grpc://, kserve:// specs)."""
    parser.add_argument("--timeout", type=timeout_seconds, default=default, metavar="SECONDS",
                        help=f"seconds each remote {what} may take (grpc://, kserve:// specs), "
                             f"at most {MAX_TIMEOUT:g}")


class _DeprecatedAlias(argparse.Action):
    """A hidden old name of a flag: stores into the new flag's dest and logs a warning."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("%s is deprecated: use %s", option_string, self.new)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str) -> None:
    """Accept ``old`` as a hidden alias of the flag ``new`` (same ``dest``), with a warning."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


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


steps_count = bounded(int, 1, None, "a positive whole number of steps")
"""argparse type for a number of steps: a positive integer."""

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


__all__ = ["MAX_TIMEOUT", "HelpFormatter", "add_command", "add_deprecated_alias", "add_executor", "add_json",
           "add_logging", "add_max_queries", "add_quiet", "add_run_folder", "add_timeout", "budget_message",
           "executor_spec", "given_flags", "int_list", "logging_level", "progress_flags", "progress_of",
           "query_count", "run_subcommand", "steps_count", "timeout_seconds"]
