"""The SOL report: how well each method tracks the reference, and how sure we are.

For each method: the test MAE (mean |corrected source - reference| over cells and channels,
averaged over the first h time steps of every test simulation), as a mean with a 95% t
interval over test simulations, at the full test horizon and at shorter ones (SOL's advantage
is in long rollouts). Between every two methods: a Wilcoxon signed-rank test on the
per-simulation MAE (paired: the same test simulations). A comparison run over several seeds
(``sol compare --seeds``) is reported per seed and pooled, the pooled tests pairing
(seed, simulation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepzero_oracle.runs import write_json, write_text
from deepzero_oracle.extras import require
from deepzero_oracle.stats import mean_interval, paired_wilcoxon

from .methods import METHODS

__all__ = ["collect", "horizons_for", "report", "summarize", "table_markdown"]


def collect(out) -> dict[str, dict]:
    """``{method: eval.json}`` of the methods evaluated in comparison folder ``out``."""
    out = Path(out)
    evals = {m: json.loads((out / m / "eval.json").read_text()) for m in METHODS if (out / m / "eval.json").exists()}
    if not evals:
        raise FileNotFoundError(f"no evaluated methods under {out}; run `sol train` first")
    missing = [m for m, e in evals.items() if "mae_per_sim_over_time" not in e]
    if missing:
        raise ValueError(f"{out}: {', '.join(missing)} was evaluated by an older version without per-simulation "
                         f"errors over time; rerun `sol eval --out {out} --method METHOD`")
    return evals


def horizons_for(test_steps: int, train_steps: int | None = None) -> list[int]:
    """Horizons to report: the full test length, and the training trajectories' length and
    its double where they are shorter."""
    hs = {test_steps}
    if train_steps:
        hs |= {h for h in (train_steps, 2 * train_steps) if h < test_steps}
    return sorted(hs)


def summarize(errors: dict[str, np.ndarray], horizons: list[int], extra: dict[str, dict] | None = None) -> dict:
    """The report's numbers from per-simulation errors over time.

    Args:
        errors: ``{method: [n_sims, T]}`` MAE of each test simulation at each step (for pooled
            seeds, the simulations of every seed stacked, in the same order for every method).
        horizons: the h at which to average the first h steps.
        extra: per method, more fields to carry (queries, seconds, steps).
    Returns:
        ``{method: {"mae_mean", "mae_std", "mae_ci95", ..., "horizons": {"h": {"mean", "ci95",
        "vs": {other: {"p", "lower", "higher", "ties", "mean_difference"}}}}}}``; the top-level
        MAE is at the longest horizon. "lower" counts simulations where this method's MAE is
        below the other's.
    """
    per_sim = {m: {h: e[:, :h].mean(axis=1) for h in horizons} for m, e in errors.items()}
    table = {}
    for m in errors:
        rows = {}
        for h in horizons:
            ci = mean_interval(per_sim[m][h])
            vs = {}
            for other in errors:
                if other != m:
                    t = paired_wilcoxon(per_sim[m][h], per_sim[other][h])
                    vs[other] = {"p": t["p"], "lower": t["a_lower"], "higher": t["b_lower"], "ties": t["ties"],
                                 "mean_difference": t["mean_difference"]}
            rows[str(h)] = {"mean": ci["mean"], "ci95": [ci["low"], ci["high"]], "vs": vs}
        full = per_sim[m][horizons[-1]]
        table[m] = {"mae_mean": float(full.mean()), "mae_std": float(full.std()),
                    "mae_ci95": rows[str(horizons[-1])]["ci95"], "n_sims": int(len(full)),
                    **(extra or {}).get(m, {}), "horizons": rows}
    return table


def gap_closed(table: dict, horizon: str) -> float | None:
    """ZO-SOL's share of the SRC -> FO-SOL improvement at ``horizon`` (None without the three)."""
    if not {"src", "fo-sol", "zo-sol"} <= set(table):
        return None
    src, fo, zo = (table[m]["horizons"][horizon]["mean"] for m in ("src", "fo-sol", "zo-sol"))
    return (src - zo) / (src - fo) if src > fo else None


def table_markdown(table: dict, title: str) -> str:
    """The report as markdown: MAE with intervals per horizon, ZO-SOL's share of the gap, and
    the paired tests at each horizon."""
    horizons = list(next(iter(table.values()))["horizons"])
    n = next(iter(table.values()))["n_sims"]
    head = " | ".join(f"MAE, first {h} steps (95% CI)" for h in horizons)
    lines = [f"# {title}", "", f"| method | {head} | queries | training s |",
             "|---|" + "---|" * len(horizons) + "---|---|"]
    for m, r in table.items():
        cells = " | ".join(f"{r['horizons'][h]['mean']:.5f} [{r['horizons'][h]['ci95'][0]:.5f}, "
                           f"{r['horizons'][h]['ci95'][1]:.5f}]" for h in horizons)
        lines.append(f"| {m.upper()} | {cells} | {r.get('queries', 0):,.0f} | {r.get('seconds', 0.0):.1f} |")
    shares = [(h, gap_closed(table, h)) for h in horizons]
    if any(s is not None for _, s in shares):
        lines += ["", "ZO-SOL's share of the SRC -> FO-SOL gap: " + ", ".join(
            f"{100 * s:.0f}% (first {h} steps)" for h, s in shares if s is not None) + " (DeepZero reported 58%)."]
    lines += ["", f"Paired tests over the {n} test simulations (Wilcoxon signed-rank, two-sided): how often "
              "the first method's MAE is lower / higher than the second's, and the p-value.", "",
              "| comparison | " + " | ".join(f"first {h} steps" for h in horizons) + " |",
              "|---|" + "---|" * len(horizons)]
    methods = list(table)
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            cells = []
            for h in horizons:
                t = table[b]["horizons"][h]["vs"][a]
                cells.append(f"{t['lower']} / {t['higher']}, p = {t['p']:.3g}")
            lines.append(f"| {b.upper()} vs {a.upper()} | " + " | ".join(cells) + " |")
    lines += ["", "MAE: mean |corrected source - reference| over cells, channels and the first h test steps, "
              "per test simulation; mean over simulations with a 95% t interval. Queries: loss evaluations "
              "through the black-box solver (ZO-SOL). Training s: wall time of training only."]
    return "\n".join(lines) + "\n"


