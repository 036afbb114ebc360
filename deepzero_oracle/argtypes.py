"""argparse helpers: numbers with bounds, and errors as one line saying what was wrong.

    parser.add_argument("--port", type=bounded(int, 0, 65535, "a TCP port 0..65535"))

A value of the wrong kind, not finite, or outside the bounds is refused with
``argparse.ArgumentTypeError("expected <what>, got '<text>'")``, which argparse prints after
the flag's name. Every command-line number that becomes a count, a size or a timeout goes
through here, so none reaches a thread pool, a buffer or a lock unchecked.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def bounded(kind: type, low: float | None = None, high: float | None = None, what: str = "",
            *, low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type reading ``kind`` (int or float) from the text and checking
    ``low <= value <= high`` (``low < value`` with ``low_open``; None: no bound).

    Args:
        kind: ``int`` or ``float``.
        low / high: the bounds (None: unbounded on that side).
        what: how the error names the expected value, e.g. ``"a whole number >= 1"``.
        low_open: exclude ``low`` itself (e.g. seconds > 0).
    Returns:
        ``text -> value`` for ``add_argument(type=...)``.
    """
    if not what:
        what = f"{'a whole number' if kind is int else 'a number'}"
        if low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        if high is not None:
            what += f"{' and' if low is not None else ''} <= {high:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        inside = math.isfinite(value)
        if inside and low is not None:
            inside = value > low if low_open else value >= low
        if inside and high is not None:
            inside = value <= high
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def one_line_error(parser: argparse.ArgumentParser, message: str):
    """Exit 2 with one line, ``PROG: error: MESSAGE; see PROG --help`` (no usage block): what to
    fix, not a wall of flags. Install as ``parser.error`` or call from an ``error`` override."""
    parser.exit(2, f"{parser.prog}: error: {message}; see {parser.prog} --help\n")


__all__ = ["bounded", "one_line_error"]
