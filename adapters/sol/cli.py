"""``deepzero-oracle sol generate | train | eval | report``: solver-in-the-loop correctors from the shell.

``register(subparsers)`` adds the commands (the ``deepzero-oracle`` entry point does). A comparison
is one data file (`trajectories.py` format: ``--data FILE.npz``, or ``OUT/trajectories.npz`` written by
``sol generate`` for a built-in scenario) and a solver (``--solver SPEC``; the built-in scenario's
in-process step by default). Layout of ``--out DIR``:
``config.json`` (the recipe, `SOLConfig`, and the data file with its digest), ``trajectories.npz``
(built-ins), ``data/`` (cached NON pairs; the built-ins' cases and reference runs),
``<method>/checkpoint.pt``, ``<method>/train.json``, ``<method>/eval.json``, and after ``report``:
``report.md``, ``report.json``, ``error_over_time.png``, ``snapshot.png``.

Bad input (data, solver, corrector) is refused before anything is trained or written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from deepzero_oracle.apps.options import (add_command, add_executor, add_json, add_max_queries, add_quiet,
                                          add_run_folder, add_timeout, budget_message, given_flags, int_list,
                                          progress_flags, progress_of, run_subcommand, steps_count)
from deepzero_oracle.errors import EXIT_BUDGET
from deepzero_oracle.atomic import write_json

__all__ = ["register", "report", "run_method", "write_config"]

TRAJECTORIES = "trajectories.npz"  # what `sol generate` writes into --out
_REPORT_FILES = ("report.md", "report.json", "error_over_time.png", "snapshot.png")


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
    from deepzero_oracle.adapters.sol.data import prepare_data
    from deepzero_oracle.adapters.sol.methods import train_method

    run = Path(out) / method
    data = None if method == "src" else prepare_data(trajectories, solver, cache_dir=Path(out) / "data")
    summary = train_method(cfg, method, data, run, solver=solver, progress=progress, restart=restart,
                           executor=executor, max_queries=max_queries)
    if summary.get("stopped_reason"):
        return summary
    return _evaluate(cfg, method, trajectories, solver, run, summary)


def _evaluate(cfg, method, trajectories, solver, run, summary) -> dict:
    import numpy as np

    from deepzero_oracle.adapters.sol.data import prepare_data
    from deepzero_oracle.adapters.sol.methods import evaluate, load_corrector

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


# ---------------------------------------------------------------------- the comparison folder
def _saved_config(out: Path) -> dict:
    path = out / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _recipe(args, saved: dict):
    """The recipe: the folder's, overridden by flags given explicitly (in memory; nothing written)."""
    from deepzero_oracle.adapters.sol.data import SOLConfig

    fields = SOLConfig.from_dict(saved).to_dict()
    for k in fields:
        v = getattr(args, k, None)
        if v is not None:
            fields[k] = v
    return SOLConfig.from_dict(fields).check()


def _data(args, out: Path, saved: dict, unroll: int | None):
    """(trajectories, path) of the comparison: ``--data``, else the folder's recorded file, else
    ``OUT/trajectories.npz``; other data than the folder's is refused."""
    from deepzero_oracle.adapters.sol.trajectories import load_trajectories

    given = getattr(args, "data", None)
    if given:
        path = Path(given)
    elif saved.get("data"):
        path = out / saved["data"]  # relative to the folder, or absolute
    elif (out / TRAJECTORIES).exists():
        path = out / TRAJECTORIES
    else:
        raise FileNotFoundError(f"no data for {out}: pass --data FILE.npz (a SOL trajectories file) or run "
                                f"`deepzero-oracle sol generate --out {out}` for a built-in scenario")
    traj = load_trajectories(path, unroll=unroll)
    if saved.get("data_digest") and saved["data_digest"] != traj.digest():
        raise ValueError(f"{out} holds a comparison on other data ({saved.get('data')}, digest "
                         f"{saved['data_digest'][:12]}); {path} has digest {traj.digest()[:12]}: use another --out")
    return traj, path