def report(out, *, plots: bool = True, train_steps: int | None = None, title: str | None = None) -> dict:
    """Collect ``<out>/<method>/eval.json``; write ``report.md``, ``report.json`` and plots
    (``error_over_time.png`` with 95% bands, ``snapshot.png``). Returns the table (``summarize``)."""
    out = Path(out)
    evals = collect(out)
    errors = {m: np.asarray(e["mae_per_sim_over_time"]) for m, e in evals.items()}
    horizons = horizons_for(next(iter(errors.values())).shape[1], train_steps)
    extra = {m: {k: e[k] for k in ("queries", "seconds", "steps") if k in e} for m, e in evals.items()}
    table = summarize(errors, horizons, extra)
    write_text(out / "report.md", table_markdown(table, title or f"SOL comparison: {out.name}"))
    write_json(out / "report.json", table, indent=1)
    if plots:
        plot_errors(errors, out / "error_over_time.png")
        plot_snapshot(out)
    return table


def pooled_report(root, seed_dirs: dict[int, Path], *, train_steps: int | None = None) -> dict:
    """Report each seed's comparison, then all seeds pooled (simulations of every seed paired
    across methods); writes ``report.md`` / ``report.json`` / ``error_over_time.png`` in ``root``.
    Returns ``{"seeds": {seed: table}, "pooled": table}``."""
    root = Path(root)
    per_seed, errors = {}, {}
    for seed, folder in seed_dirs.items():
        per_seed[seed] = report(folder, train_steps=train_steps)
        for m, e in collect(folder).items():
            errors.setdefault(m, []).append(np.asarray(e["mae_per_sim_over_time"]))
    complete = {m: np.concatenate(parts) for m, parts in errors.items() if len(parts) == len(seed_dirs)}
    horizons = horizons_for(next(iter(complete.values())).shape[1], train_steps)
    extra = {m: {k: float(np.mean([t[m][k] for t in per_seed.values()])) for k in ("queries", "seconds")}
             for m in complete}  # per seed, on average
    pooled = summarize(complete, horizons, extra)
    text = table_markdown(pooled, f"SOL comparison over seeds {', '.join(map(str, seed_dirs))}, pooled")
    h = str(horizons[-1])
    lines = ["", "Per seed, MAE over the first " + h + " steps:", "",
             "| seed | " + " | ".join(m.upper() for m in complete) + " | ordering |", "|---|" + "---|" * (len(complete) + 1)]
    for seed, t in per_seed.items():
        means = {m: t[m]["horizons"][h]["mean"] for m in complete if m in t}
        order = " < ".join(m.upper() for m in sorted(means, key=means.get))
        lines.append(f"| {seed} | " + " | ".join(f"{means[m]:.5f}" for m in complete) + f" | {order} |")
    write_text(root / "report.md", text + "\n".join(lines) + "\n")
    result = {"seeds": {str(s): t for s, t in per_seed.items()}, "pooled": pooled}
    write_json(root / "report.json", result, indent=1)
    plot_errors(complete, root / "error_over_time.png")
    return result


def plot_errors(errors: dict[str, np.ndarray], path) -> None:
    """MAE against time step per method: the mean over simulations with a 95% t band."""
    Figure = require("apps", "matplotlib.figure", feature="plotting").Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m, e in errors.items():
        steps = np.arange(1, e.shape[1] + 1)
        cis = [mean_interval(e[:, t]) for t in range(e.shape[1])]
        ax.plot(steps, [c["mean"] for c in cis], label=m.upper())
        ax.fill_between(steps, [c["low"] for c in cis], [c["high"] for c in cis], alpha=0.2)
    ax.set_xlabel("time step")
    ax.set_ylabel("MAE vs reference (95% band over test simulations)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_snapshot(out: Path) -> None:
    """Reference, source and corrected state of test simulation 0 at the last step."""
    Figure = require("apps", "matplotlib.figure", feature="plotting").Figure

    best = next((m for m in ("zo-sol", "fo-sol", "non") if (out / m / "snapshot.npz").exists()), None)
    if best is None:
        return
    with np.load(out / best / "snapshot.npz") as z:
        snap = {k: z[k] for k in z.files}
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    vmax = float(np.abs(snap["reference"][0]).max()) or 1.0
    for ax, k in zip(axes, ("reference", "source", "corrected")):
        im = ax.imshow(snap[k][0], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(k if k != "corrected" else f"corrected ({best.upper()})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="channel 0, last test step")
    fig.savefig(out / "snapshot.png", dpi=100)
