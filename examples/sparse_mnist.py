"""Accuracy experiment: MNIST-5k CNN trained by sparse CGE (ZO-GraSP ratios) against FO with the
same recipe, against sparse CGE with random and uniform ratios, and against RGE given the same
query budget. Reports test accuracy with exact 95% intervals over the test images and exact
McNemar tests (paired on the test images) against sparse CGE with ZO-GraSP ratios, per seed and
pooled over seeds. Writes a markdown table, a JSON summary and a plot of accuracy against queries.

    python examples/sparse_mnist.py --out runs/sparse-mnist --seeds 0,1,2
    python examples/sparse_mnist.py --out /tmp/x --epochs 1 --quick    # a smoke run
"""

import argparse
from pathlib import Path

import numpy as np

from deepzero_oracle.apps.classify import Recipe, plot_curves, train_classifier
from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.runs import write_json, write_text
from deepzero_oracle.stats import paired_sign_test, proportion_interval

MAIN = "CGE, ZO-GraSP ratios"


def runs_of(args, seed: int) -> dict:
    """The recipes of one seed's comparison, by name."""
    common = dict(dataset=args.dataset, model="cnn", epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    runs = {
        "FO dense": Recipe(estimator="fo", **common),
        "FO, sparse gradient (ZO-GraSP ratios)": Recipe(estimator="fo", sparsity=args.sparsity, **common),
        MAIN: Recipe(estimator="cge", sparsity=args.sparsity, pruner="zo-grasp", **common),
    }
    if not args.quick:
        runs["CGE, random ratios"] = Recipe(estimator="cge", sparsity=args.sparsity, pruner="random", **common)
        runs["CGE, uniform ratios"] = Recipe(estimator="cge", sparsity=args.sparsity, pruner="uniform", **common)
    return runs


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")


def one_seed(args, seed: int, out: Path) -> dict:
    """Train every arm of one seed; ``{name: metrics}`` (``train_classifier``'s, with ``test_correct``)."""
    results = {}
    for name, recipe in runs_of(args, seed).items():
        print(f"== seed {seed}: {name}")
        results[name] = train_classifier(recipe, out / slug(name))
    if not args.quick:  # RGE gets exactly the queries the ZO-GraSP CGE run used (up to an epoch)
        cge = results[MAIN]
        if args.rge_budget_epochs is not None and args.rge_budget_epochs < args.epochs:
            at = cge["history"][args.rge_budget_epochs]
            budget = at["queries"]
            results[f"{MAIN}, after epoch {at['epoch']} (RGE's budget)"] = {
                "test_accuracy": at["test_accuracy"], "queries": budget, "seconds": at["seconds"],
                "stopped_reason": "read from the CGE run's history", "history": []}
        else:
            budget = cge["queries"]
        name = f"RGE q={args.rge_q}, lr {args.rge_lr:g}, same query budget"
        print(f"== seed {seed}: {name} ({budget:,} queries)")
        steps_per_epoch = -(-len(load_dataset(args.dataset).x_train) // args.batch_size)
        epochs = -(-budget // ((args.rge_q + 1) * steps_per_epoch))
        recipe = Recipe(estimator="rge", q=args.rge_q, lr=args.rge_lr, max_queries=budget, dataset=args.dataset,
                        model="cnn", epochs=epochs, batch_size=args.batch_size, seed=seed)
        results[name] = train_classifier(recipe, out / f"rge-same-budget-lr{args.rge_lr:g}")
    return results


def table(results_by_seed: dict[int, dict], title: str) -> tuple[str, dict]:
    """Markdown and JSON: accuracy with its exact 95% interval over the test images (pooled over
    the seeds given), and the exact McNemar test against the main arm on the same images."""
    names = list(next(iter(results_by_seed.values())))
    rows, summary = [], {}
    for name in names:
        parts = [r[name] for r in results_by_seed.values() if name in r]
        correct = np.concatenate([p["test_correct"] for p in parts]) if all("test_correct" in p for p in parts) else None
        queries = int(np.mean([p["queries"] for p in parts]))
        seconds = float(np.mean([p["seconds"] for p in parts]))
        entry = {"test_accuracy": float(np.mean([p["test_accuracy"] for p in parts])), "queries": queries,
                 "seconds": seconds}
        acc = f"{100 * entry['test_accuracy']:.2f}%"
        if correct is not None:
            ci = proportion_interval(int(correct.sum()), len(correct))
            entry.update(ci95=[ci["low"], ci["high"]], images=len(correct))
            acc += f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
        test = "n/a"
        main_parts = [r[MAIN] for r in results_by_seed.values()]
        if correct is not None and name != MAIN:
            main_correct = np.concatenate([p["test_correct"] for p in main_parts])
            t = paired_sign_test(correct.astype(bool), main_correct.astype(bool))
            entry["vs_main"] = t
            test = f"{t['a_only']} / {t['b_only']}, p = {t['p']:.3g}"
        summary[name] = entry
        rows.append(f"| {name} | {acc} | {queries:,} | {seconds:.0f} | {test} |")
    text = "\n".join([title, "", "| method | test accuracy (exact 95% CI) | queries | training seconds | "
                      f"vs {MAIN}: images only this arm / only {MAIN} gets right, McNemar p |",
                      "|---|---|---|---|---|", *rows])
    return text, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sparse-mnist")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated: each runs the whole comparison")
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
    seeds = [int(s) for s in args.seeds.split(",")]
    by_seed = {s: one_seed(args, s, out / f"seed-{s}" if len(seeds) > 1 else out) for s in seeds}
    head = (f"{args.dataset} CNN, {args.epochs} epochs, batch {args.batch_size}, gradient sparsity "
            f"{args.sparsity:.0%} for the sparse runs")
    parts, summary = [], {}
    for s, results in by_seed.items():
        text, summary[f"seed {s}"] = table({s: results}, f"### seed {s}: {head}")
        parts.append(text)
    if len(seeds) > 1:
        text, summary["pooled"] = table(by_seed, f"### seeds {args.seeds} pooled (accuracy: mean over seeds; "
                                                 "interval and test: all (seed, image) pairs)")
        parts.append(text)
    report = "\n\n".join(parts)
    print("\n" + report)
    write_text(out / "table.md", report + "\n")
    write_json(out / "summary.json", summary)
    first = by_seed[seeds[0]]
    plot_curves({k: v["history"] for k, v in first.items() if v["history"]}, out / "accuracy_vs_queries.png")
    print(f"wrote {out}/table.md, summary.json, accuracy_vs_queries.png")


if __name__ == "__main__":
    main()
