"""The query benchmark's report: per task and method, the final error over seeds with its
interval, the seed spread, queries to reach the targets, paired tests against the default, the
peer goal (the default's excess error at most a third of the better peer's) and error-vs-queries
curves with seed bands.

Excess error: a SOL method's test MAE minus FO-SOL's on the same seed; a classifier's test error
rate. Tests pair the seeds (each seed is the same initial model and data for every method).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

from deepzero_oracle.runs import write_json, write_text
from deepzero_oracle.stats import mean_interval

from .methods import methods_for
from .tasks import TASKS

__all__ = ["load_records", "markdown", "plot", "report", "summarize"]

GOAL_FACTOR = 3.0  # the default's excess error must be at most 1/3 of the better peer's


def load_records(out) -> list[dict]:
    """Every record `run_benchmark` wrote under ``out``."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/**/*.json"))
            if p.name.startswith(("seed-", "references-seed-"))]


def _paired_p(a, b) -> float:
    """Two-sided paired t-test of equal means (NaN with fewer than two pairs or no spread)."""
    if len(a) < 2:
        return math.nan
    d = np.asarray(a) - np.asarray(b)
    return 1.0 if not d.any() else float(sps.ttest_rel(a, b).pvalue)


def _first_reaching(curve: list[dict], target: float) -> int | None:
    return next((c["queries"] for c in curve if c["error"] is not None and c["error"] <= target), None)


def summarize(records: list[dict]) -> dict:
    """``{task: {"label", "budget", "default", "seeds", "references", "methods": {name: {...}},
    "peer_goal", "cge_vs_rge"}}`` from the records."""
    out = {}
    for name, task in TASKS.items():
        runs = [r for r in records if r.get("task") == name and "curve" in r]
        if not runs:
            continue
        refs = {r["seed"]: r["references"] for r in records if r.get("task") == name and "references" in r}
        order = [m.name for m in methods_for(task.kind)]
        by_method = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in order}
        floor = {s: refs[s]["fo-sol"] if task.kind == "sol" else 0.0
                 for s in {r["seed"] for r in runs} if task.kind != "sol" or s in refs}
        seeds = sorted(set(by_method.get(task.default) or floor) & set(floor))  # the default's seeds
        methods = {}
        for m in order:
            mine = [s for s in seeds if s in by_method[m]]
            if not mine:
                continue
            final = [by_method[m][s]["curve"][-1]["error"] for s in mine]
            curves = np.array([[c["error"] for c in by_method[m][s]["curve"]] for s in mine], dtype=float)
            row = {"seeds": mine, "final": final, "excess": [f - floor[s] for f, s in zip(final, mine)],
                   "error": mean_interval(final), "spread": max(final) / min(final) if min(final) > 0 else math.inf,
                   "marks": [c["mark"] for c in by_method[m][mine[0]]["curve"]],
                   "curve_mean": curves.mean(0).tolist(), "curve_low": curves.min(0).tolist(),
                   "curve_high": curves.max(0).tolist(),
                   "seconds": float(np.mean([by_method[m][s]["seconds"] for s in mine]))}
            row["excess_interval"] = mean_interval(row["excess"])
            if task.kind == "sol":
                targets = {"NON": {s: refs[s]["non"] for s in mine},
                           "90% of gap": {s: refs[s]["src"] - 0.9 * (refs[s]["src"] - refs[s]["fo-sol"]) for s in mine}}
                row["queries_to"] = {k: [_first_reaching(by_method[m][s]["curve"], t[s]) for s in mine]
                                     for k, t in targets.items()}
            methods[m] = row
        default = methods.get(task.default)
        for m, row in methods.items():
            row["p_vs_default"] = (_paired_p(*_common(row, default)) if default and m != task.default else None)
        out[name] = {"label": task.label, "budget": runs[0]["budget"], "kind": task.kind, "default": task.default,
                     "seeds": seeds, "references": {s: refs[s] for s in seeds if s in refs}, "methods": methods,
                     "peer_goal": _peer_goal(methods, task.default), "cge_vs_rge": _cge_vs_rge(methods)}
    return out


def _common(a: dict, b: dict) -> tuple[list[float], list[float]]:
    """The excess errors of two rows on the seeds both have, paired."""
    both = [s for s in a["seeds"] if s in b["seeds"]]
    return ([a["excess"][a["seeds"].index(s)] for s in both], [b["excess"][b["seeds"].index(s)] for s in both])


def _peer_goal(methods: dict, default: str) -> dict | None:
    """The default against the better peer (lower mean excess): the ratio of mean excess errors and
    the one-sided paired t-test of ``peer - 3 default > 0`` (the goal holds when p < 0.05)."""
    peers = [m for m in ("cma-es", "ngopt") if m in methods]
    if default not in methods or not peers:
        return None
    best = min(peers, key=lambda m: np.mean(methods[m]["excess"]))
    a, b = (np.asarray(v) for v in _common(methods[best], methods[default]))
    gap = a - GOAL_FACTOR * b
    p = float(sps.ttest_1samp(gap, 0.0, alternative="greater").pvalue) if len(gap) > 1 and gap.std() > 0 else math.nan
    ratio = float(a.mean() / b.mean()) if b.mean() > 0 else math.inf
    return {"peer": best, "ratio": ratio, "p": p, "met": bool(ratio >= GOAL_FACTOR and p < 0.05)}


