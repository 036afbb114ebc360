"""CSV log benchmark: the time to append one row to ``CSVLogger`` as the file grows.

    python benchmarks/bench_csvlog.py                 # 1k, 10k, 100k rows; prints a table + JSON
    python benchmarks/bench_csvlog.py --quick         # seconds; checks that it runs
    python benchmarks/bench_csvlog.py --json out.json # also writes the figures

For each size N, a steps log of N rows is written, then ``--appends`` rows are appended through a
fresh ``CSVLogger`` (the Trainer's step log: ``on="step"``) and timed. The header is kept in
memory, so the time per row should be flat in N. For contrast, ``reread`` times a logger that
reads the whole file before each row (what appending cost before), over a few rows only.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

from deepzero_oracle.train import STEP_FIELDS, CSVLogger


def _row(step: int) -> dict:
    return {"step": step, "epoch": step // 100, "queries": 193 * step, "lr": 0.1, "loss": 1.0 / (step + 1),
            "grad_norm": 0.5, "seconds": 0.01 * step}


def _fill(path: Path, rows: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(STEP_FIELDS))
        writer.writeheader()
        writer.writerows(_row(s) for s in range(1, rows + 1))


def _reread_append(path: Path, row: dict) -> None:
    """Appending as the logger did before: read every row, then append."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        list(reader)
        fields = list(reader.fieldnames or [])
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerow(row)


def measure(rows: int, appends: int, reread_appends: int, folder: Path) -> dict:
    """Seconds per appended row at a file of ``rows`` rows: the logger's and the re-reading one's."""
    path = folder / f"steps-{rows}.csv"
    _fill(path, rows)
    log = CSVLogger(path, on="step")
    times = []
    for i in range(appends):
        started = time.perf_counter()
        log.on_step_end(None, _row(rows + 1 + i))
        times.append(time.perf_counter() - started)
    reread = []
    for i in range(reread_appends):
        started = time.perf_counter()
        _reread_append(path, _row(rows + appends + 1 + i))
        reread.append(time.perf_counter() - started)
    with path.open() as f:
        written = sum(1 for _ in f) - 1
    assert written == rows + appends + reread_appends, "rows were lost"
    path.unlink()
    return {"rows": rows, "appends": appends, "us_per_row_median": statistics.median(times) * 1e6,
            "us_per_row_mean": statistics.fmean(times) * 1e6, "first_append_us": times[0] * 1e6,
            "reread_us_per_row_median": statistics.median(reread) * 1e6 if reread else None}


def markdown(results: list[dict]) -> str:
    """The figures as a markdown table."""
    lines = ["| rows in the file | append, median (us/row) | mean (us/row) | first append (us) | re-reading "
             "logger, median (us/row) |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        reread = "" if r["reread_us_per_row_median"] is None else f"{r['reread_us_per_row_median']:,.0f}"
        lines.append(f"| {r['rows']:,} | {r['us_per_row_median']:.1f} | {r['us_per_row_mean']:.1f} | "
                     f"{r['first_append_us']:.1f} | {reread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table and the JSON, and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="rows already in the file, comma-separated")
    p.add_argument("--appends", type=int, default=2000, help="rows appended (timed) at each size")
    p.add_argument("--reread-appends", type=int, default=5, help="rows appended by the re-reading logger")
    p.add_argument("--quick", action="store_true", help="small sizes (checks that it runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.appends, args.reread_appends = [100, 1000], 50, 2
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, args.appends, args.reread_appends, Path(tmp)) for n in sizes]
    report = {"benchmark": "csvlog", "results": results}
    print(markdown(results))
    print(json.dumps(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
