"""``deepzero-oracle sol generate | train | eval | compare | report``: solver-in-the-loop correctors
from the shell.

``register(subparsers)`` adds the commands (the ``deepzero-oracle`` entry point does). Each command
parses its flags and calls one function of `compare.py` (``generate``, ``train``,
``evaluate_trained``, ``compare``, ``report``), which documents the comparison folder (``--out``).
Bad input (data, solver, corrector, other settings than the folder's) is refused before anything
is trained or written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepzero_oracle.common.options import (add_command, add_executor, add_json, add_max_queries, add_quiet,
                                          add_run_folder, add_timeout, budget_message, int_list, progress_of,
                                          steps_count)
from deepzero_oracle.errors import EXIT_BUDGET

from .compare import TRAJECTORIES, compare, evaluate_trained, generate, report, run_method, train, write_config

__all__ = ["register", "report", "run_method", "write_config"]  # the last three: from compare.py


# ---------------------------------------------------------------------- commands
# Each parses its flags, calls one function of `compare.py` and prints what it returned.
def _flags(args, names) -> dict:
    """``{name: value}`` of the flags ``names`` as parsed (None: not given)."""
    return {k: getattr(args, k, None) for k in names}


def _recipe_overrides(args) -> dict:
    from deepzero_oracle.adapters.sol.data import SOLConfig

    return _flags(args, SOLConfig().to_dict())


def _generate(args) -> int:
    from deepzero_oracle.adapters.sol.builtin import GENERATION_KEYS

    info = generate(args.out, restart=args.restart, progress=progress_of(args), **_flags(args, GENERATION_KEYS))
    label = info.pop("label")
    print(json.dumps(info) if args.json else
          f"sol generate: {label}: train {tuple(info['train_states'])}, test {tuple(info['test_states'])} "
          f"in {info['data']}")
    return 0


def _result_line(r, label: str, command: str, as_json: bool) -> str:
    keys = ("method", "mae_mean", "mae_std", "queries", "solver_calls", "seconds", "steps", "diverged")
    return (json.dumps({k: r[k] for k in keys}) if as_json else
            f"sol {command}: {label} {r['method']}: test MAE {r['mae_mean']:.5f} +- {r['mae_std']:.5f}, "
            f"{r['queries']} queries, {r['seconds']:.1f} s")


def _train(args) -> int:
    label, r = train(args.out, args.method, overrides=_recipe_overrides(args), data=args.data, solver=args.solver,
                     timeout=args.timeout, executor=args.executor, max_queries=args.max_queries,
                     restart=args.restart, progress=progress_of(args))
    if r.get("stopped_reason"):
        if args.json:
            print(json.dumps({k: r[k] for k in ("method", "step", "oracle_queries", "stopped_reason")}))
        print(budget_message("sol train", r["stopped_reason"], r["oracle_queries"], Path(args.out) / args.method),
              file=sys.stderr)
        return EXIT_BUDGET
    print(_result_line(r, label, "train", args.json))
    return 0


def _eval(args) -> int:
    label, r = evaluate_trained(args.out, args.method, solver=args.solver, timeout=args.timeout)
    print(_result_line(r, label, "eval", args.json))
    return 0


def _compare(args) -> int:
    from deepzero_oracle.adapters.sol.builtin import GENERATION_KEYS

    def on_result(label, r):  # each method's line goes to stderr: stdout is the pooled report
        print(_result_line(r, label, "train", False), file=sys.stderr)

    result = compare(args.out, int_list(args.seeds, "--seeds"), [m.strip() for m in args.methods.split(",")],
                     data=args.data, scenario=_flags(args, set(GENERATION_KEYS) - {"seed"}),
                     overrides=_recipe_overrides(args), solver=args.solver, timeout=args.timeout,
                     executor=args.executor, restart=args.restart, progress=progress_of(args), on_result=on_result)
    print(json.dumps(result["pooled"]) if args.json else (Path(args.out) / "report.md").read_text())
    return 0


def _report(args) -> int:
    table = report(args.out, plots=True)
    print(json.dumps(table) if args.json else (Path(args.out) / "report.md").read_text())
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
    from deepzero_oracle.adapters.sol.data import ESTIMATORS, LR_SCHEDULES, SOLConfig

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
    p.add_argument("--mu", type=float, default=None, help=f"zo-sol finite-difference step (default {d.mu:g})")
    p.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help=f"zo-sol gradient estimate: cge (coordinate-wise on the unmasked share) or rge (--q random "
                        f"directions; give --sparsity 0 for dense directions) (default {d.estimator})")
    p.add_argument("--q", type=int, default=None, help=f"rge: directions per step (default {d.q})")
    p.add_argument("--distribution", choices=("gaussian", "sphere"), default=None,
                   help=f"rge: law of the directions (default {d.distribution})")
    p.add_argument("--antithetic", action="store_true", default=None,
                   help="rge: central differences, 2q queries per step instead of q + 1")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"zo-sol: steps of linear learning-rate warm-up (default {d.warmup})")
    p.add_argument("--clip", type=float, default=None,
                   help="zo-sol: largest norm of a step's gradient estimate, longer ones scaled down (default 0: off)")
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
