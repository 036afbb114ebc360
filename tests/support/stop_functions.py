"""A classifier for ``--classifier stop_functions:classify`` that signals its own process at a
chosen call, so a test stops ``defense train`` / ``defense certify`` at an exact point, in
process, as Ctrl-C or a scheduler's SIGTERM would."""

from __future__ import annotations

import os

FN = None  # numpy_classifier_fn of a saved classifier, set by the test
CALLS = 0  # calls since the last arm()
SIGNAL_AT: int | None = None  # the call (1-based) before which the signal is sent
SIGNUM = None


def arm(fn, at: int | None = None, signum=None) -> None:
    """Answer with ``fn``; send ``signum`` to this process before the ``at``-th call (None: never)."""
    global FN, CALLS, SIGNAL_AT, SIGNUM
    FN, CALLS, SIGNAL_AT, SIGNUM = fn, 0, at, signum


def classify(x):
    """``x [N, C, H, W]`` (NumPy) -> logits ``[N, classes]``, by ``FN``."""
    global CALLS
    CALLS += 1
    if SIGNAL_AT is not None and CALLS == SIGNAL_AT:
        os.kill(os.getpid(), SIGNUM)  # its handler runs before the call below: mid-query, like Ctrl-C
    return FN(x)
