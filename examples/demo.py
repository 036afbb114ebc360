"""`make demo`: train the digits CNN by zeroth-order CGE only, beside the autograd (FO) baseline
with the same recipe; print a table and write plots under --out."""

import argparse
import json
from pathlib import Path

from deepzero_oracle.apps.classify import Recipe, plot_curves, train_classifier


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for estimator in ("fo", "cge"):
        print(f"== {estimator}: digits CNN, {args.epochs} epochs")
        recipe = Recipe(dataset="digits", model="cnn", estimator=estimator, sparsity=0.0, epochs=args.epochs)
        results[estimator] = train_classifier(recipe, out / estimator, resume=False)
    plot_curves({k: v["history"] for k, v in results.items()}, out / "accuracy_vs_queries.png")
    print("\n| method | test accuracy | queries | seconds |\n|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['test_accuracy']:.4f} | {m['queries']:,} | {m['seconds']:.1f} |")
    summary = {k: {f: v[f] for f in ("test_accuracy", "queries", "seconds")} for k, v in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nplots: {out}/accuracy_vs_queries.png, {out}/<method>/curves.png; metrics: {out}/summary.json")


if __name__ == "__main__":
    main()
