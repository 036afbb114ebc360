"""Black boxes the gRPC tests serve from a child process (`python -m deepzero_oracle.server
grpcbb_functions:MODELS`, started in tests/). Keep them deterministic and cheap."""

import os
import time
from pathlib import Path

import torch


def affine(x):
    """``x [N, ...] -> 2 x + 1``."""
    return x * 2.0 + 1.0


def pair(x, y):
    """Two inputs, two outputs: ``(x + y, x * y)``."""
    return x + y, x * y


def diff(x, y):
    """Not symmetric: shows whether inputs are matched by name."""
    return x - y


def slow(x):
    """Sleeps $GRPCBB_SLOW_SECONDS (default 3); touches $GRPCBB_MARKER first if set."""
    marker = os.environ.get("GRPCBB_MARKER")
    if marker:
        Path(marker).touch()
    time.sleep(float(os.environ.get("GRPCBB_SLOW_SECONDS", "3")))
    return x


def fails(x):
    """A simulator bug: the server must answer INTERNAL and stay up."""
    raise RuntimeError("simulator crashed")


def rejects(x):
    """A black box that validates its input itself (ValueError -> INVALID_ARGUMENT)."""
    if (x < 0).any():
        raise ValueError("x must be non-negative")
    return x.sqrt()


def short(x):
    """Answers one row too few: clients must refuse the answer."""
    return x[:-1]


def row_sum(x):
    """``x [N, D] -> [N, 1]`` (a loss-like head)."""
    return x.sum(dim=1, keepdim=True)


def digits_head(logits):
    """Black-box output head for the training test: a fixed, non-differentiable-looking
    transform of the learner's logits ``[N, 10] -> [N, 10]`` (scaled, shifted softmax)."""
    return torch.softmax(logits * 1.5, dim=1) + 0.25


MODELS = {
    "affine": affine,
    "pair": pair,
    "diff": diff,
    "slow": slow,
    "fails": fails,
    "rejects": rejects,
    "short": short,
    "row_sum": row_sum,
    "digits_head": digits_head,
}
