"""Black boxes tests/serving/test_serve_ops.py serves from a child process (NumPy functions)."""

import os
import time
from pathlib import Path


def gated(x):
    """``x [N, ...] -> x + 1``, once the file $SERVE_OPS_GATE exists; touches $SERVE_OPS_MARKER
    first, so a test knows the call is running and decides when it ends (waits at most 60 s)."""
    Path(os.environ["SERVE_OPS_MARKER"]).touch()
    gate = Path(os.environ["SERVE_OPS_GATE"])
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x + 1.0
