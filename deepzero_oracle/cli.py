"""The ``deepzero-oracle`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from deepzero_oracle.classify import ESTIMATORS, Recipe
from deepzero_oracle.data import DATASETS
from deepzero_oracle.models import MODELS


def _train(args) -> int:
    from deepzero_oracle.classify import train_classifier

    recipe = Recipe(dataset=args.dataset, model=args.model, estimator=args.estimator,
                    sparsity=args.sparsity, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, mu=args.mu, q=args.q, max_queries=args.max_queries,
                    seed=args.seed, dtype=args.dtype)
    metrics = train_classifier(recipe, args.out, progress=not args.quiet, resume=not args.restart)
    summary = {k: metrics[k] for k in ("test_accuracy", "queries", "seconds", "estimator", "sparsity")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/metrics.json, metrics.csv, curves.png, checkpoint.pt", file=sys.stderr)
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
                       help="share of gradient coordinates left out (random per layer, redrawn every 5 epochs)")
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
