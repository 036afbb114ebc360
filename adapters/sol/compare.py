"""A SOL comparison folder and the steps of ``deepzero-oracle sol``, as Python functions.

A comparison is one data file (`trajectories.py` format: your own, or ``OUT/trajectories.npz``
written by `generate` for a built-in scenario), a solver and a recipe (`SOLConfig`). Layout of the
folder ``out``: ``config.json`` (the recipe and the data file with its digest), ``trajectories.npz``
(built-ins), ``data/`` (cached NON pairs; the built-ins' cases and reference runs),
``<method>/checkpoint.pt``, ``<method>/train.json``, ``<method>/eval.json``, and after `report`:
``report.md``, ``report.json``, ``error_over_time.png``, ``snapshot.png``.

Each command of ``sol`` parses its flags and calls one function here: `generate`, `train`,
`evaluate_trained`, `report`, `compare`. Bad input (data, solver, corrector, settings that differ
from the folder's) is refused before anything is trained or written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from deepzero_oracle.runs import RunFolder, write_json

__all__ = ["REPORT_FILES", "TRAJECTORIES", "compare", "comparison_data", "comparison_folder", "evaluate_method",
           "evaluate_trained", "generate", "recipe", "report", "run_method", "saved_config", "train",
           "train_length", "write_config"]

TRAJECTORIES = "trajectories.npz"  # what `generate` writes into the folder
REPORT_FILES = ("report.md", "report.json", "error_over_time.png", "snapshot.png")
GENERATION_DEFAULTS = {"scenario": "burgers", "size": "small", "n_train": 16, "n_test": 16, "train_steps": 32,
                       "test_steps": 64, "seed": 0}
_HINT = "use another --out, or --restart to start this comparison over"


# ---------------------------------------------------------------------- the folder
def comparison_folder(out) -> RunFolder:
    """The comparison's `RunFolder`: ``restart()`` removes what ``sol`` wrote there (the data, the
    methods' folders, ``config.json``, the trajectories and the report), nothing else."""
    from .methods import METHODS

    return RunFolder(out, files=("data", *METHODS, "config.json", TRAJECTORIES, *REPORT_FILES), hint=_HINT)


def saved_config(out) -> dict:
    """The folder's ``config.json`` (``{}`` for a new comparison)."""
    return comparison_folder(out).read_json("config.json", {})


def recipe(saved: Mapping, overrides: Mapping | None = None):
    """The recipe (`SOLConfig`, checked): the folder's ``saved`` one, with each field of
    ``overrides`` that is not None in its place (in memory; nothing written)."""
    from .data import SOLConfig

    fields = SOLConfig.from_dict(dict(saved)).to_dict()
    fields.update({k: v for k, v in (overrides or {}).items() if k in fields and v is not None})
    return SOLConfig.from_dict(fields).check()


def comparison_data(out, saved: Mapping, unroll: int | None, data=None):
    """``(trajectories, path)`` of the comparison: ``data``, else the folder's recorded file, else
    ``out/trajectories.npz``. Other data than the folder's is refused (``SettingsMismatch``)."""
    from deepzero_oracle.errors import SettingsMismatch

    from .trajectories import load_trajectories

    out = Path(out)
    if data:
        path = Path(data)
    elif saved.get("data"):
        path = out / saved["data"]  # relative to the folder, or absolute
    elif (out / TRAJECTORIES).exists():
        path = out / TRAJECTORIES
    else:
        raise FileNotFoundError(f"no data for {out}: pass --data FILE.npz (a SOL trajectories file) or run "
                                f"`deepzero-oracle sol generate --out {out}` for a built-in scenario")
    traj = load_trajectories(path, unroll=unroll)
    if saved.get("data_digest") and saved["data_digest"] != traj.digest():
        raise SettingsMismatch(f"{out} holds a comparison on other data ({saved.get('data')}, digest "
                               f"{saved['data_digest'][:12]}); {path} has digest {traj.digest()[:12]}: use another --out")
    return traj, path


def write_config(out, cfg, trajectories, data_path) -> None:
    """Record a comparison in ``<out>/config.json``: the recipe (`SOLConfig`) and the data file (relative to
    ``out`` when inside it), its digest and label; `evaluate_trained` and `report` read it back."""
    out, data_path = Path(out), Path(data_path).resolve()
    if data_path.is_relative_to(out.resolve()):
        data_path = Path(os.path.relpath(data_path, out.resolve()))
    write_json(out / "config.json", {**cfg.to_dict(), "data": str(data_path), "data_digest": trajectories.digest(),
                                     "data_label": trajectories.label}, indent=1)


def train_length(out) -> int | None:
    """Steps of the comparison's training trajectories (the horizon SOL trained on), if known."""
    from .trajectories import load_trajectories

    out = Path(out)
    saved = saved_config(out)
    path = out / saved["data"] if saved.get("data") else out / TRAJECTORIES
    return load_trajectories(path).train_states.shape[1] - 1 if path.exists() else None


