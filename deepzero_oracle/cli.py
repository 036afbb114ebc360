"""The ``deepzero-oracle`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from deepzero_oracle.classify import ESTIMATORS, Recipe
from deepzero_oracle.data import DATASETS
from deepzero_oracle.models import MODELS
from deepzero_oracle.pruning import PRUNERS


def _train(args) -> int:
    from deepzero_oracle.classify import train_classifier

    recipe = Recipe(dataset=args.dataset, model=args.model, estimator=args.estimator,
                    sparsity=args.sparsity, pruner=args.pruner, redraw_every=args.redraw_every,
                    exempt_bias_norm=args.exempt_bias_norm, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, mu=args.mu, q=args.q, max_queries=args.max_queries,
                    seed=args.seed, dtype=args.dtype)
    metrics = train_classifier(recipe, args.out, progress=not args.quiet, resume=not args.restart)
    summary = {k: metrics[k] for k in ("test_accuracy", "queries", "seconds", "estimator", "sparsity")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/metrics.json, metrics.csv, curves.png, checkpoint.pt", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from deepzero_oracle.bench import markdown, run

    report = run(batch=args.batch, loop_coords=args.loop_coords, engine_coords=args.engine_coords,
                 ablation_coords=args.ablation_coords, tiny=args.tiny, out_dir=args.out or ("benchmarks/results/tiny" if args.tiny else "benchmarks/results"))
    print(json.dumps(report, indent=2) if args.json else markdown(report["results"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="deepzero-oracle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an image classifier by zeroth-order estimates only")
    defaults = Recipe()
    train.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    train.add_argument("--model", choices=MODELS, default=defaults.model)
    train.add_argument("--estimator", choices=ESTIMATORS, default=defaults.estimator,
                       help="cge / rge: zeroth-order; fo: the autograd baseline, same recipe")
    train.add_argument("--sparsity", type=float, default=defaults.sparsity,
                       help="share of gradient coordinates left out (layer ratios from --pruner, "
                            "random coordinates redrawn every --redraw-every epochs)")
    train.add_argument("--pruner", choices=PRUNERS, default=defaults.pruner,
                       help="how layer-wise sparsity ratios are chosen")
    train.add_argument("--redraw-every", type=int, default=defaults.redraw_every)
    train.add_argument("--exempt-bias-norm", action="store_true",
                       help="keep biases and normalisation parameters dense (as the reference code did)")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--mu", type=float, default=defaults.mu, help="finite-difference step")
    train.add_argument("--q", type=int, default=defaults.q, help="RGE directions per step")
    train.add_argument("--max-queries", type=int, default=None, help="stop before exceeding this many queries")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype)
    train.add_argument("--out", required=True, help="output directory (resumes from its checkpoint)")
    train.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="coordinate-estimate throughput: engine vs the per-coordinate loop")
    bench.add_argument("--batch", type=int, default=256)
    bench.add_argument("--loop-coords", type=int, default=24,
                       help="coordinates per parameter tensor timed for the loop (0: all)")
    bench.add_argument("--engine-coords", type=int, default=0,
                       help="coordinates per parameter tensor timed for the engine's per-tensor rates (0: all)")
    bench.add_argument("--ablation-coords", type=int, default=128,
                       help="coordinates per parameter tensor timed for every ablation configuration (0: all)")
    bench.add_argument("--tiny", action="store_true", help="small inputs (what the test suite runs)")
    bench.add_argument("--out", default=None, help="where engine.json and engine.md go (default "
                       "benchmarks/results, or benchmarks/results/tiny with --tiny)")
    bench.add_argument("--json", action="store_true", help="print the JSON report to stdout")
    bench.set_defaults(func=_bench)

    from deepzero_oracle import server

    server.register(sub)

    from deepzero_oracle.adapters.sol import cli as sol_cli

    sol_cli.register(sub)

    from deepzero_oracle.adapters.defense import cli as defense_cli

    defense_cli.register(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"deepzero-oracle {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
