"""The defense report: certified accuracy per method with exact 95% intervals, and paired tests.

Certified accuracy at radius r is the share of test images certified correctly with radius at
least r (abstentions count as wrong), with a Clopper-Pearson interval over the images. Between
two methods certified on the same images, an exact McNemar test (a binomial test on the images
only one of them certifies at r) says whether the difference is more than chance.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from deepzero_oracle.extras import require
from deepzero_oracle.stats import paired_sign_test, proportion_interval

from .certify_log import read_log

__all__ = ["outcomes", "pool_seeds", "summarize", "summary_markdown", "plot_with_bands"]


def _rows(log) -> list[dict]:
    """A log given as a path (read) or as rows already read."""
    return log if isinstance(log, list) else read_log(log)


def outcomes(rows, radii) -> dict[str, dict[tuple[int, int], bool]]:
    """``{str(r): {(seed, image idx): certified correctly with radius >= r}}`` from a log's rows
    (``seed`` is the row's ``"seed"``, 0 when absent: pooled rows of several seeds carry it)."""
    return {str(float(r)): {(int(row.get("seed", 0)), int(row["idx"])): bool(int(row["correct"]))
                            and float(row["radius"]) >= r for row in rows}
            for r in radii}


def pool_seeds(logs_by_seed: Mapping[int, Mapping[str, object]]) -> dict[str, list[dict]]:
    """Pool per-seed logs ``{seed: {name: path or rows}}`` into ``{name: rows}`` whose rows carry
    their ``"seed"``, so paired tests pair (seed, image) and intervals count every seed's images.

    Only names certified under every seed are pooled (a method missing from one seed would
    make the pooled methods differ in their images).
    """
    seeds = list(logs_by_seed)
    names = [n for n in logs_by_seed[seeds[0]] if all(n in logs_by_seed[s] for s in seeds)]
    return {name: [{**row, "seed": seed}
                   for seed in seeds
                   for row in _rows(logs_by_seed[seed][name])]
            for name in names}


def summarize(logs: Mapping[str, object], radii, queries: Mapping[str, int] | None = None) -> dict:
    """``{name: {"0.0": accuracy, ..., "queries", "n_images", "ci95": {r: [lo, hi]},
    "vs": {other: {r: {"p", "a_only", "b_only", "n"}}}}}`` for logs ``{name: path or rows}``.

    Paired tests use the images both logs certified (``n``); ``a_only`` counts images only this
    method certifies at r.
    """
    outs = {name: outcomes(_rows(log), radii) for name, log in logs.items()}
    table = {}
    for name, by_r in outs.items():
        row = {}
        for r, certified in by_r.items():
            row[r] = float(np.mean(list(certified.values())))
        row["queries"] = int((queries or {}).get(name, 0))
        first = next(iter(by_r.values()))
        row["n_images"] = len(first)
        row["ci95"] = {}
        for r, certified in by_r.items():
            ci = proportion_interval(sum(certified.values()), len(certified))
            row["ci95"][r] = [ci["low"], ci["high"]]
        row["vs"] = {}
        for other, other_by_r in outs.items():
            if other == name:
                continue
            shared = sorted(set(first) & set(next(iter(other_by_r.values()))))
            if not shared:
                continue
            row["vs"][other] = {}
            for r in by_r:
                t = paired_sign_test([by_r[r][i] for i in shared], [other_by_r[r][i] for i in shared])
                row["vs"][other][r] = {"p": t["p"], "a_only": t["a_only"], "b_only": t["b_only"], "n": t["n"]}
        table[name] = row
    return table


def summary_markdown(table: dict, radii) -> str:
    """Certified accuracy (%) with 95% intervals, then every pair's exact McNemar tests."""
    rs = [str(float(r)) for r in radii]
    lines = ["| method | images | " + " | ".join(f"r = {float(r):g} (95% CI)" for r in rs) + " | queries |",
             "|---|---:|" + "---:|" * len(rs) + "---:|"]
    for name, row in table.items():
        cells = " | ".join(f"{100 * row[r]:.1f} [{100 * row['ci95'][r][0]:.1f}, {100 * row['ci95'][r][1]:.1f}]"
                           for r in rs)
        lines.append(f"| {name} | {row['n_images']} | {cells} | {row['queries']:,} |")
    names = list(table)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if b in table[a]["vs"]]
    if pairs:
        lines += ["", "Paired on the images both certified (exact McNemar test): images only the first / only "
                  "the second certifies at r, and the two-sided p-value.", "",
                  "| comparison | " + " | ".join(f"r = {float(r):g}" for r in rs) + " |", "|---|" + "---|" * len(rs)]
        for a, b in pairs:
            cells = " | ".join(f"{t['a_only']} / {t['b_only']}, p = {t['p']:.3g}"
                               for t in (table[a]["vs"][b][r] for r in rs))
            lines.append(f"| {a} vs {b} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_with_bands(logs: Mapping[str, object], path, *, max_radius: float | None = None) -> None:
    """Certified accuracy against radius per method, with a 95% Clopper-Pearson band."""
    Figure = require("apps", "matplotlib.figure", feature="plotting").Figure

    rows_by = {name: _rows(log) for name, log in logs.items()}
    top = max_radius or max((max((float(r["radius"]) for r in rows), default=0.0) for rows in rows_by.values()),
                            default=1.0) or 1.0
    grid = np.linspace(0.0, top, 101)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, rows in rows_by.items():
        correct = np.array([bool(int(r["correct"])) for r in rows])
        radius = np.array([float(r["radius"]) for r in rows])
        counts = [int((correct & (radius >= g)).sum()) for g in grid]
        cis = [proportion_interval(k, len(rows)) for k in counts]
        ax.plot(grid, [c["rate"] for c in cis], label=name)
        ax.fill_between(grid, [c["low"] for c in cis], [c["high"] for c in cis], alpha=0.2)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy (95% band over images)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