def write_config(out, cfg, trajectories, data_path) -> None:
    """Record a comparison in ``<out>/config.json``: the recipe (`SOLConfig`) and the data file (relative to
    ``out`` when inside it), its digest and label; `sol eval` and `sol report` read it back."""
    out, data_path = Path(out), Path(data_path).resolve()
    if data_path.is_relative_to(out.resolve()):
        data_path = Path(os.path.relpath(data_path, out.resolve()))
    write_json(out / "config.json", {**cfg.to_dict(), "data": str(data_path), "data_digest": trajectories.digest(),
                                     "data_label": trajectories.label}, indent=1)


# ---------------------------------------------------------------------- commands
def _generate(args) -> int:
    from deepzero_oracle.adapters.sol.builtin import GENERATION_KEYS, generate_trajectories
    from deepzero_oracle.adapters.sol.methods import METHODS
    from deepzero_oracle.adapters.sol.trajectories import load_trajectories

    out = Path(args.out)
    path = out / TRAJECTORIES
    if args.restart:  # a new comparison: remove only what `sol` itself wrote there
        for name in ("data", *METHODS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("config.json", TRAJECTORIES, *_REPORT_FILES):
            (out / name).unlink(missing_ok=True)
    existing = load_trajectories(path).metadata if path.exists() else {}
    defaults = {"scenario": "burgers", "size": "small", "n_train": 16, "n_test": 16, "train_steps": 32,
                "test_steps": 64, "seed": 0}
    wanted = {k: getattr(args, k) if getattr(args, k) is not None else existing.get(k, defaults[k])
              for k in GENERATION_KEYS}
    if existing:
        changed = sorted(k for k in GENERATION_KEYS if existing.get(k) != wanted[k])
        if changed:
            raise ValueError(f"{path} holds trajectories generated with other settings ({changed}); use another "
                             "--out, or --restart to start this comparison over")
        traj = load_trajectories(path)
    else:
        traj = generate_trajectories(**wanted, cache_dir=out / "data", progress=progress_of(args))
        traj.save(path)
    info = {**{k: wanted[k] for k in ("scenario", "size")}, "train_states": list(traj.train_states.shape),
            "test_states": list(traj.test_states.shape), "data": str(path)}
    print(json.dumps(info) if args.json else
          f"sol generate: {traj.label}: train {traj.train_states.shape}, test {traj.test_states.shape} in {path}")
    return 0


def _print_result(args, label: str, r, command: str) -> None:
    keys = ("method", "mae_mean", "mae_std", "queries", "solver_calls", "seconds", "steps", "diverged")
    print(json.dumps({k: r[k] for k in keys}) if args.json else
          f"sol {command}: {label} {r['method']}: test MAE {r['mae_mean']:.5f} +- {r['mae_std']:.5f}, "
          f"{r['queries']} queries, {r['seconds']:.1f} s")


def _train(args) -> int:
    from deepzero_oracle.adapters.sol.data import prepare_data
    from deepzero_oracle.adapters.sol.methods import build_corrector, check_resumable
    from deepzero_oracle.adapters.sol.solver import open_solver
    from deepzero_oracle.blackbox.spec import BlackBoxSpec
    from deepzero_oracle.parallel import InlineExecutor, open_executor
    from deepzero_oracle.parallel.payloads import to_bytes

    out = Path(args.out)
    if args.solver:
        BlackBoxSpec.parse(args.solver)  # a malformed spec fails before the data is read
    saved = _saved_config(out)
    cfg = _recipe(args, saved)
    traj, path = _data(args, out, saved, cfg.unroll)
    with open_executor(args.executor) as pool, open_solver(args.solver, traj, timeout=args.timeout) as solver:
        # every check before anything is written: FO-SOL's gradient path, the corrector
        if args.method == "fo-sol":
            solver.gradient_step(traj)
        if args.method == "zo-sol" and not isinstance(pool, InlineExecutor):
            to_bytes(solver, pool)  # the workers call the solver: refuse one that cannot travel there, now
        if args.method != "src":
            build_corrector(cfg, prepare_data(traj))
            if not args.restart:
                check_resumable(cfg, args.method, traj, solver, out / args.method)
        write_config(out, cfg, traj, path)
        r = run_method(cfg, args.method, out, traj, solver, progress=progress_of(args), restart=args.restart,
                       executor=pool, max_queries=args.max_queries)
    if r.get("stopped_reason"):
        if args.json:
            print(json.dumps({k: r[k] for k in ("method", "step", "oracle_queries", "stopped_reason")}))
        print(budget_message("sol train", r["stopped_reason"], r["oracle_queries"], out / args.method),
              file=sys.stderr)
        return EXIT_BUDGET
    _print_result(args, traj.label, r, "train")
    return 0


def _eval(args) -> int:
    from deepzero_oracle.adapters.sol.solver import BUILTIN, open_solver

    out = Path(args.out)
    saved = _saved_config(out)
    run = out / args.method
    if not saved or not (run / "train.json").exists():
        raise FileNotFoundError(f"no trained {args.method} in {run}; run `sol train --method {args.method}` first")
    cfg = _recipe(args, saved)
    traj, _ = _data(args, out, saved, None)
    summary = json.loads((run / "train.json").read_text())
    spec = args.solver or (None if summary.get("solver", BUILTIN) == BUILTIN else summary["solver"])
    with open_solver(spec, traj, timeout=args.timeout) as solver:
        r = _evaluate(cfg, args.method, traj, solver, run, summary)
    _print_result(args, traj.label, r, "eval")
    return 0


def report(out, *, plots: bool = True) -> dict:
    """Collect ``<out>/<method>/eval.json``; write ``report.md``, ``report.json`` and plots
    (``adapters/sol/report.py``: MAE with 95% intervals at several horizons, paired tests).

    Returns:
        ``{method: {"mae_mean", "mae_std", "mae_ci95", "queries", "seconds", "horizons": {...}}}``
        in `METHODS` order.
    """
    from deepzero_oracle.adapters.sol.report import report as write_report

    label = _saved_config(Path(out)).get("data_label", Path(out).name)
    return write_report(out, plots=plots, train_steps=_train_length(Path(out)), title=f"SOL comparison: {label}")


def _train_length(out: Path) -> int | None:
    """Steps of the comparison's training trajectories (the horizon SOL trained on), if known."""
    from deepzero_oracle.adapters.sol.trajectories import load_trajectories

    saved = _saved_config(out)
    path = out / saved["data"] if saved.get("data") else out / TRAJECTORIES
    return load_trajectories(path).train_states.shape[1] - 1 if path.exists() else None


def _run_sol(argv: list[str]) -> None:
    run_subcommand(register, ["sol", *argv])


def _compare(args) -> int:
    """Run the whole comparison once per seed in ``OUT/seed-S`` (generate unless --data, then
    train every method), then report each seed and all seeds pooled in ``OUT``."""
    from deepzero_oracle.adapters.sol.methods import METHODS
    from deepzero_oracle.adapters.sol.report import pooled_report

    seeds = int_list(args.seeds, "--seeds")
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    common = [*progress_flags(args), *(["--restart"] if args.restart else [])]
    recipe = given_flags(args, _recipe_flags)
    folders = {}
    for seed in seeds:
        folder = out / f"seed-{seed}"
        if not args.data:
            _run_sol(["generate", "--out", str(folder), "--seed", str(seed), *common,
                      *given_flags(args, _scenario_flags)])
        for m in methods:
            data = ["--data", str(args.data)] if args.data else []
            solver = ["--solver", args.solver, "--timeout", str(args.timeout)] if args.solver else []
            _run_sol(["train", "--out", str(folder), "--method", m, "--seed", str(seed), *data, *solver,
                      "--executor", args.executor, *recipe, *common])
        folders[seed] = folder
    result = pooled_report(out, folders, train_steps=_train_length(folders[seeds[0]]))
    print(json.dumps(result["pooled"]) if args.json else (out / "report.md").read_text())
    return 0


def _report(args) -> int:
    table = report(args.out, plots=True)
    if args.json:
        print(json.dumps(table))
    else:
        print((Path(args.out) / "report.md").read_text())
    return 0


# ---------------------------------------------------------------------- parsers
def _solver_flags(p, what: str, default: str) -> None:
    from deepzero_oracle.blackbox.spec import SPEC_FORMS

    p.add_argument("--solver", default=None, metavar="SPEC",
                   help=f"the source solver f(state [N, C, H, W], params [N, K]) -> [N, C, H, W] that {what}: "
                        f"{', '.join(SPEC_FORMS)} (default: {default})")
    add_timeout(p, 120.0, "solver call")


def _scenario_flags(p) -> None:
    """A built-in scenario's size flags (``sol generate`` and ``sol compare``)."""
    from deepzero_oracle.adapters.sol.builtin import SIZES

    p.add_argument("--scenario", choices=tuple(SIZES), default=None, help="built-in scenario (default burgers)")
    p.add_argument("--size", choices=("tiny", "small", "full"), default=None,
                   help="scenario size preset (default small: burgers 16^2, wake2d 16x32)")
    p.add_argument("--n-train", dest="n_train", type=int, default=None, help="training simulations (default 16)")
    p.add_argument("--n-test", dest="n_test", type=int, default=None, help="test simulations (default 16)")
    p.add_argument("--train-steps", dest="train_steps", type=int, default=None,
                   help="reference steps per training simulation (default 32)")
    p.add_argument("--test-steps", dest="test_steps", type=int, default=None,
                   help="reference steps per test simulation (default 64: rollouts twice the training length)")


def _recipe_flags(p) -> None:
    """The training recipe's flags (``sol train`` and ``sol compare``)."""
    from deepzero_oracle.adapters.sol.data import LR_SCHEDULES, SOLConfig

    d = SOLConfig()
    p.add_argument("--corrector", default=None, metavar="MODULE:FACTORY",
                   help="your corrector: factory(channels, n_params) -> nn.Module with forward(state [B, C, H, W], "
                        "param_fields [B, K, H, W]) -> correction [B, C, H, W] (default: the built-in CNN)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate of NON and FO-SOL (default {d.lr:g})")
    p.add_argument("--zo-lr", dest="zo_lr", type=float, default=None,
                   help="ZO-SOL's Adam learning rate (default lr / sqrt(1 - sparsity): a sparse estimate moves each "
                        "coordinate less per step under Adam)")
    p.add_argument("--lr-schedule", dest="lr_schedule", choices=LR_SCHEDULES, default=None,
                   help=f"cosine: decay to 0 over --steps (default {d.lr_schedule})")
    p.add_argument("--unroll", type=int, default=None, help=f"n of SOL-n, solver steps per window (default {d.unroll})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help=f"training windows per step (default {d.batch_size})")
    p.add_argument("--hidden", type=int, default=None, help=f"corrector channels (default {d.hidden})")
    p.add_argument("--depth", type=int, default=None, help=f"corrector conv layers (default {d.depth})")
    p.add_argument("--kernel", type=int, default=None, help=f"corrector kernel size (default {d.kernel})")
    p.add_argument("--sparsity", type=float, default=None, help=f"zo-sol gradient sparsity (default {d.sparsity})")
    p.add_argument("--redraw-every", dest="redraw_every", type=int, default=None,
                   help=f"steps between redraws of the sparse coordinates (default {d.redraw_every})")
    p.add_argument("--mu", type=float, default=None, help=f"CGE finite-difference step (default {d.mu:g})")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=steps_count, default=None,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sol`` with ``generate``, ``train``, ``eval`` and ``report`` to an argparse subparsers object.

    Returns the ``sol`` parser; each leaf sets ``func(args) -> exit code``.
    """
    from deepzero_oracle.adapters.sol.data import SOLConfig
    from deepzero_oracle.adapters.sol.methods import METHODS

    d = SOLConfig()
    sol = add_command(subparsers, "sol", "solver-in-the-loop correctors: SRC / NON / FO-SOL / ZO-SOL")
    sub = sol.add_subparsers(dest="sol_command", required=True, metavar="COMMAND")

    gen = add_command(sub, "generate", f"trajectories of a built-in scenario (OUT/{TRAJECTORIES})")
    add_run_folder(gen, "comparison")
    _scenario_flags(gen)
    gen.add_argument("--seed", type=int, default=None, help="cases are drawn with seed+1 (train), seed+2 (test) (default 0)")
    add_json(gen)
    add_quiet(gen)
    gen.set_defaults(func=_generate)

    train = add_command(sub, "train", "train one method's corrector (continues OUT/METHOD), then evaluate it")
    add_run_folder(train, "comparison")
    train.add_argument("--method", choices=METHODS, required=True, help="which corrector")
    train.add_argument("--data", default=None, metavar="FILE.npz",
                       help=f"SOL trajectories file (default: the folder's, or OUT/{TRAJECTORIES} from `sol generate`)")
    _solver_flags(train, "rolls out evaluation, computes NON's pairs and answers ZO-SOL's queries "
                         "(FO-SOL: MODULE:FUNCTION differentiable by torch)",
                  "the built-in scenario's in-process step, for data from `sol generate`")
    _recipe_flags(train)
    train.add_argument("--seed", type=int, default=None, help=f"seeds the corrector init and windows (default {d.seed})")
    add_max_queries(train, "oracle queries (one per loss evaluated: ZO-SOL's perturbed rollouts through the "
                           "solver; NON and FO-SOL one per step)")
    add_executor(train, "ZO-SOL's queries (each step's rollouts split into one block per worker)")
    add_json(train)
    add_quiet(train)
    train.set_defaults(func=_train)

    ev = add_command(sub, "eval", "re-evaluate a trained method on the test trajectories")
    ev.add_argument("--out", required=True, help="comparison folder")
    ev.add_argument("--method", choices=METHODS, required=True, help="which corrector")
    _solver_flags(ev, "rolls out evaluation", "the one the method was trained with")
    add_json(ev)
    add_quiet(ev)
    ev.set_defaults(func=_eval)

    cmp_ = add_command(sub, "compare", "the whole comparison over several seeds: per seed and pooled, with "
                                       "intervals and paired tests (OUT/seed-S/, OUT/report.md)")
    add_run_folder(cmp_, "comparison")
    cmp_.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated: each seeds the data (built-in "
                      "scenarios), the corrector init and the windows")
    cmp_.add_argument("--methods", default=",".join(METHODS), help="methods to train, comma-separated")
    cmp_.add_argument("--data", default=None, metavar="FILE.npz",
                      help="your trajectories (the same for every seed); default: a built-in scenario per seed")
    _solver_flags(cmp_, "answers every method", "the built-in scenario's in-process step")
    _scenario_flags(cmp_)
    _recipe_flags(cmp_)
    add_executor(cmp_, "ZO-SOL's queries (each `sol train` opens it anew)")
    add_json(cmp_)
    add_quiet(cmp_)
    cmp_.set_defaults(func=_compare)

    rep = add_command(sub, "report", "markdown table + plots of all evaluated methods in OUT")
    rep.add_argument("--out", required=True, help="comparison folder")
    add_json(rep)
    rep.set_defaults(func=_report)
    return sol
