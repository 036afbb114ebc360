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
from pathlib import Path

from deepzero_oracle.apps.options import add_command, add_json, add_quiet, add_run_folder
from deepzero_oracle.atomic import write_json, write_text

__all__ = ["register", "report", "run_method", "write_config"]

TRAJECTORIES = "trajectories.npz"  # what `sol generate` writes into --out
_REPORT_FILES = ("report.md", "report.json", "error_over_time.png", "snapshot.png")


def run_method(cfg, method: str, out, trajectories, solver, *, progress: bool = True, restart: bool = False) -> dict:
    """Train (if needed) and evaluate one method of a comparison; writes ``<out>/<method>/eval.json``.

    Args:
        cfg: `SOLConfig`; method: ``src|non|fo-sol|zo-sol``; out: comparison folder.
        trajectories: the data (`Trajectories`).
        solver: a `Solver` (or a plain callable): rolls out evaluation, computes NON's pairs (cached in
            ``<out>/data``), answers ZO-SOL's queries and gives FO-SOL its torch step.
    Returns:
        ``{"method", "mae_mean", "mae_std", "queries", "solver_calls", "seconds", "steps", "mae_per_sim",
        "mae_over_time", "diverged"}``.
    """
    from deepzero_oracle.adapters.sol.data import prepare_data
    from deepzero_oracle.adapters.sol.methods import train_method

    run = Path(out) / method
    data = None if method == "src" else prepare_data(trajectories, solver, cache_dir=Path(out) / "data")
    summary = train_method(cfg, method, data, run, solver=solver, progress=progress, restart=restart)
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
              "mae_per_sim": ev["mae_per_sim"], "mae_over_time": ev["mae_over_time"], "diverged": ev["diverged"]}
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
    defaults = {"scenario": "burgers", "size": "small", "n_train": 8, "n_test": 8, "train_steps": 32,
                "test_steps": 32, "seed": 0}
    wanted = {k: getattr(args, k) if getattr(args, k) is not None else existing.get(k, defaults[k])
              for k in GENERATION_KEYS}
    if existing:
        changed = sorted(k for k in GENERATION_KEYS if existing.get(k) != wanted[k])
        if changed:
            raise ValueError(f"{path} holds trajectories generated with other settings ({changed}); use another "
                             "--out, or --restart to start this comparison over")
        traj = load_trajectories(path)
    else:
        traj = generate_trajectories(**wanted, cache_dir=out / "data", progress=not args.quiet)
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

    out = Path(args.out)
    if args.solver:
        BlackBoxSpec.parse(args.solver)  # a malformed spec fails before the data is read
    saved = _saved_config(out)
    cfg = _recipe(args, saved)
    traj, path = _data(args, out, saved, cfg.unroll)
    with open_solver(args.solver, traj, timeout=args.timeout) as solver:
        # every check before anything is written: FO-SOL's gradient path, the corrector
        if args.method == "fo-sol":
            solver.gradient_step(traj)
        if args.method != "src":
            build_corrector(cfg, prepare_data(traj))
            if not args.restart:
                check_resumable(cfg, args.method, traj, solver, out / args.method)
        write_config(out, cfg, traj, path)
        r = run_method(cfg, args.method, out, traj, solver, progress=not args.quiet, restart=args.restart)
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
    """Collect ``<out>/<method>/eval.json``; write ``report.md``, ``report.json`` and plots.

    Returns:
        ``{method: {"mae_mean", "mae_std", "queries", "seconds"}}`` in `METHODS` order.
    """
    from deepzero_oracle.adapters.sol.methods import METHODS

    out = Path(out)
    evals = {m: json.loads((out / m / "eval.json").read_text()) for m in METHODS if (out / m / "eval.json").exists()}
    if not evals:
        raise FileNotFoundError(f"no evaluated methods under {out}; run `sol train` first")
    table = {m: {k: e[k] for k in ("mae_mean", "mae_std", "queries", "seconds")} for m, e in evals.items()}
    cfg = _saved_config(out)
    lines = [f"# SOL comparison: {cfg.get('data_label', '?')}", "",
             "| method | test MAE (mean +- std over test sims) | queries | wall time (s) |", "|---|---|---|---|"]
    for m, r in table.items():
        lines.append(f"| {m.upper()} | {r['mae_mean']:.5f} +- {r['mae_std']:.5f} | {r['queries']:,} | {r['seconds']:.1f} |")
    if {"src", "fo-sol", "zo-sol"} <= set(table):
        gap = table["src"]["mae_mean"] - table["fo-sol"]["mae_mean"]
        if gap > 0:
            closed = (table["src"]["mae_mean"] - table["zo-sol"]["mae_mean"]) / gap
            lines += ["", f"ZO-SOL closes {100 * closed:.0f}% of the SRC -> FO-SOL gap (DeepZero: 58%)."]
    lines += ["", "MAE: mean |corrected source - reference| over cells, channels and all test "
              "time steps. Queries: loss evaluations at one theta (ZO-SOL only; each is a batch of unrolled "
              "solver rollouts). Wall time: training only.", f"Config: `{json.dumps(cfg)}`"]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    write_json(out / "report.json", table, indent=1)
    if plots:
        _plots(out, evals)
    return table


