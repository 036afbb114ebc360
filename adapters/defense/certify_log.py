"""Certify a data set with :class:`~.smoothing.Smooth`, keep the per-example log, and report it.

The log is Cohen et al.'s format: tab-separated, one row per certified example, header
``idx  label  predict  radius  correct  time`` (``predict`` is ``-1`` when abstaining, ``correct``
is 0/1, ``time`` is wall seconds spent certifying that example). Everything downstream (the
certified-accuracy table, the curve) is computed from the log, so a table can always be traced
back to, and recomputed from, the rows that produced it.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import numbers
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from deepzero_oracle.adapters.defense.smoothing import (
    ABSTAIN,
    Smooth,
    check_alpha,
    check_certify_n,
    check_count,
)
from deepzero_oracle.atomic import write_text
from deepzero_oracle.blackbox.local import as_tensor
from deepzero_oracle.extras import require
from deepzero_oracle.parallel.executors import InlineExecutor, dask_client, executor_slots
from deepzero_oracle.parallel.payloads import compact, to_bytes
from deepzero_oracle.stops import StopRequested, stop_on_signals
from deepzero_oracle.train import progress_disabled

__all__ = [
    "LOG_COLUMNS",
    "DEFAULT_RADII",
    "CertifyRun",
    "certify_dataset",
    "certify_example",
    "example_seed",
    "read_log",
    "settings_path",
    "certified_accuracy",
    "certified_accuracy_markdown",
    "plot_certified_curve",
]

LOG_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
#: The radii the project's tables report (ZO-AE-DS / DeepZero report r = 0, 0.25, 0.5, 0.75).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75)


@dataclass
class CertifyRun:
    """What :func:`certify_dataset` returns.

    Attributes:
        rows: one dict per example with the log columns (typed: ints, float radius/time).
        log_path: where the log was written, or ``None``.
        queries: noisy samples sent to the black box during this run.
        seconds: wall seconds spent inside CERTIFY, summed over examples.
        samples_per_second: ``queries / seconds``, the certification throughput.
    """

    rows: list[dict]
    log_path: Path | None
    queries: int
    seconds: float
    samples_per_second: float
    n0: int = 0
    n: int = 0
    alpha: float = 0.0
    sigma: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def examples(self) -> int:
        """Number of certified examples (rows)."""
        return len(self.rows)

    @property
    def abstain_rate(self) -> float:
        """Fraction of examples where CERTIFY abstained."""
        return float(np.mean([r["predict"] == ABSTAIN for r in self.rows])) if self.rows else float("nan")

    def certified_accuracy(self, radii: Iterable[float] | float = DEFAULT_RADII) -> dict[float, float]:
        """Certified accuracy at each radius, see :func:`certified_accuracy`."""
        return certified_accuracy(self.rows, radii)

    def summary(self, radii: Iterable[float] | float = DEFAULT_RADII) -> dict:
        """A JSON-friendly summary: counts, throughput, and certified accuracy keyed by ``str(r)``."""
        return {
            "examples": self.examples,
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "sigma": self.sigma,
            "queries": self.queries,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
            "abstain_rate": self.abstain_rate,
            "certified_accuracy": {str(r): a for r, a in self.certified_accuracy(radii).items()},
            "log_path": str(self.log_path) if self.log_path else None,
        }


def example_seed(seed: int, idx: int) -> int:
    """The noise seed for example ``idx`` of a run seeded with ``seed``.

    Per-example seeds (rather than one stream for the run) make a row reproducible on its own:
    re-certifying a subset, resuming, or splitting the data over workers gives the same rows.
    """
    return int(np.random.SeedSequence([int(seed), int(idx)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def certify_example(smooth: Smooth | bytes, x, n0: int, n: int, alpha: float, batch_size: int,
                    seed: int) -> tuple[int, float, float]:
    """CERTIFY one example ``x`` (e.g. ``[C, H, W]``) with its own generator seeded by ``seed``:
    ``(prediction, radius, seconds)``. ``smooth`` may come pickled (what executors' workers get);
    the answer depends on ``seed``, not on where it runs."""
    if isinstance(smooth, bytes):
        smooth = pickle.loads(smooth)  # our own payload, pickled by the parent process
    started = time.perf_counter()
    prediction, radius = smooth.certify(x, n0, n, alpha, batch_size, torch.Generator().manual_seed(seed))
    return int(prediction), float(radius), time.perf_counter() - started


def _certified(smooth: Smooth, xs, todo: Sequence[int], seeds: Sequence[int], n0, n, alpha, batch_size, executor):
    """``(i, (prediction, radius, seconds))`` for each example ``i`` of ``todo``, in order: here, one
    after the other, or on ``executor`` a few per worker slot at a time (the parent then counts the
    ``n0 + n`` queries and the calls each CERTIFY spends)."""
    if executor is None or isinstance(executor, InlineExecutor):
        for i in todo:
            yield i, certify_example(smooth, xs[i], n0, n, alpha, batch_size, seeds[i])
        return
    payload = to_bytes(smooth, executor)  # before any work: a classifier that cannot travel fails here
    client = dask_client(executor)
    extra = {"pure": False} if client is not None else {}
    if client is not None:  # one replica per worker instead of a copy per task
        payload = client.scatter(payload, broadcast=True, hash=False)
    window, pending, todo = 2 * executor_slots(executor), collections.deque(), iter(todo)
    calls = math.ceil(n0 / batch_size) + math.ceil(n / batch_size)
    try:
        while True:
            while len(pending) < window and (i := next(todo, None)) is not None:
                # compact: a row of xs would otherwise pickle all of xs
                pending.append((i, executor.submit(certify_example, payload, compact(xs[i]), n0, n, alpha,
                                                   batch_size, seeds[i], **extra)))
            if not pending:
                return
            i, future = pending.popleft()
            answer = future.result()
            smooth.queries += n0 + n
            smooth.calls += calls
            yield i, answer
    finally:
        for _, future in pending:
            future.cancel()


def _format_row(row: Mapping) -> str:
    # repr(float) is the shortest string that reads back to the same float, so tables computed
    # from the file equal tables computed from the in-memory rows, even at r == radius.
    return "\t".join(
        [
            str(int(row["idx"])),
            str(int(row["label"])),
            str(int(row["predict"])),
            repr(float(row["radius"])),
            str(int(row["correct"])),
            f"{float(row['time']):.4f}",
        ]
    )


def certify_dataset(
    smooth: Smooth,
    xs,
    labels,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int = 1000,
    *,
    seed: int = 0,
    log_path: str | os.PathLike | None = None,
    indices: Sequence[int] | None = None,
    progress: bool | None = None,
    desc: str = "certify",
    resume: bool = False,
    settings: Mapping | None = None,
    executor=None,
) -> CertifyRun:
    """Run CERTIFY on every example and write the per-example log as it goes.

    Args:
        smooth: the smoothed classifier (its query counter keeps counting across runs).
        xs: inputs ``[M, *x.shape]`` (e.g. ``[M, C, H, W]``), tensor or ndarray.
        labels: true labels ``[M]``.
        n0, n, alpha, batch_size: as in :meth:`Smooth.certify`; ``n`` is validated against
            ``alpha`` before anything is queried or written.
        seed: base seed; example ``idx`` uses :func:`example_seed` ``(seed, idx)``.
        log_path: where to write the tab-separated log (parent folders are created; the file is
            overwritten and flushed after every row, so an interrupted run keeps its rows).
        indices: the dataset indices of ``xs`` rows, written to the ``idx`` column
            (default ``0..M-1``); use it when certifying a subset of a larger set.
        progress: a tqdm progress bar: None shows it when stderr is a terminal, True always,
            False never.
        desc: progress bar label.
        resume: keep the rows an interrupted run already wrote to ``log_path`` and certify only the
            rest. The log's settings file (:func:`settings_path`, written by every run with a log)
            must match this run's, and its rows must be the first examples of ``indices``; per-example
            seeds make the result equal to an uninterrupted run's.
        settings: extra JSON-friendly values that must also match on resume (e.g. which model).
        executor: where the examples are certified (``open_executor``; None: here, one after the
            other). Each example's noise comes from its own seed, so the rows are the same on every
            executor; ``time`` is then the seconds a worker spent on the example.

    SIGINT (Ctrl-C) and SIGTERM (from the main thread) stop between examples: the example in
    flight is finished and its row written and flushed, examples started ahead on an executor are
    dropped, and ``deepzero_oracle.stops.StopRequested`` is raised; ``resume=True`` continues
    the log. A second signal drops the example in flight too (its row is not written).
    Returns:
        :class:`CertifyRun` with the rows, query count and throughput (noisy samples/s). Resumed
        rows count ``n0 + n`` queries each (what CERTIFY spends) and their logged times.
    """
    n0 = check_count("n0", n0)
    n = check_count("n", n)
    alpha = check_alpha(alpha)
    batch_size = check_count("batch_size", batch_size)
    check_certify_n(n, alpha)  # fail before a long run, not at its first example
    xs = as_tensor(xs)
    ys = as_tensor(labels).reshape(-1)
    if xs.ndim < 1 or xs.shape[0] != ys.shape[0]:
        raise ValueError(f"xs has {xs.shape[0] if xs.ndim else 0} rows but labels has {ys.shape[0]}; they must match")
    idxs = list(range(xs.shape[0])) if indices is None else [int(i) for i in indices]
    if len(idxs) != xs.shape[0]:
        raise ValueError(f"indices has {len(idxs)} entries for {xs.shape[0]} examples")

    path = Path(log_path) if log_path is not None else None
    run_settings = {"n0": n0, "n": n, "alpha": alpha, "sigma": float(smooth.sigma), "batch_size": batch_size,
                    "seed": int(seed), **dict(settings or {})}
    if resume and path is None:
        raise ValueError("resume=True needs the log_path of the run to continue")
    rows: list[dict] = _resumable_rows(path, run_settings, idxs) if resume and path.exists() else []
    fh = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(settings_path(path), json.dumps(run_settings, indent=2) + "\n")
        # rewritten whole (drops a half-written last line), atomically: a kill here keeps the rows
        write_text(path, "".join(line + "\n" for line in ["\t".join(LOG_COLUMNS), *map(_format_row, rows)]))
        fh = open(path, "a", encoding="utf-8")

    queries_before = smooth.queries - len(rows) * (n0 + n)
    total_seconds = float(sum(row["time"] for row in rows))
    certified = sum(int(row["correct"]) for row in rows)
    total = xs.shape[0]
    where = f" in {path}" if path is not None else ""
    with stop_on_signals() as stop:
        examples = None
        try:
            bar = tqdm(desc=desc, disable=progress_disabled(progress), unit="img", initial=len(rows), total=total)
            seeds = [example_seed(seed, idx) for idx in idxs]
            examples = _certified(smooth, xs, range(len(rows), total), seeds, n0, n, alpha, batch_size, executor)
            while not stop.requested and (item := next(examples, None)) is not None:
                i, (prediction, radius, dt) = item
                idx, label = idxs[i], int(ys[i])
                correct = int(prediction == label)
                row = {"idx": idx, "label": label, "predict": int(prediction), "radius": float(radius),
                       "correct": correct, "time": dt}
                with stop.shielded():  # a row is written whole or not at all
                    total_seconds += dt
                    certified += correct
                    rows.append(row)
                    if fh is not None:
                        fh.write(_format_row(row) + "\n")
                        fh.flush()
                spent = smooth.queries - queries_before
                bar.update(1)
                bar.set_postfix(correct=f"{certified}/{len(rows)}",
                                samples_s=f"{spent / total_seconds:,.0f}" if total_seconds > 0 else "-")
            bar.close()
        except StopRequested as exc:  # a second signal: the example in flight is dropped
            raise exc.annotate(where=f"during example {len(rows) + 1} of {total}",
                               checkpoint=f"the log of the first {len(rows)} examples{where}")
        except Exception as exc:
            if not stop.requested:
                raise
            # the signal also reached the executor's workers (a scheduler signals the whole job)
            raise stop.stop(where=f"during example {len(rows) + 1} of {total}, which failed ({type(exc).__name__})",
                            checkpoint=f"the log of the first {len(rows)} examples{where}") from exc
        finally:
            if examples is not None:
                examples.close()  # cancels examples started ahead on an executor
            if fh is not None:
                fh.close()
        if stop.requested:
            raise stop.stop(where=f"after example {len(rows)} of {total}",
                            run_dir=None if path is None else path.parent, saved=path is not None)

    queries = smooth.queries - queries_before
    return CertifyRun(
        rows=rows,
        log_path=path,
        queries=queries,
        seconds=total_seconds,
        samples_per_second=queries / total_seconds if total_seconds > 0 else float("nan"),
        n0=n0,
        n=n,
        alpha=alpha,
        sigma=smooth.sigma,
    )


def settings_path(log_path: str | os.PathLike) -> Path:
    """The JSON file beside a log that records the settings it was certified with.

    ``runs/x/certify.tsv`` -> ``runs/x/certify.settings.json``.
    """
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem + ".settings.json")


def _resumable_rows(path: Path, run_settings: Mapping, idxs: Sequence[int]) -> list[dict]:
    # A resumed log must come from the same settings and hold a prefix of this run's examples;
    # anything else would silently mix two different certifications in one table.
    spath = settings_path(path)
    if not spath.exists():
        raise ValueError(f"cannot resume {path}: {spath} is missing, so its settings are unknown; "
                         "certify again without resume (or into another folder)")
    saved = json.loads(spath.read_text())
    differ = {k: (saved.get(k), v) for k, v in run_settings.items() if saved.get(k) != v}
    if differ:
        what = ", ".join(f"{k}: log {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"cannot resume {path}: it was certified with other settings ({what}); "
                         "rerun with the log's settings, or without resume to start over")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # killed mid-row: that row is certified again
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    rows = read_log(path)
    done = [row["idx"] for row in rows]
    if done != list(idxs[: len(done)]):
        raise ValueError(f"cannot resume {path}: its rows (idx {done[:5]}...) are not the first {len(done)} "
                         "examples of this run; certify again without resume")
    return rows


def _parse_time(text: str) -> float:
    # Our logs write seconds; Cohen et al.'s write str(datetime.timedelta), e.g. "0:00:01.234567".
    if ":" in text:
        h, m, s = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    return float(text)


def read_log(path: str | os.PathLike) -> list[dict]:
    """Read a per-example certification log back into typed rows.

    Args:
        path: a tab-separated log with at least the columns of :data:`LOG_COLUMNS` (extra columns
            are ignored).
    Returns:
        list of dicts ``{idx: int, label: int, predict: int, radius: float, correct: int,
        time: float}``, one per example, in file order.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = [c for c in LOG_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path} is not a certification log: missing column(s) {missing}; expected a "
                f"tab-separated header {' '.join(LOG_COLUMNS)}"
            )
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append({
                    "idx": int(rec["idx"]),
                    "label": int(rec["label"]),
                    "predict": int(rec["predict"]),
                    "radius": float(rec["radius"]),
                    "correct": int(rec["correct"]),
                    "time": _parse_time(rec["time"]),
                })
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line}: unreadable row {rec!r} ({err})") from None
    return rows