def _cge_vs_rge(methods: dict) -> dict | None:
    """The best CGE method against the best RGE method (lowest mean excess), paired t-test."""
    cge = [m for m in methods if m.startswith("cge")]
    rge = [m for m in methods if m.startswith("rge")]
    if not cge or not rge:
        return None
    c = min(cge, key=lambda m: np.mean(methods[m]["excess"]))
    r = min(rge, key=lambda m: np.mean(methods[m]["excess"]))
    ce, re = np.mean(methods[c]["excess"]), np.mean(methods[r]["excess"])
    return {"cge": c, "rge": r, "cge_excess": float(ce), "rge_excess": float(re),
            "winner": "cge" if ce < re else "rge", "p": _paired_p(*_common(methods[c], methods[r]))}


def _fmt(x, digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def markdown(summary: dict) -> str:
    """The report as markdown: one table per task, then the peer goal and CGE vs RGE lines."""
    lines = []
    for name, t in summary.items():
        what = "test MAE" if t["kind"] == "sol" else "test error rate"
        lines += [f"### {t['label']}: {t['budget']:,} queries per run, seeds {', '.join(map(str, t['seeds']))}", ""]
        if t["references"]:
            refs = t["references"].values()
            lines.append("References (mean over seeds, not query-limited): " + ", ".join(
                f"{k.upper()} {np.mean([r[k] for r in refs]):.4f}" for k in ("src", "non", "fo-sol")) + ".")
            lines.append("")
        head = f"| method | seeds | final {what}, mean [95% CI] | excess error | seed spread (max/min) | p vs default |"
        extra = " queries to NON's MAE | queries to 90% of the gap |" if t["kind"] == "sol" else ""
        lines += [head + extra + " s/run |", "|---" * (7 + (2 if extra else 0)) + "|"]
        for m, row in t["methods"].items():
            e = row["error"]
            cells = [f"**{m}** (default)" if m == t["default"] else m, str(len(row["seeds"])),
                     f"{e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]", f"{row['excess_interval']['mean']:.4f}",
                     f"{row['spread']:.2f}x", _fmt(row["p_vs_default"], 2)]
            if extra:
                for k in ("NON", "90% of gap"):
                    got = [q for q in row["queries_to"][k] if q is not None]
                    cells.append(f"{int(np.median(got)):,} ({len(got)}/{len(row['queries_to'][k])})" if got else
                                 f"not reached (0/{len(row['queries_to'][k])})")
            cells.append(f"{row['seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        goal, versus = t["peer_goal"], t["cge_vs_rge"]
        if goal:
            ratio = (f"{goal['ratio']:.2f}x the default's" if math.isfinite(goal["ratio"])
                     else "above the default's, which is at or below zero")
            lines.append(f"- Default vs the better peer ({goal['peer']}): the peer's excess error is {ratio}; one-sided paired t-test of peer > {GOAL_FACTOR:g} x default: p = "
                         f"{_fmt(goal['p'], 2)} ({'met' if goal['met'] else 'not met'}).")
        if versus:
            lines.append(f"- CGE vs RGE at equal queries: best CGE {versus['cge']} {versus['cge_excess']:.4f}, best RGE "
                         f"{versus['rge']} {versus['rge_excess']:.4f} (excess); {versus['winner'].upper()} lower, "
                         f"paired t-test p = {_fmt(versus['p'], 2)}.")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    """Error against queries per task (mean over seeds, band: min to max), one panel per task."""
    from deepzero_oracle.extras import require

    Figure = require("apps", "matplotlib.figure", feature="plotting").Figure  # no pyplot: the caller's backend stays
    fig = Figure(figsize=(5.2 * len(summary), 4.2))
    axes = fig.subplots(1, len(summary), squeeze=False)
    for ax, (name, t) in zip(axes[0], summary.items()):
        for m, row in t["methods"].items():
            style = {"lw": 2.4} if m == t["default"] else {"lw": 1.2, "ls": "--" if m in ("cma-es", "ngopt") else "-"}
            (line,) = ax.plot(row["marks"], row["curve_mean"], label=m, **style)
            ax.fill_between(row["marks"], row["curve_low"], row["curve_high"], color=line.get_color(), alpha=0.12)
        if t["references"]:
            fo = np.mean([r["fo-sol"] for r in t["references"].values()])
            ax.axhline(fo, color="k", lw=0.8, ls=":", label="FO-SOL")
        ax.set(title=t["label"], xlabel="queries", ylabel="test MAE" if t["kind"] == "sol" else "test error rate")
        if t["kind"] == "sol":  # a peer that diverges would flatten every other curve
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(out) -> dict:
    """Summarize the records under ``out``; writes ``queries.md``, ``queries.json`` and ``queries.png``
    there and returns the summary."""
    out = Path(out)
    summary = summarize(load_records(out))
    if not summary:
        raise FileNotFoundError(f"no benchmark records under {out}: run the benchmark first")
    write_text(out / "queries.md", markdown(summary))
    write_json(out / "queries.json", summary, indent=1)
    plot(summary, out / "queries.png")
    return summary
