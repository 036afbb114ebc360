"""Errors the engine raises (each says what went wrong and what to do about it), and the
exit codes the command line maps them to.

``BlackBoxError`` is re-exported for the engine's users; it and every other error of the
black-box layer live in :mod:`deepzero_oracle.blackbox.errors`.
"""

from deepzero_oracle.blackbox.errors import BlackBoxError


class QueryBudgetExceeded(RuntimeError):
    """Answering a request would spend more queries than the oracle's budget allows."""


class NonFiniteLossError(FloatingPointError):
    """An oracle (or the black box behind it) produced NaN or Inf."""


class TrainingDiverged(RuntimeError):
    """Training met a non-finite loss, gradient or state; the last good checkpoint is kept.

    Attributes:
        step: the step (1-based) that failed.
        checkpoint_step: the step of the checkpoint left on disk (None: no checkpoint).
    """

    def __init__(self, message: str, *, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


class ExecutorUnavailable(ConnectionError):
    """The executor of ``--executor`` (a Dask scheduler) cannot be reached or has no workers."""


class NotShippable(TypeError, ValueError):
    """Something an executor's workers need (an oracle, a black box) does not pickle; raised
    before any work is sent (a TypeError, and a ValueError for the command line: bad input)."""


class SettingsMismatch(ValueError):
    """A run folder holds a run with other settings than the ones asked for."""


# Exit codes of the `deepzero-oracle` command line (documented in the README).
EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or bad input data
EXIT_DIVERGED = 3  # training diverged (non-finite loss, gradient or state)
EXIT_BUDGET = 4  # the query budget was exhausted before the work was done
EXIT_UNREACHABLE = 5  # the black box or the executor could not be reached (down, wrong address, deadline)
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C); the run folder holds where it stopped (deepzero_oracle.stops)
EXIT_TERMINATED = 143  # stopped by SIGTERM (a batch scheduler's stop); as for SIGINT

__all__ = ["BlackBoxError", "EXIT_BUDGET", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED",
           "EXIT_UNREACHABLE", "EXIT_USAGE", "ExecutorUnavailable", "NonFiniteLossError", "NotShippable", "QueryBudgetExceeded", "SettingsMismatch",
           "TrainingDiverged"]