# ---------------------------------------------------------------------- one method
def run_method(cfg, method: str, out, trajectories, solver, *, progress: bool | None = None, restart: bool = False,
               executor=None, max_queries: int | None = None) -> dict:
    """Train (if needed) and evaluate one method of a comparison; writes ``<out>/<method>/eval.json``.

    Args:
        cfg: `SOLConfig`; method: ``src|non|fo-sol|zo-sol``; out: comparison folder.
        trajectories: the data (`Trajectories`).
        solver: a `Solver` (or a plain callable): rolls out evaluation, computes NON's pairs (cached in
            ``<out>/data``), answers ZO-SOL's queries and gives FO-SOL its torch step.
        executor: where ZO-SOL's queries run (``open_executor``); None: here.
        max_queries: the training's query budget (`train_method`); a run it stops is not evaluated.
    Returns:
        ``{"method", "mae_mean", "mae_std", "queries", "solver_calls", "seconds", "steps", "mae_per_sim",
        "mae_over_time", "diverged"}``, or `train_method`'s summary when ``stopped_reason`` is set.
    """
    from .data import prepare_data
    from .methods import train_method

    run = Path(out) / method
    data = None if method == "src" else prepare_data(trajectories, solver, cache_dir=Path(out) / "data")
    summary = train_method(cfg, method, data, run, solver=solver, progress=progress, restart=restart,
                           executor=executor, max_queries=max_queries)
    if summary.get("stopped_reason"):
        return summary
    return evaluate_method(cfg, method, trajectories, solver, run, summary)


def evaluate_method(cfg, method: str, trajectories, solver, run, summary: Mapping) -> dict:
    """Test MAE of the method trained in ``run`` (its checkpoint; SRC: the solver alone), with
    ``summary`` (its ``train.json``); writes ``run/eval.json`` and ``run/snapshot.npz``.
    Returns what `run_method` returns."""
    import numpy as np

    from .data import prepare_data
    from .methods import evaluate, load_corrector

    # the corrector's constants come back with its checkpoint: no solver pairs needed here
    corrector = None if method == "src" else load_corrector(cfg, prepare_data(trajectories), run)
    ev = evaluate(trajectories, solver, corrector)
    result = {"method": method, "mae_mean": ev["mae_mean"], "mae_std": ev["mae_std"],
              "queries": int(summary["queries"]), "solver_calls": int(summary["solver_calls"]),
              "seconds": float(summary["seconds"]), "steps": int(summary["step"]),
              "mae_per_sim": ev["mae_per_sim"], "mae_over_time": ev["mae_over_time"],
              "mae_per_sim_over_time": ev["mae_per_sim_over_time"], "diverged": ev["diverged"]}
    write_json(Path(run) / "eval.json", result, indent=1)
    np.savez_compressed(Path(run) / "snapshot.npz", **ev["snapshot"])
    return result


# ---------------------------------------------------------------------- the commands
def generate(out, *, restart: bool = False, progress: bool | None = None, **settings) -> dict:
    """``sol generate``: the trajectories of a built-in scenario in ``out/trajectories.npz``.

    ``settings`` are `GENERATION_KEYS` (scenario, size, n_train, n_test, train_steps, test_steps,
    seed); None or missing: the folder's, else the defaults. A folder holding trajectories of
    other settings is refused (``SettingsMismatch`` naming each); ``restart`` first removes what
    ``sol`` wrote to ``out`` (`comparison_folder`). Returns ``{"scenario", "size", "train_states",
    "test_states" (shapes), "data" (the file), "label"}``.
    """
    from .builtin import GENERATION_KEYS, generate_trajectories
    from .trajectories import load_trajectories

    unknown = set(settings) - set(GENERATION_KEYS)
    if unknown:
        raise TypeError(f"generate() got unknown settings {sorted(unknown)}; known: {', '.join(GENERATION_KEYS)}")
    folder = comparison_folder(out)
    if restart:
        folder.restart()
    path = folder.file(TRAJECTORIES)
    existing = load_trajectories(path).metadata if path.exists() else {}
    wanted = {k: settings[k] if settings.get(k) is not None else existing.get(k, GENERATION_DEFAULTS[k])
              for k in GENERATION_KEYS}
    if existing:
        RunFolder(folder.path, wanted, hint=_HINT).check({k: existing.get(k) for k in GENERATION_KEYS}, where=path)
        traj = load_trajectories(path)
    else:
        traj = generate_trajectories(**wanted, cache_dir=folder.file("data"), progress=progress)
        traj.save(path)
    return {"scenario": wanted["scenario"], "size": wanted["size"], "train_states": list(traj.train_states.shape),
            "test_states": list(traj.test_states.shape), "data": str(path), "label": traj.label}


