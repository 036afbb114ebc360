"""Where the package's diagnostics go: the ``deepzero_oracle`` logger hierarchy.

Every module logs through ``logging.getLogger(__name__)`` (``deepzero_oracle.train``,
``deepzero_oracle.server.servicer``, ``deepzero_oracle.adapters.defense.cli`` ...) and never
prints: a program that imports the package decides what is shown, with the standard
``logging`` configuration. The command line calls :func:`configure_logging` once, from
``-v/--verbose`` and ``--log-level``; its reports (tables, JSON, the server's "serving" line)
are its own output on stdout, not log records.
"""

from __future__ import annotations

import logging
import sys

#: The root of the package's loggers.
LOGGER = "deepzero_oracle"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (told apart from a user's own); it writes
    to whatever ``sys.stderr`` is at each record, so a redirected stderr is honoured."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler assigns it; the current sys.stderr is always used
        pass


def _level(value: str | int) -> str | int:
    return log_level(value) if isinstance(value, str) else int(value)


def log_level(text: str) -> str:
    """``--log-level``'s value, upper-cased; ValueError listing the levels otherwise."""
    level = str(text).strip().upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {text!r}; choose one of {', '.join(LEVELS)}")
    return level


def logging_level(args) -> str | None:
    """The level an argparse namespace's ``-v`` (``verbose``: 1 INFO, 2+ DEBUG) and
    ``--log-level`` (``log_level``, which wins) ask for; None when neither was given."""
    if getattr(args, "log_level", None):
        return log_level(args.log_level)
    verbose = getattr(args, "verbose", 0) or 0
    return None if verbose == 0 else "INFO" if verbose == 1 else "DEBUG"


def configure_logging(level: str | int | None = None, *, default: str = "WARNING") -> logging.Logger:
    """Send the ``deepzero_oracle`` loggers' records to stderr, once per process.

    Args:
        level: the level to set (a name or a number); None keeps the one set by an earlier call,
            else uses ``default``.
        default: the level when none was given nor set before (``serve`` logs INFO by default).
    Returns:
        the ``deepzero_oracle`` logger. Later calls change the level (if given) without adding
        a second handler. Records still propagate to the root logger (which the command line
        leaves without handlers), so a host program's or pytest's capture sees them too.
    """
    logger = logging.getLogger(LOGGER)
    ours = [h for h in logger.handlers if isinstance(h, _Handler)]
    if not ours:
        handler = _Handler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(_level(default if level is None else level))
    elif level is not None:
        logger.setLevel(_level(level))
    return logger


__all__ = ["LEVELS", "LOGGER", "LOG_FORMAT", "configure_logging", "log_level", "logging_level"]
