"""Callbacks of ``Trainer.fit``: the hook protocol, the CSV and TensorBoard loggers, and
``StopTraining`` (a callback's way to end training cleanly after a step)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from deepzero_oracle.extras import require
from deepzero_oracle.runs import atomic_write

if TYPE_CHECKING:
    from deepzero_oracle.train import Trainer

STEP_FIELDS = ("step", "epoch", "queries", "lr", "loss", "grad_norm", "seconds")


class Callback:
    """Hooks called by ``Trainer.fit``; override what you need. A callback with
    ``state_dict`` / ``load_state_dict`` is checkpointed with the trainer."""

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each optimizer step; ``metrics`` has the fields of ``STEP_FIELDS``."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each evaluation (once before training, then after each epoch or every
        ``eval_every`` steps): epoch, step, queries, seconds, lr and the evaluation's results."""


class CSVLogger(Callback):
    """Appends metrics rows to a CSV file: evaluation rows (``on="eval"``) or step rows
    (``on="step"``). A resumed run first drops rows written after its checkpoint, so every
    step appears once.

    Appending a row costs the same however long the file is: the header is kept in memory
    and only read from the file once. A row with a column the header lacks rewrites the file
    once with the union of the columns (rows without a column leave it empty)."""

    def __init__(self, path, on: str = "eval"):
        if on not in ("eval", "step"):
            raise ValueError(f"on must be 'eval' or 'step', got {on!r}")
        self.path, self.on = Path(path), on
        self._fields: list[str] | None = None  # the file's header; None until read or written
        self._tail_ok = False  # the file ends with a whole line (known after our own write)

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        if self.on == "step":
            self._append({k: metrics.get(k) for k in STEP_FIELDS})

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        if self.on == "eval":
            self._append(metrics)

    @property
    def fields(self) -> list[str]:
        """The columns of the file (empty if it has none yet)."""
        if self._fields is None:
            self._fields = self._read_header()
        return list(self._fields)

    def rows(self) -> list[dict]:
        """Every complete row of the file, as dicts of strings."""
        return self._read()[0]

    def rewind(self, step: int) -> None:
        """Keep only rows of steps ``<= step`` (what a checkpoint at ``step`` had seen); a
        negative ``step`` empties the log. Reads the whole file: once per resume, not per row."""
        rows, fields, partial = self._read()
        kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= step]
        if not kept and step < 0:
            self.path.unlink(missing_ok=True)
            self._fields, self._tail_ok = [], False
        elif len(kept) != len(rows) or partial:
            self._rewrite(kept, fields)
        else:
            self._fields, self._tail_ok = fields, True

    def _read_header(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return next(csv.reader(f), [])

    def _read(self) -> tuple[list[dict], list[str], bool]:
        """(rows, header, whether a partial last line, cut by a crash mid-write, was left out)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], [], False
        with self.path.open(newline="") as f:
            text = f.read()
        partial = not text.endswith("\n")
        if partial:  # a crash mid-append: the last line is incomplete
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(text.splitlines(keepends=True))
        return list(reader), list(reader.fieldnames or []), partial

    def _rewrite(self, rows, fields) -> None:
        def write(tmp):
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path, write)
        self._fields, self._tail_ok = list(fields), True

    def _append(self, row: dict) -> None:
        row = {k: ("" if v is None else v) for k, v in row.items()}
        fields = self.fields
        if not fields or any(k not in fields for k in row) or not (self._tail_ok or self._ends_with_newline()):
            # a new file, a new column or a cut last line: the rare full rewrite
            rows, fields, _ = self._read()
            self._rewrite(rows + [row], fields + [k for k in row if k not in fields])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
        self._tail_ok = True

    def _ends_with_newline(self) -> bool:
        try:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                return f.read(1) == b"\n"
        except (FileNotFoundError, OSError):  # deleted, or empty (seek before the start)
            return False


def _row_step(row: dict) -> int | None:
    try:
        return int(float(row.get("step")))
    except (TypeError, ValueError):
        return None


class TensorBoardLogger(Callback):
    """Writes step and evaluation metrics to TensorBoard under ``log_dir`` (x axis: queries).

    Raises:
        MissingExtra: tensorboard is not installed (an ``ImportError`` whose message is the
            install command, ``pip install 'deepzero-oracle[tensorboard]'``).
    """

    def __init__(self, log_dir):
        board = require("tensorboard", "torch.utils.tensorboard", "tensorboard", feature="TensorBoardLogger")
        self.writer = board.SummaryWriter(str(log_dir))

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        for k in ("lr", "grad_norm", "loss"):
            if metrics.get(k) is not None:
                self.writer.add_scalar(f"step/{k}", metrics[k], metrics["queries"])

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "queries"):
                self.writer.add_scalar(f"eval/{k}", v, metrics["queries"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class StopTraining(Exception):
    """Raised by a callback's ``on_step_end`` to end ``Trainer.fit`` after that step, cleanly:
    the message becomes ``trainer.stopped_reason`` and the checkpoint is written, as when the
    query budget stops training."""


__all__ = ["CSVLogger", "Callback", "STEP_FIELDS", "StopTraining", "TensorBoardLogger"]
