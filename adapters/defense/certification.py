"""Certify test images with :class:`~.smoothing.Smooth`, keep the per-example log, read it back.

The log is Cohen et al.'s format: tab-separated, one row per certified example, header
``idx  label  predict  radius  correct  time`` (``predict`` is ``-1`` when abstaining, ``correct``
is 0/1, ``time`` is wall seconds spent certifying that example). Everything downstream (the
certified-accuracy table, the curve: :mod:`.report`) is computed from the log, so a table can
always be traced back to, and recomputed from, the rows that produced it.

- :func:`certify_dataset`: CERTIFY every example (here or on an executor), writing the log as it
  goes; resumable, and stopped cleanly by SIGINT / SIGTERM between examples.
- :func:`certify_front`: the same for the first test images through ``f(front(x + noise))``.
- :func:`certify_folder`: ``defense certify``: a run folder's trained front (or none), its data
  and classifier, certified into ``certify.tsv`` and ``certify.json``.
- :func:`read_log`, :func:`certified_accuracy`: the log read back, and what it certifies.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from deepzero_oracle.blackbox import as_tensor
from deepzero_oracle.common.datasets import data_fingerprint, load_data
from deepzero_oracle.parallel import InlineExecutor, map_ordered, open_executor
from deepzero_oracle.runs import RunFolder, write_json, write_text
from deepzero_oracle.stops import StopRequested, stop_on_signals
from deepzero_oracle.train import progress_disabled

from deepzero_oracle.adapters.defense.classifier import open_classifier
from deepzero_oracle.adapters.defense.fronts import front_sha256, open_trained_front, smoothed_pipeline
from deepzero_oracle.adapters.defense.smoothing import ABSTAIN, Smooth, check_alpha, check_certify_n, check_count
from deepzero_oracle.adapters.defense.training import METHODS, open_images

__all__ = [
    "LOG_COLUMNS",
    "DEFAULT_RADII",
    "CERTIFY_METHODS",
    "CertifyRun",
    "certify_dataset",
    "certify_example",
    "certify_front",
    "certify_folder",
    "example_seed",
    "log_rows",
    "read_log",
    "settings_path",
    "certified_accuracy",
]

log = logging.getLogger(__name__)

LOG_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
#: The radii the project's tables report (ZO-AE-DS / DeepZero report r = 0, 0.25, 0.5, 0.75).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75)
#: What ``defense certify --method`` accepts: a trained method, or ``none`` (no denoiser).
CERTIFY_METHODS = ("none", *METHODS)


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


def certify_example(smooth: Smooth, x, n0: int, n: int, alpha: float, batch_size: int,
                    seed: int) -> tuple[int, float, float]:
    """CERTIFY one example ``x`` (e.g. ``[C, H, W]``) with its own generator seeded by ``seed``:
    ``(prediction, radius, seconds)``. The answer depends on ``seed``, not on where it runs (here,
    or on an executor's worker holding its own copy of ``smooth``)."""
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
    todo = list(todo)
    calls = math.ceil(n0 / batch_size) + math.ceil(n / batch_size)
    # smooth ships once per worker (a classifier that cannot travel fails before any work);
    # closing this generator cancels the examples started ahead
    answers = map_ordered(certify_example, ((xs[i], n0, n, alpha, batch_size, seeds[i]) for i in todo),
                          executor, shared=(smooth,))
    try:
        for i, answer in zip(todo, answers):
            smooth.queries += n0 + n
            smooth.calls += calls
            yield i, answer
    finally:
        answers.close()


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
        n0: noisy samples that select the top class (as in :meth:`Smooth.certify`).
        n: noisy samples that bound its probability; validated against ``alpha`` before anything
            is queried or written.
        alpha: failure probability of each certificate.
        batch_size: noisy samples per black-box call.
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
    n0, n = check_count("n0", n0), check_count("n", n)
    alpha, batch_size = check_alpha(alpha), check_count("batch_size", batch_size)
    check_certify_n(n, alpha)  # fail before a long run, not at its first example
    xs, ys, idxs = _examples(xs, labels, indices)
    path = Path(log_path) if log_path is not None else None
    run_settings = {"n0": n0, "n": n, "alpha": alpha, "sigma": float(smooth.sigma), "batch_size": batch_size,
                    "seed": int(seed), **dict(settings or {})}
    if resume and path is None:
        raise ValueError("resume=True needs the log_path of the run to continue")
    rows, fh = _open_log(path, run_settings, idxs, resume)
    queries_before = smooth.queries - len(rows) * (n0 + n)
    seeds = [example_seed(seed, idx) for idx in idxs]
    examples = _certified(smooth, xs, range(len(rows), len(idxs)), seeds, n0, n, alpha, batch_size, executor)
    _record(examples, rows, fh, ys, idxs, smooth, queries_before, path, progress=progress, desc=desc)
    queries = smooth.queries - queries_before
    seconds = float(sum(row["time"] for row in rows))
    return CertifyRun(rows=rows, log_path=path, queries=queries, seconds=seconds,
                      samples_per_second=queries / seconds if seconds > 0 else float("nan"),
                      n0=n0, n=n, alpha=alpha, sigma=smooth.sigma)


def _examples(xs, labels, indices) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``xs`` and ``labels`` as tensors and the dataset index of each row, checked to match."""
    xs = as_tensor(xs)
    ys = as_tensor(labels).reshape(-1)
    if xs.ndim < 1 or xs.shape[0] != ys.shape[0]:
        raise ValueError(f"xs has {xs.shape[0] if xs.ndim else 0} rows but labels has {ys.shape[0]}; they must match")
    idxs = list(range(xs.shape[0])) if indices is None else [int(i) for i in indices]
    if len(idxs) != xs.shape[0]:
        raise ValueError(f"indices has {len(idxs)} entries for {xs.shape[0]} examples")
    return xs, ys, idxs


def _open_log(path: Path | None, run_settings: Mapping, idxs: Sequence[int], resume: bool):
    """``(rows kept, log opened for appending)``: with ``resume`` the rows an interrupted log holds
    (checked against ``run_settings``), else none; the settings file is written and the log
    rewritten with those rows first. ``([], None)`` without a log."""
    if path is None:
        return [], None
    run = RunFolder(path.parent, run_settings, name=path.stem, hint=_RESUME_HINT)
    rows: list[dict] = _resumable_rows(path, run, idxs) if resume and path.exists() else []
    run.write_json(run.settings_path.name, run_settings)
    # rewritten whole (drops a half-written last line), atomically: a kill here keeps the rows
    write_text(path, "".join(line + "\n" for line in ["\t".join(LOG_COLUMNS), *map(_format_row, rows)]))
    return rows, open(path, "a", encoding="utf-8")


def _record(examples, rows: list[dict], fh, ys, idxs: Sequence[int], smooth: Smooth, queries_before: int,
            path: Path | None, *, progress, desc: str) -> None:
    """Append a row to ``rows`` and to the log ``fh`` for each ``(i, answer)`` of ``examples``
    until they run out or SIGINT / SIGTERM asks to stop (then ``StopRequested``, after the row
    in flight). Closes ``examples`` and ``fh``."""
    total_seconds = float(sum(row["time"] for row in rows))
    certified = sum(int(row["correct"]) for row in rows)
    total = len(idxs)
    where = f" in {path}" if path is not None else ""
    with stop_on_signals() as stop:
        try:
            bar = tqdm(desc=desc, disable=progress_disabled(progress), unit="img", initial=len(rows), total=total)
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
            examples.close()  # cancels examples started ahead on an executor
            if fh is not None:
                fh.close()
        if stop.requested:
            raise stop.stop(where=f"after example {len(rows)} of {total}",
                            run_dir=None if path is None else path.parent, saved=path is not None)


def settings_path(log_path: str | os.PathLike) -> Path:
    """The JSON file beside a log that records the settings it was certified with.

    ``runs/x/certify.tsv`` -> ``runs/x/certify.settings.json``.
    """
    log_path = Path(log_path)
    return RunFolder(log_path.parent, name=log_path.stem).settings_path


_RESUME_HINT = "certify with the log's settings, start over with --restart (resume=False), or use another --out"


def _resumable_rows(path: Path, run: RunFolder, idxs: Sequence[int]) -> list[dict]:
    # A resumed log must come from the same settings and hold a prefix of this run's examples;
    # anything else would silently mix two different certifications in one table.
    if not run.settings_path.exists():
        raise ValueError(f"cannot resume {path}: {run.settings_path} is missing, so its settings are unknown; "
                         "certify again without resume (or into another folder)")
    run.check(where=path)  # SettingsMismatch naming each difference
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


def log_rows(log: LogLike) -> list[Mapping]:
    """The rows of a log given as a path (read with :func:`read_log`), a :class:`CertifyRun`, or
    rows already read."""
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
    rows = log_rows(log)
    if not rows:
        raise ValueError("the log has no rows; certify at least one example first")
    correct = np.array([bool(int(r["correct"])) for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    radii = [radii] if isinstance(radii, numbers.Real) else list(radii)
    return {float(r): float(np.mean(correct & (radius >= r))) for r in radii}


# ----------------------------------------------------------------------------------------------
# A trained front, certified
# ----------------------------------------------------------------------------------------------


def certify_front(front: nn.Module | None, blackbox: Callable, data, sigma: float, *, n0: int = 100,
                  n: int = 100_000, alpha: float = 0.001, max_examples: int = 100, batch_size: int = 1000,
                  seed: int = 0, log_path: str | Path | None = None, progress: bool | None = None,
                  resume: bool = False, settings: dict | None = None, executor=None) -> CertifyRun:
    """CERTIFY the first ``max_examples`` test images through ``f(front(x + noise))``.

    ``data``: images with ``x_test [N, C, H, W]``, ``y_test [N]`` and ``classes`` (a ``Dataset``),
    or a ``--data`` value. Returns the ``CertifyRun`` (rows, queries = noisy samples,
    samples/s); the per-example log goes to ``log_path``. ``resume``, ``settings`` and
    ``executor`` (where the images are certified, the same rows anywhere) are
    ``certify_dataset``'s; the data's fingerprint is always among the settings.
    """
    data = load_data(data) if isinstance(data, str) else data
    xs, ys = data.x_test[:max_examples], data.y_test[:max_examples]
    smooth = Smooth(smoothed_pipeline(front, blackbox), data.classes, sigma)
    return certify_dataset(smooth, xs, ys, n0, n, alpha, batch_size, seed=seed, log_path=log_path,
                           progress=progress, resume=resume, executor=executor,
                           settings={"data_sha256": data_fingerprint(data), **(settings or {})})


def certify_folder(out: str | Path, method: str, *, data: str | None = None, classifier: str | None = None,
                   sigma: float | None = None, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                   max_examples: int = 100, batch_size: int = 1000, seed: int = 0,
                   classifier_path: str | None = None, timeout: float = 60.0, executor: str = "inline",
                   restart: bool = False, progress: bool | None = None) -> dict:
    """``defense certify``: CERTIFY the first test images through the front trained in ``out``
    (``method="none"``: through the classifier alone) into ``out/certify.tsv`` and ``certify.json``.

    Args:
        out: the run folder (``train_folder``'s; any folder for ``none``).
        method: one of :data:`CERTIFY_METHODS`; ``out`` must hold a finished run of it.
        data: the images (a ``--data`` value); default: the run's. Other images than the run was
            trained on are refused. Required for ``none``.
        classifier: a ``--classifier`` spec; default: the run's (``local`` for ``none``). Another
            one is used with a warning (e.g. the same model at a new address).
        sigma: the noise level; default: the run's training sigma. Required for ``none``.
        n0: noisy samples that select the top class.
        n: noisy samples that bound its probability.
        alpha: failure probability of each certificate.
        max_examples: how many test images are certified (the first ones).
        batch_size: noisy samples per black-box call.
        seed: seeds each image's noise (:func:`example_seed`).
        classifier_path: the saved ``local`` classifier (``open_classifier``'s ``path``).
        timeout: seconds each call to a remote classifier may take.
        executor: an ``open_executor`` spec: where the images are certified.
        restart: certify from the first image again; otherwise an interrupted ``certify.tsv``
            with the same settings (and the same front and classifier) is continued.
        progress: tqdm bars (None: when stderr is a terminal).
    Returns:
        what ``certify.json`` holds: ``method``, ``dataset``, ``CertifyRun.summary()`` and what
        training spent (``training_queries``, ``training_blackbox_images``).
    """
    out = Path(out)
    front, training = None, {"queries": 0, "blackbox_images": 0}
    if method == "none":
        if data is None or sigma is None:
            raise ValueError("--method none needs --data (or --dataset) and --sigma (there is no trained run to "
                             "read them from)")
        (images, dataset), spec = open_images(data), classifier or "local"
    else:
        front, config, training = open_trained_front(out, method)
        images, dataset = open_images(data or config.dataset)
        _check_trained_on(out, training, images, data or config.dataset)
        spec, sigma = _against(config, classifier, sigma)
    # What the log's rows depend on beyond the sampling settings: resuming must not mix models.
    model = {"method": method, "classifier": spec, "front_sha256": front_sha256(out) if front is not None else None}
    with open_executor(executor) as pool, \
            open_classifier(spec, images, path=classifier_path, timeout=timeout, progress=progress) as box:
        run = certify_front(front, box, images, sigma, n0=n0, n=n, alpha=alpha, max_examples=max_examples,
                            batch_size=batch_size, seed=seed, log_path=out / "certify.tsv", progress=progress,
                            resume=not restart, settings=model, executor=pool)
    summary = {"method": method, "dataset": dataset, **run.summary(),
               "training_queries": int(training["queries"]),
               "training_blackbox_images": int(training["blackbox_images"])}
    write_json(out / "certify.json", summary)
    return summary


def _check_trained_on(out: Path, training: dict, images, given: str) -> None:
    """Refuse images other than those the run in ``out`` was trained on (compared by content)."""
    trained_on = training.get("data_sha256")
    if trained_on is not None and trained_on != data_fingerprint(images):
        raise ValueError(f"{out} was trained on other images than {given} holds now "
                         f"(fingerprint {trained_on} then, {data_fingerprint(images)} now); certify it on the "
                         "images it was trained on")


def _against(config, classifier: str | None, sigma: float | None) -> tuple[str, float]:
    """The classifier spec and sigma to certify a trained run with: the run's unless given (with a
    warning when they differ from what the front was trained against)."""
    spec = classifier or config.classifier
    if spec != config.classifier:
        log.warning("certifying with --classifier %s; the front was trained against %s", spec, config.classifier)
    sigma = sigma if sigma is not None else config.sigma
    if sigma != config.sigma:
        log.warning("certifying at sigma=%s a front trained at sigma=%s", sigma, config.sigma)
    return spec, sigma
