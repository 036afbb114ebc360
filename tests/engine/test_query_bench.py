"""The query benchmark: every method spends at most the budget, counted by the oracle's ledger; the
report's statistics (peer goal, CGE vs RGE, seed spread) follow from the records; the command line
refuses bad input in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deepzero_oracle.apps.queries.methods import Method, methods_for, run_method
from deepzero_oracle.apps.queries.report import markdown, summarize
from deepzero_oracle.apps.queries.tasks import TASKS



@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("queries")
    return lambda seed=0: TASKS["digits"].open(seed, folder)


@pytest.mark.parametrize("method", [Method("cge-sparse", "cge", sparsity=0.9, pruner="zo-grasp"),
                                    Method("rge-anti", "rge", q=4, antithetic=True),
                                    Method("cma-es", "cma"), Method("ngopt", "ngopt")], ids=lambda m: m.name)
def test_every_method_spends_at_most_the_budget_and_records_eight_marks(digits, method):
    budget = 1000
    with digits() as problem:
        record = run_method(problem, method, budget, seed=0)
        assert record["queries"] == problem.oracle.queries or method.family in ("cge", "rge")
    assert 0 < record["queries"] <= budget
    assert [c["mark"] for c in record["curve"]] == [budget * k // 8 for k in range(1, 9)]
    errors = [c["error"] for c in record["curve"]]
    assert all(0.0 <= e <= 1.0 for e in errors) and 0.0 <= record["initial"] <= 1.0
    # the marks are passed in order, never before the queries reach them
    assert all(c["queries"] >= c["mark"] or c is record["curve"][-1] or c["queries"] == record["queries"]
               for c in record["curve"])


def test_the_same_seed_gives_the_same_record(digits):
    method = Method("rge-4", "rge", q=4)
    runs = []
    for _ in range(2):
        with digits(seed=3) as problem:
            runs.append(run_method(problem, method, 400, seed=3)["curve"])
    assert runs[0] == runs[1]


def _records(default_excess, peer_excess, rge_excess, kind="classifier", task="digits"):
    records = []
    for s, (d, p, r) in enumerate(zip(default_excess, peer_excess, rge_excess)):
        for name, err in (("cge-sparse", d), ("cma-es", p), ("ngopt", p * 1.5), ("rge-16", r)):
            curve = [{"mark": k, "queries": k, "error": err * (9 - k) / 1} for k in range(1, 9)]
            curve[-1]["error"] = err
            records.append({"task": task, "budget": 8, "method": name, "seed": s, "queries": 8, "initial": 1.0,
                            "seconds": 1.0, "curve": curve})
    return records


def test_report_states_the_peer_goal_and_cge_vs_rge_with_paired_tests(tmp_path):
    default = [0.10, 0.12, 0.11, 0.09, 0.10]
    peer = [0.50, 0.55, 0.52, 0.49, 0.51]  # about 5x the default on every seed
    rge = [0.20, 0.25, 0.22, 0.18, 0.21]
    summary = summarize(_records(default, peer, rge))["digits"]
    goal = summary["peer_goal"]
    assert goal["peer"] == "cma-es" and goal["ratio"] == pytest.approx(sum(peer) / sum(default))
    assert goal["p"] < 0.05 and goal["met"]
    versus = summary["cge_vs_rge"]
    assert versus["winner"] == "cge" and versus["cge"] == "cge-sparse" and versus["p"] < 0.05
    row = summary["methods"]["cge-sparse"]
    assert row["spread"] == pytest.approx(0.12 / 0.09) and row["error"]["mean"] == pytest.approx(sum(default) / 5)
    text = markdown({"digits": summary})
    assert "**cge-sparse** (default)" in text and "(met)" in text and "CGE lower" in text

    # the same from records on disk, as `run_benchmark` lays them out: the report's three files
    from deepzero_oracle.apps.queries import report
    from deepzero_oracle.runs import write_json

    for r in _records(default, peer, rge):
        write_json(tmp_path / r["task"] / r["method"] / f"seed-{r['seed']}.json", r)
    assert report(tmp_path)["digits"]["peer_goal"] == goal
    assert all((tmp_path / f).stat().st_size > 0 for f in ("queries.md", "queries.json", "queries.png"))

    # a peer only 2x worse is not the 3x the goal asks, however clear the difference
    close = summarize(_records(default, [2 * d for d in default], rge))["digits"]["peer_goal"]
    assert close["ratio"] == pytest.approx(2.0) and not close["met"]


def test_sol_excess_error_is_measured_from_fo_sol_and_targets_from_src_and_non():
    records = _records([0.13, 0.14], [0.16, 0.17], [0.15, 0.15], task="burgers")
    for r in records:
        r["method"] = {"cge-sparse": "cge-sparse-95"}.get(r["method"], r["method"])
    records += [{"task": "burgers", "seed": s, "references": {"src": 0.20, "non": 0.15, "fo-sol": 0.12}}
                for s in (0, 1)]
    summary = summarize(records)["burgers"]
    row = summary["methods"]["cge-sparse-95"]
    assert row["excess"] == pytest.approx([0.01, 0.02])
    # NON's MAE 0.15: the default's curve passes it at its last mark on both seeds
    assert row["queries_to"]["NON"] == [8, 8]
    assert summary["methods"]["cma-es"]["queries_to"]["NON"] == [None, None]
    assert math.isclose(summary["peer_goal"]["ratio"], (0.04 + 0.05) / (0.01 + 0.02))


def test_every_task_has_its_default_first_and_both_peers():
    for task in TASKS.values():
        names = [m.name for m in methods_for(task.kind)]
        assert names[0] == task.default and {"cma-es", "ngopt"} <= set(names)
        assert len(names) == len(set(names))


def test_bench_queries_refuses_bad_input_in_one_line(tmp_path, capsys):
    from deepzero_oracle.apps.cli import main

    for argv, expected in ((["--tasks", "nosuch"], "unknown task"), (["--budget-scale", "0"], "--budget-scale"),
                           (["--tasks", "digits", "--methods", "sgd"], "unknown method")):
        try:
            code = main(["bench", "--queries", "--out", str(tmp_path), *argv])
        except SystemExit as exit_:  # argparse's own refusal
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not (Path(tmp_path) / "queries" / "queries.md").exists()


def test_the_own_solver_task_reopens_its_saved_data_in_a_fresh_process_state(tmp_path, monkeypatch):
    """A second run finds the trajectories on disk and must still make the example's solver importable."""
    import sys

    task = TASKS["own-solver"]
    with task.open(0, tmp_path) as problem:
        first = problem.test_error(problem.oracle.learner)
    here = str(Path("examples/own_solver").resolve())
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != here])
    monkeypatch.delitem(sys.modules, "solver", raising=False)
    with task.open(0, tmp_path) as problem:
        assert problem.test_error(problem.oracle.learner) == first and math.isfinite(first)


