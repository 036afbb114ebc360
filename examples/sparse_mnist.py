"""Accuracy experiment: MNIST-5k CNN trained by sparse CGE (ZO-GraSP ratios) against FO with the
same recipe, against sparse CGE with random and uniform ratios, and against RGE given the same
query budget. Writes a markdown table, a JSON summary and a plot of test accuracy against queries.

    python examples/sparse_mnist.py --out runs/sparse-mnist            # the README's numbers
    python examples/sparse_mnist.py --out /tmp/x --epochs 1 --quick    # a smoke run
"""

import argparse
import json
from pathlib import Path

from deepzero_oracle.apps.classify import Recipe, plot_curves, train_classifier
from deepzero_oracle.apps.datasets import load_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sparse-mnist")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rge-q", type=int, default=192)
    parser.add_argument("--rge-lr", type=float, default=0.01,
                        help="RGE's noisier estimates diverge at the CGE/FO learning rate of 0.1")
    parser.add_argument("--rge-budget-epochs", type=int, default=None,
                        help="give RGE the queries the ZO-GraSP CGE run had used after this many "
                             "epochs (default: all of them) and compare with CGE at that epoch")
    parser.add_argument("--quick", action="store_true", help="FO and ZO-GraSP CGE only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = dict(dataset=args.dataset, model="cnn", epochs=args.epochs, batch_size=args.batch_size)
    runs = {
        "FO dense": Recipe(estimator="fo", **common),
        "FO, sparse gradient (ZO-GraSP ratios)": Recipe(estimator="fo", sparsity=args.sparsity, **common),
        "CGE, ZO-GraSP ratios": Recipe(estimator="cge", sparsity=args.sparsity, pruner="zo-grasp", **common),
    }
    if not args.quick:
        runs["CGE, random ratios"] = Recipe(estimator="cge", sparsity=args.sparsity, pruner="random", **common)
        runs["CGE, uniform ratios"] = Recipe(estimator="cge", sparsity=args.sparsity, pruner="uniform", **common)
    results = {}
    for name, recipe in runs.items():
        print(f"== {name}")
        slug = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        results[name] = train_classifier(recipe, out / slug)
    if not args.quick:  # RGE gets exactly the queries the ZO-GraSP CGE run used (up to an epoch)
        cge = results["CGE, ZO-GraSP ratios"]
        if args.rge_budget_epochs is not None and args.rge_budget_epochs < args.epochs:
            at = cge["history"][args.rge_budget_epochs]
            budget = at["queries"]
            results[f"CGE, ZO-GraSP ratios, after epoch {at['epoch']} (RGE's budget)"] = {
                "test_accuracy": at["test_accuracy"], "queries": budget, "seconds": at["seconds"],
                "stopped_reason": "read from the CGE run's history", "history": []}
        else:
            budget = cge["queries"]
        name = f"RGE q={args.rge_q}, lr {args.rge_lr:g}, same query budget"
        print(f"== {name} ({budget:,} queries)")
        steps_per_epoch = -(-len(load_dataset(args.dataset).x_train) // args.batch_size)
        epochs = -(-budget // ((args.rge_q + 1) * steps_per_epoch))
        recipe = Recipe(estimator="rge", q=args.rge_q, lr=args.rge_lr, max_queries=budget,
                        **{**common, "epochs": epochs})
        results[name] = train_classifier(recipe, out / f"rge-same-budget-lr{args.rge_lr:g}")
    lines = [f"{args.dataset} CNN, {args.epochs} epochs, batch {args.batch_size}, gradient sparsity "
             f"{args.sparsity:.0%} for the sparse runs", "",
             "| method | test accuracy | queries | training seconds |", "|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {100 * m['test_accuracy']:.2f}% | {m['queries']:,} | {m['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(
        {k: {f: v[f] for f in ("test_accuracy", "queries", "seconds", "stopped_reason")} for k, v in results.items()},
        indent=2))
    plot_curves({k: v["history"] for k, v in results.items() if v["history"]}, out / "accuracy_vs_queries.png")
    print(f"wrote {out}/table.md, summary.json, accuracy_vs_queries.png")


if __name__ == "__main__":
    main()
