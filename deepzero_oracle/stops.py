"""Safe stops: SIGINT (Ctrl-C) and SIGTERM (a batch scheduler's stop) end a run at a point it
can resume from, never in the middle of a step.

Inside ``stop_on_signals()`` the first signal only sets a flag (``Stopper.signum``); a loop
(``Trainer.fit`` between steps, ``certify_dataset`` between images) checks it, saves, and raises
``StopRequested``. A second signal aborts at once without saving (the last checkpoint on disk
stays as it was), except during a save (``shielded()``), where it is ignored until the save is
done. Outside any loop (``stop_on_signals(defer=False)``, what the command line wraps a whole
command in) a signal raises ``StopRequested`` at once: nothing is in flight there that could be
saved, and rerunning the command continues from the run folder.

``StopRequested`` is a ``KeyboardInterrupt``, so ``except Exception`` clauses let it through,
as they let Ctrl-C through. The command line maps it to exit code 130 (SIGINT) or 143
(SIGTERM), 128 + the signal number as shells report it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

from deepzero_oracle.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}

_active: "Stopper | None" = None  # the stopper whose handlers are installed (main thread only)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2, ... (the number itself for an unknown one)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequested(KeyboardInterrupt):
    """A run stopped on SIGINT or SIGTERM.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        exit_code: 130 for SIGINT, 143 for SIGTERM (128 + signum otherwise).
        where: where the run stopped, e.g. ``"after step 12 of 40"`` (None: outside any loop).
        run_dir: the run folder holding the saved state, or None.
        saved: True when the state at ``where`` is on disk (a resume continues from it); False
            when nothing was saved (a second signal, no run folder, or nothing in flight).
        checkpoint: what stays on disk when not ``saved`` (e.g. ``"the checkpoint of step 10"``).
        second: stopped by a second signal, without waiting for the step in flight.
    """

    def __init__(self, signum: int, *, where: str | None = None, run_dir=None, saved: bool = False,
                 checkpoint: str | None = None, second: bool = False):
        super().__init__(signum)
        self.signum, self.where, self.saved = int(signum), where, saved
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.checkpoint, self.second = checkpoint, second

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's 128 + signal number)."""
        return _EXIT_CODES.get(self.signum, 128 + self.signum)

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal_name(self.signum)

    def annotate(self, *, where: str | None = None, run_dir=None, checkpoint: str | None = None) -> "StopRequested":
        """Fill in what the raiser did not know (a loop annotates a stop raised inside its step)."""
        if self.where is None:
            self.where = where
        if self.run_dir is None and run_dir is not None:
            self.run_dir = Path(run_dir)
        if self.checkpoint is None:
            self.checkpoint = checkpoint
        return self

    def __str__(self) -> str:
        how = f"a second {self.signal_name}" if self.second else self.signal_name
        text = f"{'aborted' if self.second else 'stopped'} by {how}" + (f" {self.where}" if self.where else "")
        if self.saved:
            return text + (f"; saved in {self.run_dir}" if self.run_dir is not None else "")
        if self.checkpoint:
            kept = f"{self.checkpoint} in {self.run_dir}" if self.run_dir is not None else self.checkpoint
            return text + f"; not saved, {kept} is kept"
        return text + "; nothing was saved"


class Stopper:
    """The flag the handlers of ``stop_on_signals`` set; loops read ``signum`` between steps.

    Attributes:
        signum: the first signal received (None: no stop requested).
    """

    def __init__(self):
        self.signum: int | None = None
        self._defer = 0  # loops that check the flag themselves (else: raise at once)
        self._shield = 0  # saves in progress (a second signal waits for them)
        self._raised = False

    @property
    def requested(self) -> bool:
        """A signal has come: stop at the next point the state is consistent."""
        return self.signum is not None

    def stop(self, **info) -> StopRequested:
        """The ``StopRequested`` to raise for the pending signal (``info``: ``StopRequested``'s
        keywords: where, run_dir, saved, checkpoint)."""
        self._raised = True
        return StopRequested(self.signum, **info)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """While saving: a signal only sets the flag (a second one is ignored), so a save is
        never cut short. Outside any loop, a signal that came during the save stops right after it."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if not (self._shield or self._defer) and self.requested and not self._raised:
            raise self.stop()

    def _handle(self, signum, frame) -> None:
        if self._raised:  # already stopping: unwinding and cleanup are left to finish
            return
        if self._shield:
            if self.signum is None:
                self.signum = signum
            return
        if self.signum is None and self._defer:
            self.signum = signum  # the loop stops at its next check
            return
        second = self.signum is not None
        self.signum = self.signum or signum
        self._raised = True
        raise StopRequested(signum, second=second)


@contextlib.contextmanager
def stop_on_signals(*, defer: bool = True, signals=SIGNALS, enabled: bool = True) -> Iterator[Stopper]:
    """Handle ``signals`` (SIGINT, SIGTERM) as safe stops within the block; yields the ``Stopper``.

    With ``defer`` (a loop that checks ``stopper.requested`` between its steps) the first signal
    sets the flag and a second one raises ``StopRequested`` at once; without, the first one raises
    at once. Nested blocks share the outer stopper (its handlers stay). The previous handlers
    come back when the outermost block exits; a flag still pending then, with no exception on
    the way out, raises ``StopRequested`` so the request is not lost.

    Off the main thread (where Python cannot install handlers), or with ``enabled=False``, the
    stopper never fires and signals keep their usual effect.
    """
    global _active
    if not enabled:
        yield Stopper()
        return
    installed, stopper = None, _active
    if stopper is None:
        stopper = Stopper()
        if threading.current_thread() is threading.main_thread():
            installed = {s: signal.signal(s, stopper._handle) for s in signals}
            _active = stopper
    stopper._defer += int(defer)
    clean = False
    try:
        yield stopper
        clean = True
    finally:
        stopper._defer -= int(defer)
        if installed is not None:
            _active = None
            for s, handler in installed.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if clean and stopper.requested and not stopper._raised and stopper._defer == 0:
        raise stopper.stop()


def shielded():
    """``Stopper.shielded()`` of the active stopper (a no-op context without one): wrap saves in it."""
    return _active.shielded() if _active is not None else contextlib.nullcontext()


__all__ = ["SIGNALS", "StopRequested", "Stopper", "shielded", "signal_name", "stop_on_signals"]