def train(out, method: str, *, overrides: Mapping | None = None, data=None, solver: str | None = None,
          timeout: float = 120.0, executor: str = "inline", max_queries: int | None = None, restart: bool = False,
          progress: bool | None = None) -> tuple[str, dict]:
    """``sol train``: train one method of the comparison in ``out`` (continuing ``out/method``
    unless ``restart``), then evaluate it.

    Args:
        overrides: recipe fields (`SOLConfig`) replacing the folder's; None values are ignored.
        data: the trajectories file (default: the folder's, or ``out/trajectories.npz``).
        solver: a black-box spec of the source solver (default: the built-in scenario's step).
        timeout: seconds per solver call; executor: where ZO-SOL's queries run (``open_executor``).
        max_queries: the training's query budget; a run it stops is kept, not evaluated.
    Returns:
        ``(data label, result)``: `run_method`'s result (``stopped_reason`` set when the budget stopped it).
    Raises:
        SettingsMismatch: ``out/method`` holds a run of other settings, or the folder other data;
        checked with the solver, the corrector and FO-SOL's gradient path before anything is written.
    """
    from deepzero_oracle.blackbox.spec import BlackBoxSpec
    from deepzero_oracle.parallel import InlineExecutor, check_shippable, open_executor

    from .data import prepare_data
    from .methods import build_corrector, check_resumable
    from .solver import open_solver

    out = Path(out)
    if solver:
        BlackBoxSpec.parse(solver)  # a malformed spec fails before the data is read
    saved = saved_config(out)
    cfg = recipe(saved, overrides)
    traj, path = comparison_data(out, saved, cfg.unroll, data)
    with open_executor(executor) as pool, open_solver(solver, traj, timeout=timeout) as black_box:
        # every check before anything is written: FO-SOL's gradient path, the corrector, the settings
        if method == "fo-sol":
            black_box.gradient_step(traj)
        if method == "zo-sol" and not isinstance(pool, InlineExecutor):
            check_shippable(black_box, pool)  # the workers call the solver: refuse one that cannot travel there, now
        if method != "src":
            build_corrector(cfg, prepare_data(traj))
            if not restart:
                check_resumable(cfg, method, traj, black_box, out / method)
        write_config(out, cfg, traj, path)
        result = run_method(cfg, method, out, traj, black_box, progress=progress, restart=restart,
                            executor=pool, max_queries=max_queries)
    return traj.label, result


def evaluate_trained(out, method: str, *, solver: str | None = None, timeout: float = 120.0) -> tuple[str, dict]:
    """``sol eval``: evaluate the method trained in ``out/method`` again (with ``solver``, default
    the one it was trained with). Returns ``(data label, result)`` as `run_method`."""
    import json

    from .solver import BUILTIN, open_solver

    out = Path(out)
    saved = saved_config(out)
    run = out / method
    if not saved or not (run / "train.json").exists():
        raise FileNotFoundError(f"no trained {method} in {run}; run `sol train --method {method}` first")
    cfg = recipe(saved)
    traj, _ = comparison_data(out, saved, None)
    summary = json.loads((run / "train.json").read_text())
    spec = solver or (None if summary.get("solver", BUILTIN) == BUILTIN else summary["solver"])
    with open_solver(spec, traj, timeout=timeout) as black_box:
        return traj.label, evaluate_method(cfg, method, traj, black_box, run, summary)


def report(out, *, plots: bool = True) -> dict:
    """``sol report``: collect ``<out>/<method>/eval.json``; write ``report.md``, ``report.json`` and
    plots (`report.py`: MAE with 95% intervals at several horizons, paired tests).

    Returns:
        ``{method: {"mae_mean", "mae_std", "mae_ci95", "queries", "seconds", "horizons": {...}}}``
        in `METHODS` order.
    """
    from .report import report as write_report

    label = saved_config(out).get("data_label", Path(out).name)
    return write_report(out, plots=plots, train_steps=train_length(out), title=f"SOL comparison: {label}")


def compare(out, seeds: Sequence[int], methods: Sequence[str], *, data=None, scenario: Mapping | None = None,
            overrides: Mapping | None = None, solver: str | None = None, timeout: float = 120.0,
            executor: str = "inline", restart: bool = False, progress: bool | None = None,
            on_result: Callable[[str, dict], None] | None = None) -> dict:
    """``sol compare``: the whole comparison once per seed in ``out/seed-S`` (`generate` with
    ``scenario``'s settings unless ``data`` is given, then `train` each method with the recipe's
    ``overrides``), then each seed's report and all seeds pooled in ``out`` (`pooled_report`).

    ``on_result(label, result)`` is called after each method is trained (e.g. to print a line).
    Returns ``{"seeds": {seed: table}, "pooled": table}``.
    """
    from .methods import METHODS
    from .report import pooled_report

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    out = Path(out)
    folders = {}
    for seed in seeds:
        folder = out / f"seed-{seed}"
        if not data:
            generate(folder, restart=restart, progress=progress, **{**(scenario or {}), "seed": seed})
        for m in methods:
            label, result = train(folder, m, overrides={**(overrides or {}), "seed": seed}, data=data, solver=solver,
                                  timeout=timeout, executor=executor, restart=restart, progress=progress)
            if on_result is not None:
                on_result(label, result)
        folders[seed] = folder
    return pooled_report(out, folders, train_steps=train_length(folders[seeds[0]]))
