"""``deepzero-oracle sol generate | train | eval | report``: solver-in-the-loop correctors from the shell.

Wire into the main parser with ``register(subparsers)``. Layout of ``--out DIR`` (one comparison):
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
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
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
    (Path(run) / "eval.json").write_text(json.dumps(result, indent=1))
    np.savez_compressed(Path(run) / "snapshot.npz", **ev["snapshot"])
    return result


def _generate(args) -> int:
    from deepzero_oracle.adapters.sol.data import prepare_data

    cfg = _config(args)
    data = prepare_data(cfg, args.out, progress=not args.quiet)
    print(f"sol generate: {cfg.scenario} ({cfg.size}): train {data.train_ref.shape}, test {data.test_ref.shape} "
          f"in {Path(args.out) / 'data'}")
    return 0


def _train(args) -> int:
    from deepzero_oracle.adapters.sol.methods import SolverDiverged

    cfg = _config(args)
    try:
        with open_solver(args.solver) as box:
            if box is not None and args.method != "zo-sol":
                print("sol train: --solver only applies to zo-sol (the others need no solver queries or "
                      "need the differentiable in-process solver)", file=sys.stderr)
            r = run_method(cfg, args.method, args.out, solver=box, progress=not args.quiet, restart=args.restart)
    except SolverDiverged as e:
        print(f"deepzero-oracle sol train: error: {e}", file=sys.stderr)
        return 3
    print(f"sol train: {cfg.scenario} {args.method}: test MAE {r['mae_mean']:.5f} +- {r['mae_std']:.5f}, "
          f"{r['queries']} queries, {r['seconds']:.1f} s")
    return 0


def _eval(args) -> int:
    from deepzero_oracle.adapters.sol.data import prepare_data

    cfg = _config(args)
    run = Path(args.out) / args.method
    if not (run / "checkpoint.pt").exists():
        raise FileNotFoundError(f"no checkpoint in {run}; run `sol train --method {args.method}` first")
    import torch

    summary = torch.load(run / "checkpoint.pt", weights_only=False)
    r = _evaluate(cfg, args.method, prepare_data(cfg, args.out), run, summary)
    print(f"sol eval: {cfg.scenario} {args.method}: test MAE {r['mae_mean']:.5f} +- {r['mae_std']:.5f}")
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
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(table, indent=1))
    if plots:
        _plots(out, evals)
    return table


def _plots(out: Path, evals: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, e in evals.items():
        ax.plot(np.arange(1, len(e["mae_over_time"]) + 1), e["mae_over_time"], label=m.upper())
    ax.set_xlabel("time step")
    ax.set_ylabel("MAE vs reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_over_time.png", dpi=100)
    plt.close(fig)
    best = next((m for m in ("zo-sol", "fo-sol", "non") if (out / m / "snapshot.npz").exists()), None)
    if best is None:
        return
    with np.load(out / best / "snapshot.npz") as z:
        snap = {k: z[k] for k in z.files}
    names = ["reference", "source", "corrected"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    vmax = float(np.abs(snap["reference"][0]).max())
    for ax, k in zip(axes, names):
        im = ax.imshow(snap[k][0], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(k if k != "corrected" else f"corrected ({best.upper()})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="channel 0, last test step")
    fig.savefig(out / "snapshot.png", dpi=100)
    plt.close(fig)


def _report(args) -> int:
    table = report(args.out, plots=not args.json)
    if args.json:
        print(json.dumps(table))
    else:
        print((Path(args.out) / "report.md").read_text())
    return 0


def _common(p, *, method: bool = False):
    from deepzero_oracle.adapters.sol.data import SIZES
    from deepzero_oracle.adapters.sol.methods import METHODS

    p.add_argument("--out", required=True, help="comparison folder (config, data, one subfolder per method)")
    p.add_argument("--scenario", choices=tuple(SIZES), default=None, help="default: burgers (or the folder's)")
    p.add_argument("--size", choices=("tiny", "small", "full"), default=None,
                   help="scenario size preset (default small: burgers 16^2, wake2d 16x32)")
    p.add_argument("--n-train", dest="n_train", type=int, default=None)
    p.add_argument("--n-test", dest="n_test", type=int, default=None)
    p.add_argument("--train-steps", dest="train_steps", type=int, default=None, help="reference steps per train sim")
    p.add_argument("--test-steps", dest="test_steps", type=int, default=None, help="rollout steps per test sim")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if method:
        p.add_argument("--method", choices=METHODS, required=True)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sol`` with ``generate``, ``train``, ``eval`` and ``report`` to an argparse subparsers object.

    Returns the ``sol`` parser; each leaf sets ``func(args) -> exit code``.
    """
    sol = subparsers.add_parser("sol", help="solver-in-the-loop correctors: SRC / NON / FO-SOL / ZO-SOL")
    sub = sol.add_subparsers(dest="sol_command", required=True)

    gen = sub.add_parser("generate", help="cases and reference trajectories (cached in OUT/data)")
    _common(gen)
    gen.set_defaults(func=_generate)

    train = sub.add_parser("train", help="train one method's corrector (resumes from OUT/METHOD/checkpoint.pt), then evaluate")
    _common(train, method=True)
    train.add_argument("--solver", default=None, help="zo-sol's solver: local (default) or grpc://host:port")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    train.add_argument("--lr-schedule", dest="lr_schedule", choices=("constant", "cosine"), default=None,
                       help="cosine: decay to 0 over --steps (default: constant, or the folder's)")
    train.add_argument("--unroll", type=int, default=None, help="n of SOL-n")
    train.add_argument("--batch", type=int, default=None, help="windows per step")
    train.add_argument("--hidden", type=int, default=None, help="corrector channels")
    train.add_argument("--depth", type=int, default=None, help="corrector conv layers")
    train.add_argument("--kernel", type=int, default=None)
    train.add_argument("--sparsity", type=float, default=None, help="zo-sol gradient sparsity")
    train.add_argument("--redraw-every", dest="redraw_every", type=int, default=None)
    train.add_argument("--mu", type=float, default=None, help="CGE step")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None)
    train.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="re-evaluate a trained method on the test cases")
    _common(ev, method=True)
    ev.set_defaults(func=_eval)

    rep = sub.add_parser("report", help="markdown table + plots of all evaluated methods in OUT")
    rep.add_argument("--out", required=True)
    rep.add_argument("--json", action="store_true", help="print {method: {mae_mean, mae_std, queries, seconds}}")
    rep.set_defaults(func=_report)
    return sol
