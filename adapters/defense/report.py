"""The defense report: certified accuracy per method with exact 95% intervals, and paired tests.

Certified accuracy at radius r is the share of test images certified correctly with radius at
least r (abstentions count as wrong), with a Clopper-Pearson interval over the images. Between
two methods certified on the same images, an exact McNemar test (a binomial test on the images
only one of them certifies at r) says whether the difference is more than chance.

- :func:`report_folder` is ``defense report``: the certified runs under a folder (or its
  ``seed-S/`` folders, reported per seed and pooled) into ``report.md`` and a plot;
  :func:`report_runs` and :func:`pooled_report` build its table and markdown.
- :func:`summarize`, :func:`summary_markdown`, :func:`plot_with_bands`: the table with intervals
  and paired tests, as JSON and markdown, and the curve with its bands.
- :func:`certified_accuracy_markdown`, :func:`plot_certified_curve`: the plain table and curve.

Every number is computed from the per-example logs (:mod:`.certification`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import numpy as np

from deepzero_oracle.extras import require
from deepzero_oracle.runs import write_text
from deepzero_oracle.stats import paired_sign_test, proportion_interval

from deepzero_oracle.adapters.defense.certification import (CERTIFY_METHODS, DEFAULT_RADII, LogLike,
                                                            certified_accuracy, log_rows)

__all__ = ["Report", "report_folder", "report_runs", "pooled_report", "outcomes", "pool_seeds", "summarize",
           "summary_markdown", "plot_with_bands", "certified_accuracy_markdown", "plot_certified_curve"]

_ORDER = {m: i for i, m in enumerate(CERTIFY_METHODS)}


class Report(NamedTuple):
    """What :func:`report_folder` made: the JSON table, the markdown text and where both went."""

    table: dict
    markdown: str
    markdown_path: Path
    plot_path: Path


def report_folder(out: str | Path, runs: list[str] | None = None, *, markdown: str | Path | None = None,
                  plot: str | Path | None = None) -> Report:
    """``defense report``: the certified runs under ``out`` (``*/certify.json``), or the explicit
    run folders ``runs``, as a table (:func:`report_runs`); a folder of ``seed-S/`` folders (one
    comparison per seed) is reported per seed and pooled (:func:`pooled_report`). Writes the
    markdown to ``markdown`` (default ``out/report.md``) and the curves with their 95% bands to
    ``plot`` (default ``out/certified_accuracy.png``)."""
    root = Path(out)
    seeds = {} if runs else _seed_folders(root)
    if seeds:
        table, md, logs = pooled_report(seeds)
    else:
        table, md, logs = report_runs(_runs(root, runs))
    md_path = write_text(Path(markdown) if markdown else root / "report.md", md)
    plot_path = Path(plot) if plot else root / "certified_accuracy.png"
    plot_with_bands(logs, plot_path)
    return Report(table, md, md_path, plot_path)


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
                   for row in log_rows(logs_by_seed[seed][name])]
            for name in names}


def summarize(logs: Mapping[str, object], radii, queries: Mapping[str, int] | None = None) -> dict:
    """``{name: {"0.0": accuracy, ..., "queries", "n_images", "ci95": {r: [lo, hi]},
    "vs": {other: {r: {"p", "a_only", "b_only", "n"}}}}}`` for logs ``{name: path or rows}``.

    Paired tests use the images both logs certified (``n``); ``a_only`` counts images only this
    method certifies at r.
    """
    outs = {name: outcomes(log_rows(log), radii) for name, log in logs.items()}
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

    rows_by = {name: log_rows(log) for name, log in logs.items()}
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


def certified_accuracy_markdown(
    logs_by_method: Mapping[str, LogLike],
    radii: Iterable[float] = DEFAULT_RADII,
    *,
    queries: Mapping[str, int] | None = None,
) -> str:
    """A markdown table of certified accuracy (%) by radius, one row per method.

    Args:
        logs_by_method: ``{method name: log path | rows | CertifyRun}``.
        radii: radii for the columns.
        queries: optional ``{method: queries spent}`` (e.g. training queries) for an extra column.
    Returns:
        the table as a string (header, separator, one line per method; two decimals, as the
        published tables).
    """
    radii = list(radii)
    head = ["method", "examples"] + [f"r = {r:g}" for r in radii]
    if queries is not None:
        head.append("queries")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for method, log in logs_by_method.items():
        rows = log_rows(log)
        acc = certified_accuracy(rows, radii)
        cells = [str(method), str(len(rows))] + [f"{100 * acc[float(r)]:.2f}" for r in radii]
        if queries is not None:
            q = queries.get(method)
            cells.append(f"{q:,}" if q is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_certified_curve(
    logs_by_method: Mapping[str, LogLike],
    path: str | os.PathLike,
    *,
    max_radius: float | None = None,
    title: str | None = None,
) -> Path:
    """Plot certified accuracy against radius, one curve per method, and save it.

    Uses matplotlib's object API with the Agg canvas, so it never touches the global pyplot
    backend and works headless.

    Args:
        logs_by_method: ``{method name: log path | rows | CertifyRun}``.
        path: output image file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        max_radius: right end of the x axis (default: 5% past the largest radius in any log).
        title: optional plot title.
    Returns:
        the path written.
    """
    Figure = require("apps", "matplotlib.figure", "matplotlib.backends.backend_agg", feature="plotting").Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    all_rows = {m: log_rows(log) for m, log in logs_by_method.items()}
    if not all_rows:
        raise ValueError("nothing to plot: logs_by_method is empty")
    top = max((float(r["radius"]) for rows in all_rows.values() for r in rows), default=0.0)
    right = max_radius if max_radius is not None else max(top * 1.05, 0.1)
    grid = np.linspace(0.0, right, 400)

    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, rows in all_rows.items():
        acc = certified_accuracy(rows, grid)
        ax.plot(grid, [acc[float(r)] for r in grid], label=str(method))
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _runs(root: Path, runs: list[str] | None) -> list[Path]:
    dirs = [Path(r) for r in runs] if runs else sorted(p.parent for p in root.glob("*/certify.json"))
    missing = [str(d) for d in dirs if not (d / "certify.json").exists() or not (d / "certify.tsv").exists()]
    if missing:
        raise FileNotFoundError(f"no certify.json/certify.tsv in {', '.join(missing)}: run `defense certify` there")
    if not dirs:
        raise FileNotFoundError(f"no certified runs under {root} (looked for */certify.json)")
    return dirs


def report_runs(dirs: list[Path], radii=DEFAULT_RADII) -> tuple[dict, str, dict]:
    """Collect certified runs.

    Args:
        dirs: run folders holding ``certify.tsv`` and ``certify.json``.
        radii: the table's radii.
    Returns:
        ``(table_json, markdown, logs)``: ``{name: {"0.0": acc, ..., "queries": n, "n_images",
        "ci95": {r: [lo, hi]}, "vs": {other: {r: {"p", "a_only", "b_only", "n"}}}}}`` (accuracy in
        [0, 1] with its exact 95% interval, queries = training queries, exact McNemar tests
        against every method certified on the same images), the
        markdown text, and ``{name: log path}``. ``name`` is the method, or ``method (folder)``
        when two folders hold the same method.
    """
    infos = [(d, json.loads((d / "certify.json").read_text())) for d in dirs]
    infos.sort(key=lambda t: (_ORDER.get(t[1]["method"], 99), str(t[0])))
    counts: dict[str, int] = {}
    for _, info in infos:
        counts[info["method"]] = counts.get(info["method"], 0) + 1
    logs, queries, extra = {}, {}, []
    for d, info in infos:
        name = info["method"] if counts[info["method"]] == 1 else f"{info['method']} ({d.name})"
        logs[name] = d / "certify.tsv"
        queries[name] = int(info["training_queries"])
        extra.append(f"| {name} | {info['training_blackbox_images']:,} | {info['sigma']:g} | {info['n']:,} | "
                     f"{info['alpha']:g} | {info['samples_per_second']:,.0f} |")
    table = summarize(logs, radii, queries)
    md = ("Certified accuracy (%) by L2 radius with exact 95% intervals over the test images; queries = oracle "
          "queries spent in training.\n\n")
    md += summary_markdown(table, radii)
    md += ("\n| method | training black-box images | sigma | n | alpha | certify samples/s |\n"
           "|---|---:|---:|---:|---:|---:|\n" + "\n".join(extra) + "\n")
    return table, md, logs


def pooled_report(seed_dirs: dict[int, list[Path]], radii=DEFAULT_RADII) -> tuple[dict, str, dict]:
    """Report a comparison run once per seed: each seed as :func:`report_runs` does, then all seeds
    pooled (every seed's images counted, paired tests pairing the same (seed, image)).

    Args:
        seed_dirs: ``{seed: run folders}`` (e.g. ``ROOT/seed-S/METHOD``).
    Returns:
        ``({"seeds": {seed: table}, "pooled": table}, markdown, {name: pooled rows})``; tables as
        :func:`report_runs`'s, the pooled ``queries`` being the mean over seeds. Methods missing from
        some seed are left out of the pool (and named in the markdown).
    """
    per_seed = {seed: report_runs(dirs, radii) for seed, dirs in seed_dirs.items()}
    logs = pool_seeds({seed: logs for seed, (_, _, logs) in per_seed.items()})
    queries = {name: round(sum(t[name]["queries"] for t, _, _ in per_seed.values()) / len(per_seed))
               for name in logs}
    table = summarize(logs, radii, queries)
    seeds = ", ".join(map(str, seed_dirs))
    md = (f"Pooled over seeds {seeds}: certified accuracy (%) with exact 95% intervals over every seed's test "
          "images; paired tests pair the same image under the same seed; queries = mean training queries per "
          "seed.\n\n" + summary_markdown(table, radii))
    left_out = sorted({n for t, _, _ in per_seed.values() for n in t} - set(logs))
    if left_out:
        md += f"\nNot pooled (not certified under every seed): {', '.join(left_out)}.\n"
    for seed, (_, seed_md, _) in per_seed.items():
        md += f"\n## Seed {seed}\n\n{seed_md}"
    return {"seeds": {str(s): t for s, (t, _, _) in per_seed.items()}, "pooled": table}, md, logs


def _seed_folders(root: Path) -> dict[int, list[Path]]:
    """``{S: run folders}`` for ``root/seed-S/*/certify.json``, when ``root`` holds no run itself."""
    if any(root.glob("*/certify.json")):
        return {}
    found = {}
    for folder in sorted(root.glob("seed-*")):
        if folder.is_dir() and folder.name[5:].isdigit() and any(folder.glob("*/certify.json")):
            found[int(folder.name[5:])] = _runs(folder, None)
    return dict(sorted(found.items()))
