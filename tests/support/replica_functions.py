"""Black boxes the replica tests serve from child processes (`python -m deepzero_oracle.server
replica_functions:slow_head`). Deterministic, so every replica gives the same answers."""

import os
import time

import numpy as np


def slow_head(outputs):
    """~50 ms per call (so a kill or a stop lands mid-step), then a fixed smooth map ``[N, D] -> [N, D]``."""
    time.sleep(0.05)
    return np.tanh(1.5 * outputs) + 0.25 * outputs


def worker_pid(x):
    """``x [N, D] -> [N, 1]``: the serving process's id (which worker of ``serve --workers N`` answered)."""
    return np.full((x.shape[0], 1), float(os.getpid()))
