"""``deepzero-oracle sol generate | train | eval | report``: solver-in-the-loop correctors from the shell.

``register(subparsers)`` adds the commands (the ``deepzero-oracle`` entry point does). Layout of
``--out DIR`` (one comparison):
``config.json`` (the `SOLConfig`), ``data/`` (cached cases, reference trajectories, NON pairs),
``<method>/checkpoint.pt``, ``<method>/train.json``, ``<method>/eval.json``, and after ``report``:
``report.md``, ``report.json``, ``error_over_time.png``, ``snapshot.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from deepzero_oracle.apps.options import add_command, add_json, add_quiet, add_run_folder
from deepzero_oracle.atomic import write_json, write_text

__all__ = ["register", "report", "open_solver", "run_method"]


def _config(args):
    """Config from ``--out/config.json`` if present, overridden by flags given explicitly."""
    from deepzero_oracle.adapters.sol.data import SOLConfig

    out = Path(args.out)
    base = SOLConfig.from_dict(json.loads((out / "config.json").read_text())) if (out / "config.json").exists() \
        else SOLConfig()
    fields = base.to_dict()
    for k in fields:
        v = getattr(args, k, None)
        if v is not None:
            fields[k] = v
    cfg = SOLConfig.from_dict(fields).check()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) != cfg.to_dict():
        old = json.loads((out / "config.json").read_text())
        changed = {k for k in cfg.to_dict() if old.get(k) != cfg.to_dict()[k]}
        if changed & {"scenario", "size", "n_train", "n_test", "train_steps", "test_steps", "seed"}:
            raise ValueError(f"{out} holds a comparison with different data settings ({sorted(changed)}); "
                             "use another --out")
    write_json(out / "config.json", cfg.to_dict(), indent=1)
    return cfg


@contextlib.contextmanager
def open_solver(spec: str | None):
    """``None``/``"local"`` -> None (in-process); ``grpc://host:port`` -> a `GrpcBlackBox` (closed on exit)."""
    if not spec or spec == "local":
        yield None
        return
    if not spec.startswith("grpc://"):
        raise ValueError(f"--solver must be 'local' or grpc://host:port, got {spec!r}")
    from deepzero_oracle.blackbox.grpc import GrpcBlackBox

    box = GrpcBlackBox(spec[len("grpc://"):], timeout=120)
    try:
        yield box
    finally:
        box.close()


def run_method(cfg, method: str, out, *, solver=None, progress: bool = True, restart: bool = False) -> dict:
    """Train (if needed) and evaluate one method; writes ``<out>/<method>/eval.json``.

    Args:
        cfg: `SOLConfig`; method: ``src|non|fo-sol|zo-sol``; out: comparison folder.
        solver: ZO-SOL's black box (None: in-process).
    Returns:
        ``{"mae_mean", "mae_std", "queries", "seconds", "mae_over_time", "diverged"}``.
    """
    from deepzero_oracle.adapters.sol.data import prepare_data
    from deepzero_oracle.adapters.sol.methods import train_method

    data = prepare_data(cfg, out, progress=progress)
    run = Path(out) / method
    summary = train_method(cfg, method, data, run, solver=solver, progress=progress, restart=restart)
    return _evaluate(cfg, method, data, run, summary)


def _evaluate(cfg, method, data, run, summary):
    import numpy as np

    from deepzero_oracle.adapters.sol.methods import evaluate_method

    ev = evaluate_method(cfg, method, data, run)
    result = {"method": method, "mae_mean": ev["mae_mean"], "mae_std": ev["mae_std"],
              "queries": int(summary["queries"]), "solver_calls": int(summary["solver_calls"]),
              "seconds": float(summary["seconds"]), "steps": int(summary["step"]),
              "mae_per_sim": ev["mae_per_sim"], "mae_over_time": ev["mae_over_time"], "diverged": ev["diverged"]}
    write_json(Path(run) / "eval.json", result, indent=1)
    np.savez_compressed(Path(run) / "snapshot.npz", **ev["snapshot"])
    return result


