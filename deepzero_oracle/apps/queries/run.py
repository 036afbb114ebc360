"""Run the query benchmark: every (task, method, seed) once, each record kept as it finishes.

Records live in ``OUT/<task>/<method>/seed-<S>.json`` and the SOL references (SRC, NON, FO-SOL)
in ``OUT/<task>/references-seed-<S>.json``; a record already on disk is not run again, so an
interrupted benchmark continues where it stopped and several processes may share the work (give
each other ``--tasks``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from deepzero_oracle.runs import write_json
from deepzero_oracle.train import progress_disabled

from .methods import methods_for, run_method
from .tasks import TASKS

__all__ = ["bench_queries", "run_benchmark"]

log = logging.getLogger(__name__)


def run_benchmark(out, *, tasks: Iterable[str] = tuple(TASKS), methods: Iterable[str] | None = None,
                  seeds: Iterable[int] = range(5), budget_scale: float = 1.0, progress: bool | None = None) -> list[dict]:
    """Run what is missing and return every record of the chosen tasks.

    Args:
        out: the benchmark's folder.
        tasks: names in ``TASKS``; methods: names of `methods_for` (None: all).
        seeds: training seeds (the corrector's or CNN's init, the batches, the directions).
        budget_scale: multiplies each task's query budget (a quick look: 0.1).
        progress: a progress bar on stderr, one step per record: None (default) when stderr is a
            terminal, True always, False never; each new record is also logged at INFO (``-v``).
    Returns:
        records, each with ``task`` and ``budget`` added (`run_method`'s dict), and per SOL seed a
        ``{"task", "seed", "references": {"src", "non", "fo-sol"}}`` record.
    """
    from deepzero_oracle.extras import require

    threadpool_limits = require("peers", "threadpoolctl", feature="bench --queries").threadpool_limits
    torch.set_num_threads(1)  # one process per core: run several with different --tasks
    with threadpool_limits(1):  # NumPy's BLAS too (CMA-ES's eigendecompositions): spinning threads of
        return _run(Path(out), tasks, methods, seeds, budget_scale, progress)  # two processes starve each other


def _run(out: Path, tasks, methods, seeds, budget_scale, progress) -> list[dict]:
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    known = {m.name for name in tasks for m in methods_for(TASKS[name].kind)}
    if methods is not None and set(methods) - known:
        raise ValueError(f"unknown method(s) {sorted(set(methods) - known)} for these tasks; choose from "
                         f"{', '.join(sorted(known))}")
    plan = [(name, m, seed) for name in tasks for seed in seeds
            for m in methods_for(TASKS[name].kind) if methods is None or m.name in set(methods)]
    records = []
    with contextlib.ExitStack() as held, tqdm(total=len(plan), desc="bench --queries", unit="run",
                                              disable=progress_disabled(progress)) as bar:
        for name in tasks:
            held.enter_context(_task_lock(out / name))
        for name, method, seed in plan:
            task, folder = TASKS[name], out / name
            budget = max(1, int(task.budget * budget_scale))
            ref = folder / f"references-seed-{seed}.json"
            if task.kind == "sol" and not ref.exists():
                write_json(ref, {"task": name, "seed": seed, "references": task.references(seed, folder)})
            path = folder / method.name / f"seed-{seed}.json"
            if not path.exists():
                with task.open(seed, folder) as problem:
                    record = run_method(problem, method, budget, seed)
                write_json(path, {"task": name, "budget": budget, **record}, indent=1)
                log.info("%s %s seed %d: error %.4f after %d queries (%.0f s)", name, method.name, seed,
                         record["curve"][-1]["error"], record["queries"], record["seconds"])
            records.append(json.loads(path.read_text()))
            bar.set_postfix_str(f"{name} {method.name} seed {seed}", refresh=False)
            bar.update(1)
    refs = {p for name in tasks for p in (out / name).glob("references-seed-*.json")}
    return records + [json.loads(p.read_text()) for p in sorted(refs)]


@contextlib.contextmanager
def _task_lock(folder: Path):
    """Hold ``folder/.running`` for the run: a second benchmark on the same task and folder is refused
    (two would train the same references into one folder)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".running", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another `bench --queries` is running the task in {folder}; wait for it, or give "
                               f"this one other --tasks or another --out") from None
        yield


def bench_queries(out, *, tasks: Iterable[str] = tuple(TASKS), seeds: Iterable[int] = range(5),
                  methods: Iterable[str] | None = None, budget_scale: float = 1.0, progress: bool | None = None) -> dict:
    """``deepzero-oracle bench --queries``: run what is missing under ``out/queries``, then write and
    return the report (`report.report`: ``queries.md``, ``queries.json``, ``queries.png``)."""
    from deepzero_oracle.extras import require

    from .report import report

    for module in ("nevergrad", "cma", "threadpoolctl"):  # before any work: the peers run on every task
        require("peers", module, feature="bench --queries")
    folder = Path(out) / "queries"
    run_benchmark(folder, tasks=tasks, methods=methods, seeds=seeds, budget_scale=budget_scale, progress=progress)
    return report(folder)