def _plots(out: Path, evals: dict) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m, e in evals.items():
        ax.plot(np.arange(1, len(e["mae_over_time"]) + 1), e["mae_over_time"], label=m.upper())
    ax.set_xlabel("time step")
    ax.set_ylabel("MAE vs reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_over_time.png", dpi=100)
    best = next((m for m in ("zo-sol", "fo-sol", "non") if (out / m / "snapshot.npz").exists()), None)
    if best is None:
        return
    with np.load(out / best / "snapshot.npz") as z:
        snap = {k: z[k] for k in z.files}
    names = ["reference", "source", "corrected"]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    vmax = float(np.abs(snap["reference"][0]).max()) or 1.0
    for ax, k in zip(axes, names):
        im = ax.imshow(snap[k][0], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(k if k != "corrected" else f"corrected ({best.upper()})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="channel 0, last test step")
    fig.savefig(out / "snapshot.png", dpi=100)


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
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a remote solver call may take")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sol`` with ``generate``, ``train``, ``eval`` and ``report`` to an argparse subparsers object.

    Returns the ``sol`` parser; each leaf sets ``func(args) -> exit code``.
    """
    from deepzero_oracle.adapters.sol.builtin import SIZES
    from deepzero_oracle.adapters.sol.data import LR_SCHEDULES, SOLConfig
    from deepzero_oracle.adapters.sol.methods import METHODS

    d = SOLConfig()
    sol = add_command(subparsers, "sol", "solver-in-the-loop correctors: SRC / NON / FO-SOL / ZO-SOL")
    sub = sol.add_subparsers(dest="sol_command", required=True, metavar="COMMAND")

    gen = add_command(sub, "generate", f"trajectories of a built-in scenario (OUT/{TRAJECTORIES})")
    add_run_folder(gen, "comparison")
    gen.add_argument("--scenario", choices=tuple(SIZES), default=None, help="built-in scenario (default burgers)")
    gen.add_argument("--size", choices=("tiny", "small", "full"), default=None,
                     help="scenario size preset (default small: burgers 16^2, wake2d 16x32)")
    gen.add_argument("--n-train", dest="n_train", type=int, default=None, help="training simulations (default 8)")
    gen.add_argument("--n-test", dest="n_test", type=int, default=None, help="test simulations (default 8)")
    gen.add_argument("--train-steps", dest="train_steps", type=int, default=None,
                     help="reference steps per training simulation (default 32)")
    gen.add_argument("--test-steps", dest="test_steps", type=int, default=None,
                     help="reference steps per test simulation (default 32)")
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
    train.add_argument("--corrector", default=None, metavar="MODULE:FACTORY",
                       help="your corrector: factory(channels, n_params) -> nn.Module with forward(state [B, C, H, W], "
                            "param_fields [B, K, H, W]) -> correction [B, C, H, W] (default: the built-in CNN)")
    train.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    train.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr:g})")
    train.add_argument("--lr-schedule", dest="lr_schedule", choices=LR_SCHEDULES, default=None,
                       help=f"cosine: decay to 0 over --steps (default {d.lr_schedule})")
    train.add_argument("--unroll", type=int, default=None, help=f"n of SOL-n, solver steps per window (default {d.unroll})")
    train.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                       help=f"training windows per step (default {d.batch_size})")
    train.add_argument("--hidden", type=int, default=None, help=f"corrector channels (default {d.hidden})")
    train.add_argument("--depth", type=int, default=None, help=f"corrector conv layers (default {d.depth})")
    train.add_argument("--kernel", type=int, default=None, help=f"corrector kernel size (default {d.kernel})")
    train.add_argument("--sparsity", type=float, default=None, help=f"zo-sol gradient sparsity (default {d.sparsity})")
    train.add_argument("--redraw-every", dest="redraw_every", type=int, default=None,
                       help=f"steps between redraws of the sparse coordinates (default {d.redraw_every})")
    train.add_argument("--mu", type=float, default=None, help=f"CGE finite-difference step (default {d.mu:g})")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None,
                       help=f"steps between checkpoints (default {d.checkpoint_every})")
    train.add_argument("--seed", type=int, default=None, help=f"seeds the corrector init and windows (default {d.seed})")
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

    rep = add_command(sub, "report", "markdown table + plots of all evaluated methods in OUT")
    rep.add_argument("--out", required=True, help="comparison folder")
    add_json(rep)
    rep.set_defaults(func=_report)
    return sol
