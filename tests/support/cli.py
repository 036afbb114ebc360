"""Walking the command line's parsers."""

from __future__ import annotations

import argparse


def leaves(parser: argparse.ArgumentParser, path=()):
    """``(command path, parser)`` of every leaf subcommand below ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, path + (name,))