LogLike = Union[str, os.PathLike, Sequence[Mapping], CertifyRun]


def _rows(log: LogLike) -> list[Mapping]:
    if isinstance(log, CertifyRun):
        return log.rows
    if isinstance(log, (str, os.PathLike)):
        return read_log(log)
    return list(log)


def certified_accuracy(log: LogLike, radii: Iterable[float] | float = DEFAULT_RADII) -> dict[float, float]:
    """Certified accuracy at each radius: ``mean(correct and radius >= r)`` over all examples.

    Abstentions count as wrong (their ``correct`` is 0), so the value at ``r = 0`` is the
    smoothed classifier's clean accuracy under CERTIFY.

    Args:
        log: a log path, a list of row dicts (``correct``, ``radius`` keys) or a :class:`CertifyRun`.
        radii: one radius or an iterable of radii.
    Returns:
        ``{r: accuracy}`` with accuracies in ``[0, 1]``, in the order of ``radii``.
    """
    rows = _rows(log)
    if not rows:
        raise ValueError("the log has no rows; certify at least one example first")
    correct = np.array([bool(int(r["correct"])) for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    radii = [radii] if isinstance(radii, numbers.Real) else list(radii)
    return {float(r): float(np.mean(correct & (radius >= r))) for r in radii}


def certified_accuracy_markdown(
    logs_by_method: Mapping[str, LogLike],
    radii: Iterable[float] = DEFAULT_RADII,
    *,
    queries: Mapping[str, int] | None = None,
) -> str:
    """A markdown table of certified accuracy (%) by radius, one row per method.

    Args:
        logs_by_method: ``{method name: log path | rows | CertifyRun}``.
        radii: radii for the columns.
        queries: optional ``{method: queries spent}`` (e.g. training queries) for an extra column.
    Returns:
        the table as a string (header, separator, one line per method; two decimals, as the
        published tables).
    """
    radii = list(radii)
    head = ["method", "examples"] + [f"r = {r:g}" for r in radii]
    if queries is not None:
        head.append("queries")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for method, log in logs_by_method.items():
        rows = _rows(log)
        acc = certified_accuracy(rows, radii)
        cells = [str(method), str(len(rows))] + [f"{100 * acc[float(r)]:.2f}" for r in radii]
        if queries is not None:
            q = queries.get(method)
            cells.append(f"{q:,}" if q is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_certified_curve(
    logs_by_method: Mapping[str, LogLike],
    path: str | os.PathLike,
    *,
    max_radius: float | None = None,
    title: str | None = None,
) -> Path:
    """Plot certified accuracy against radius, one curve per method, and save it.

    Uses matplotlib's object API with the Agg canvas, so it never touches the global pyplot
    backend and works headless.

    Args:
        logs_by_method: ``{method name: log path | rows | CertifyRun}``.
        path: output image file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        max_radius: right end of the x axis (default: 5% past the largest radius in any log).
        title: optional plot title.
    Returns:
        the path written.
    """
    Figure = require("apps", "matplotlib.figure", "matplotlib.backends.backend_agg", feature="plotting").Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    all_rows = {m: _rows(log) for m, log in logs_by_method.items()}
    if not all_rows:
        raise ValueError("nothing to plot: logs_by_method is empty")
    top = max((float(r["radius"]) for rows in all_rows.values() for r in rows), default=0.0)
    right = max_radius if max_radius is not None else max(top * 1.05, 0.1)
    grid = np.linspace(0.0, right, 400)

    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, rows in all_rows.items():
        acc = certified_accuracy(rows, grid)
        ax.plot(grid, [acc[float(r)] for r in grid], label=str(method))
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
