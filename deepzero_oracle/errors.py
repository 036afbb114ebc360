"""Errors the engine raises: each says what went wrong and what to do about it."""

from deepzero_oracle.blackbox.local import BlackBoxError


class QueryBudgetExceeded(RuntimeError):
    """Answering a request would spend more queries than the oracle's budget allows."""


class NonFiniteLossError(FloatingPointError):
    """An oracle (or the black box behind it) produced NaN or Inf."""


__all__ = ["BlackBoxError", "NonFiniteLossError", "QueryBudgetExceeded"]