def test_a_second_benchmark_on_the_same_task_and_folder_is_refused(tmp_path):
    import fcntl

    from deepzero_oracle.apps.queries import run_benchmark

    (tmp_path / "digits").mkdir()
    with open(tmp_path / "digits" / ".running", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running benchmark holds
        with pytest.raises(FileExistsError, match="another `bench --queries` is running"):
            run_benchmark(tmp_path, tasks=["digits"], methods=["cge-dense"], seeds=[0], progress=False)
    assert not (tmp_path / "digits" / "cge-dense").exists()  # refused before any work


def test_run_benchmark_keeps_each_record_and_a_rerun_continues_instead_of_recomputing(tmp_path):
    from deepzero_oracle.apps.queries import run_benchmark

    first = run_benchmark(tmp_path, tasks=["digits"], methods=["rge-4"], seeds=[0], budget_scale=0.01, progress=False)
    record = tmp_path / "digits" / "rge-4" / "seed-0.json"
    stamp = record.stat().st_mtime_ns
    again = run_benchmark(tmp_path, tasks=["digits"], methods=["rge-4"], seeds=[0], budget_scale=0.01, progress=False)
    assert again == first and record.stat().st_mtime_ns == stamp
    assert first[0]["budget"] == 400 and first[0]["queries"] == 400  # q + 1 = 5 queries a step, 80 steps