def _generate(args) -> int:
    import shutil

    from deepzero_oracle.adapters.sol.data import prepare_data

    from deepzero_oracle.adapters.sol.methods import METHODS

    out = Path(args.out)
    if args.restart:  # a new comparison: remove only what `sol` itself wrote there
        for name in ("data", *METHODS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("config.json", "report.md", "report.json", "error_over_time.png", "snapshot.png"):
            (out / name).unlink(missing_ok=True)
    cfg = _config(args)
    data = prepare_data(cfg, args.out, progress=not args.quiet)
    info = {"scenario": cfg.scenario, "size": cfg.size, "train_states": list(data.train_ref.shape),
            "test_states": list(data.test_ref.shape), "data": str(Path(args.out) / "data")}
    print(json.dumps(info) if args.json else
          f"sol generate: {cfg.scenario} ({cfg.size}): train {data.train_ref.shape}, test {data.test_ref.shape} "
          f"in {info['data']}")
    return 0


def _summary_line(cfg, r) -> str:
    return (f"{cfg.scenario} {r['method']}: test MAE {r['mae_mean']:.5f} +- {r['mae_std']:.5f}, "
            f"{r['queries']} queries, {r['seconds']:.1f} s")


def _print_result(args, cfg, r, command: str) -> None:
    keys = ("method", "mae_mean", "mae_std", "queries", "solver_calls", "seconds", "steps", "diverged")
    print(json.dumps({k: r[k] for k in keys}) if args.json else f"sol {command}: {_summary_line(cfg, r)}")


def _train(args) -> int:
    cfg = _config(args)
    with open_solver(args.solver) as box:
        if box is not None and args.method != "zo-sol":
            print("sol train: --solver only applies to zo-sol (the others need no solver queries or "
                  "need the differentiable in-process solver)", file=sys.stderr)
        r = run_method(cfg, args.method, args.out, solver=box, progress=not args.quiet, restart=args.restart)
    _print_result(args, cfg, r, "train")
    return 0


def _eval(args) -> int:
    from deepzero_oracle.adapters.sol.data import prepare_data

    cfg = _config(args)
    run = Path(args.out) / args.method
    if not (run / "train.json").exists():
        raise FileNotFoundError(f"no trained {args.method} in {run}; run `sol train --method {args.method}` first")
    summary = json.loads((run / "train.json").read_text())
    r = _evaluate(cfg, args.method, prepare_data(cfg, args.out), run, summary)
    _print_result(args, cfg, r, "eval")
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
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    lines = [f"# SOL comparison: {cfg.get('scenario', '?')} ({cfg.get('size', '?')})", "",
             "| method | test MAE (mean +- std over test sims) | queries | wall time (s) |", "|---|---|---|---|"]
    for m, r in table.items():
        lines.append(f"| {m.upper()} | {r['mae_mean']:.5f} +- {r['mae_std']:.5f} | {r['queries']:,} | {r['seconds']:.1f} |")
    if {"src", "fo-sol", "zo-sol"} <= set(table):
        gap = table["src"]["mae_mean"] - table["fo-sol"]["mae_mean"]
        if gap > 0:
            closed = (table["src"]["mae_mean"] - table["zo-sol"]["mae_mean"]) / gap
            lines += ["", f"ZO-SOL closes {100 * closed:.0f}% of the SRC -> FO-SOL gap (DeepZero: 58%)."]
    lines += ["", "MAE: mean |corrected source - down-sampled reference| over cells, channels and all test "
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
    vmax = float(np.abs(snap["reference"][0]).max())
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


def _common(p, *, method: bool = False, restart: bool = True):
    from deepzero_oracle.adapters.sol.data import SIZES, SOLConfig
    from deepzero_oracle.adapters.sol.methods import METHODS

    d = SOLConfig()
    if restart:
        add_run_folder(p, "comparison")
    else:
        p.add_argument("--out", required=True, help="comparison folder (config, data, one subfolder per method)")
    p.add_argument("--scenario", choices=tuple(SIZES), default=None,
                   help=f"built-in scenario (default {d.scenario}, or the folder's)")
    p.add_argument("--size", choices=("tiny", "small", "full"), default=None,
                   help=f"scenario size preset (default {d.size}: burgers 16^2, wake2d 16x32; or the folder's)")
    p.add_argument("--n-train", dest="n_train", type=int, default=None,
                   help=f"training simulations (default {d.n_train})")
    p.add_argument("--n-test", dest="n_test", type=int, default=None, help=f"test simulations (default {d.n_test})")
    p.add_argument("--train-steps", dest="train_steps", type=int, default=None,
                   help=f"reference steps per training simulation (default {d.train_steps})")
    p.add_argument("--test-steps", dest="test_steps", type=int, default=None,
                   help=f"rollout steps per test simulation (default {d.test_steps})")
    p.add_argument("--seed", type=int, default=None, help=f"seeds data, corrector init and windows (default {d.seed})")
    add_json(p)
    add_quiet(p)
    if method:
        p.add_argument("--method", choices=METHODS, required=True, help="which corrector")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sol`` with ``generate``, ``train``, ``eval`` and ``report`` to an argparse subparsers object.

    Returns the ``sol`` parser; each leaf sets ``func(args) -> exit code``.
    """
    from deepzero_oracle.adapters.sol.data import LR_SCHEDULES, SOLConfig

    d = SOLConfig()
    sol = add_command(subparsers, "sol", "solver-in-the-loop correctors: SRC / NON / FO-SOL / ZO-SOL")
    sub = sol.add_subparsers(dest="sol_command", required=True, metavar="COMMAND")

    gen = add_command(sub, "generate", "cases and reference trajectories (cached in OUT/data)")
    _common(gen)
    gen.set_defaults(func=_generate)

    train = add_command(sub, "train", "train one method's corrector (continues OUT/METHOD), then evaluate it")
    _common(train, method=True)
    train.add_argument("--solver", default=None, help="zo-sol's solver: local (default) or grpc://host:port")
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
    train.set_defaults(func=_train)

    ev = add_command(sub, "eval", "re-evaluate a trained method on the test cases")
    _common(ev, method=True, restart=False)
    ev.set_defaults(func=_eval)

    rep = add_command(sub, "report", "markdown table + plots of all evaluated methods in OUT")
    rep.add_argument("--out", required=True, help="comparison folder")
    add_json(rep)
    rep.set_defaults(func=_report)
    return sol
