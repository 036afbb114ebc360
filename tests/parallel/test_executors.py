"""``open_executor`` specs and ``--executor``: bad specs and unreachable schedulers fail fast with
clear messages, and training or certifying on an executor gives what inline gives, bit for bit,
with exact query counts (train, defense train and certify, ZO-SOL)."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from deepzero_oracle import CGE, CallableOracle
from deepzero_oracle.apps.classify import Recipe, train_classifier
from deepzero_oracle.apps.cli import build_parser, main
from deepzero_oracle.errors import ExecutorUnavailable
from deepzero_oracle.parallel import EXECUTOR_FORMS, InlineExecutor, ParallelOracle, open_executor, parallelize
from deepzero_oracle.parallel.executors import parse_executor_spec


class Bowl:
    """A float64 black-box loss of theta [dim] (module level: it pickles by reference)."""

    def __call__(self, theta):
        return (theta - 0.5).pow(2).sum() + torch.sin(theta).sum()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "thread:2", "threads:0", "threads:-1", "threads", "processes:two",
                                  "dask-local", "dask://", "dask://host", "dask://host:99999", "tcp://h:1",
                                  "dask-local:2x"])
def test_malformed_specs_list_the_accepted_forms(spec):
    with pytest.raises(ValueError) as err:
        with open_executor(spec):
            pass
    assert repr(spec) in str(err.value)
    for form in EXECUTOR_FORMS:
        assert form in str(err.value)


def test_well_formed_specs_parse():
    assert parse_executor_spec("inline") == ("inline", None)
    assert parse_executor_spec("threads:3") == ("threads", 3)
    assert parse_executor_spec("processes:1") == ("processes", 1)
    assert parse_executor_spec("dask-local:2") == ("dask-local", 2)
    assert parse_executor_spec("dask://10.0.0.5:8786") == ("dask", "tcp://10.0.0.5:8786")
    assert parse_executor_spec("tls://sched.example.org:8786") == ("dask", "tls://sched.example.org:8786")


def test_commands_take_executor_and_refuse_bad_specs(capsys):
    parser = build_parser()
    for argv in (["train"], ["sol", "train", "--method", "zo-sol"], ["sol", "compare"],
                 ["defense", "train", "--method", "zo-ds"], ["defense", "certify", "--method", "zo-ds"]):
        args = parser.parse_args([*argv, "--out", "x", "--executor", "threads:2"])
        assert args.executor == "threads:2"
        assert parser.parse_args([*argv, "--out", "x"]).executor == "inline"
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*argv, "--out", "x", "--executor", "dask-local:0"])
        assert exit_.value.code == 2
        assert "accepted forms" in capsys.readouterr().err


def test_unreachable_scheduler_fails_fast_naming_the_address(tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    began = time.perf_counter()
    with pytest.raises(ExecutorUnavailable) as err:
        with open_executor(f"dask://{address}", connect_timeout=1):
            pytest.fail("no executor should be yielded")
    assert time.perf_counter() - began < 30  # a guard against hanging, not a timing assertion
    assert f"tcp://{address}" in str(err.value) and "dask scheduler" in str(err.value)
    # the command line maps it to exit code 5 before anything is trained or written
    assert main(["train", "--executor", f"dask://{address}", "--out", str(tmp_path / "run"), "--quiet"]) == 5
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dask_specs_without_dask_name_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    for spec in ("dask-local:1", "dask://127.0.0.1:8786"):
        with pytest.raises(ImportError, match=r"pip install 'deepzero-oracle\[dask\]'"):
            with open_executor(spec):
                pass
    assert main(["train", "--executor", "dask-local:1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "deepzero-oracle[dask]" in capsys.readouterr().err


def test_parallelize_leaves_inline_alone():
    oracle = CallableOracle(Bowl(), 4)
    assert parallelize(oracle, None) is oracle and parallelize(oracle, InlineExecutor()) is oracle
    with open_executor("threads:2") as pool:
        assert isinstance(parallelize(oracle, pool), ParallelOracle)


def test_dask_local_round_trip():
    theta = torch.linspace(-1, 1, 200, dtype=torch.float64)
    inline = CGE(mu=1e-3).estimate(CallableOracle(Bowl(), 200), theta)
    with open_executor("dask-local:2") as client:
        assert sorted(client.nthreads().values()) == [1, 1]
        oracle = ParallelOracle(CallableOracle(Bowl(), 200), client)
        assert torch.equal(CGE(mu=1e-3).estimate(oracle, theta), inline)
        assert oracle.queries == 201 and oracle.transport == "scatter"
        cluster = client.cluster
    assert client.status == "closed" and cluster.status.name == "closed"


# -- the commands' Python entry points: bit-identical to inline, exact counts -------------------


def _learner(run: Path) -> torch.Tensor:
    state = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]
    return torch.cat([v.reshape(-1) for v in state.values()])


def test_train_on_an_executor_equals_inline(tmp_path):
    recipe = dict(dataset="digits", model="mlp", sparsity=0.9, pruner="zo-grasp", epochs=1, max_queries=3000)
    inline = train_classifier(Recipe(**recipe), tmp_path / "inline", progress=False)
    fanned = train_classifier(Recipe(**recipe), tmp_path / "dask", progress=False, executor="dask-local:2")
    steps = torch.load(tmp_path / "inline" / "checkpoint.pt", weights_only=True)["step"]
    assert inline["stopped_reason"] and steps > 3  # ZO-GraSP, then a few steps until the budget stops them
    assert fanned["queries"] == inline["queries"] and fanned["test_accuracy"] == inline["test_accuracy"]
    assert fanned["history"] == [{**h, "seconds": f["seconds"]} for h, f in zip(inline["history"],
                                                                                 fanned["history"])]
    assert torch.equal(_learner(tmp_path / "dask"), _learner(tmp_path / "inline"))
    assert (tmp_path / "dask" / "steps.csv").read_text().count("\n") == steps + 1


def test_a_run_started_inline_continues_on_an_executor(tmp_path):
    recipe = dict(dataset="digits", model="mlp", sparsity=0.0, epochs=1, batch_size=512)
    straight = train_classifier(Recipe(**recipe), tmp_path / "straight", progress=False)
    stopped = train_classifier(Recipe(**recipe, max_queries=2411), tmp_path / "split", progress=False)
    assert stopped["stopped_reason"] and stopped["queries"] == 2411  # after 1 of 3 steps, checkpointed
    resumed = train_classifier(Recipe(**recipe), tmp_path / "split", progress=False, executor="threads:2")
    assert resumed["queries"] == straight["queries"] == 3 * 2411
    assert torch.equal(_learner(tmp_path / "split"), _learner(tmp_path / "straight"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from deepzero_oracle.adapters.defense.classifier import train_classifier as train_base

    path = tmp_path_factory.mktemp("clf") / "classifier-digits.pt"
    train_base("digits", path, epochs=3, channels=(8, 8), max_train=600, batch_size=32, lr=1e-2, progress=False)
    return path


def test_defense_zo_ds_and_certify_on_an_executor_equal_inline(classifier, tmp_path):
    from deepzero_oracle.adapters.defense.classifier import frozen_blackbox, whitebox_classifier
    from deepzero_oracle.adapters.defense.certification import certify_front
    from deepzero_oracle.adapters.defense.fronts import load_front
    from deepzero_oracle.adapters.defense.training import DefenseConfig, train_defense

    config = dict(method="zo-ds", dataset="digits", sigma=0.25, epochs=1, pretrain_epochs=1, max_train=64,
                  width=4, depth=2, batch_size=32)
    inline = train_defense(DefenseConfig(**config), frozen_blackbox(classifier), tmp_path / "inline",
                           progress=False)
    with open_executor("threads:2") as pool:
        fanned = train_defense(DefenseConfig(**config), frozen_blackbox(classifier), tmp_path / "threads",
                               progress=False, executor=pool)
        with pytest.raises(ValueError, match="fans out zo-ds"):
            train_defense(DefenseConfig(**dict(config, method="fo-ds")), frozen_blackbox(classifier),
                          tmp_path / "fo", whitebox=whitebox_classifier(classifier), progress=False, executor=pool)
    assert torch.equal(_learner(tmp_path / "threads" / "stab"), _learner(tmp_path / "inline" / "stab"))
    assert fanned["queries"] == inline["queries"]
    stab = torch.load(tmp_path / "threads" / "stab" / "checkpoint.pt", weights_only=True)["oracle"]["queries"]
    # each stab query ran the bound batch of 32 through the black box, here or on a worker
    assert fanned["blackbox_images"] == inline["blackbox_images"]

    front, _ = load_front(tmp_path / "inline")
    certify = dict(n0=10, n=40, max_examples=5, batch_size=16, seed=3, progress=False)
    here = certify_front(front, frozen_blackbox(classifier), "digits", 0.25, **certify)
    with open_executor("threads:2") as pool:
        there = certify_front(front, frozen_blackbox(classifier), "digits", 0.25, executor=pool, **certify)
    drop_time = [{k: v for k, v in row.items() if k != "time"} for row in here.rows]
    assert [{k: v for k, v in row.items() if k != "time"} for row in there.rows] == drop_time
    assert there.queries == here.queries == 5 * 50


class Connected:
    """A classifier holding what cannot travel to a worker (like a live connection)."""

    def __init__(self, box):
        import threading

        self.box, self.lock = box, threading.Lock()

    def __call__(self, x):
        return self.box(x)


def test_a_classifier_that_cannot_travel_is_refused_before_training(classifier, tmp_path, capsys):
    from deepzero_oracle.adapters.defense.classifier import frozen_blackbox
    from deepzero_oracle.adapters.defense.training import DefenseConfig, train_defense
    from deepzero_oracle.errors import NotShippable

    config = DefenseConfig(method="zo-ds", dataset="digits", epochs=1, max_train=64, width=4, depth=2)
    with open_executor("threads:2") as pool, pytest.raises(NotShippable, match="does not pickle"):
        train_defense(config, Connected(frozen_blackbox(classifier)), tmp_path / "run", progress=False,
                      executor=pool)
    assert not (tmp_path / "run").exists()


def test_zo_sol_on_an_executor_equals_inline(tmp_path):
    from deepzero_oracle.adapters.sol.builtin import generate_trajectories
    from deepzero_oracle.adapters.sol.data import SOLConfig, prepare_data
    from deepzero_oracle.adapters.sol.methods import train_method
    from deepzero_oracle.adapters.sol.solver import open_solver

    traj = generate_trajectories(scenario="burgers", size="small", n_train=2, n_test=1, train_steps=4,
                                 test_steps=4, seed=0, cache_dir=tmp_path / "data", progress=False)
    cfg = SOLConfig.from_dict({**SOLConfig().to_dict(), "steps": 2, "unroll": 2, "batch_size": 2}).check()
    runs = {}
    for spec in ("inline", "threads:2"):
        with open_solver(None, traj) as solver, open_executor(spec) as pool:
            data = prepare_data(traj, solver, cache_dir=tmp_path / "data")
            runs[spec] = train_method(cfg, "zo-sol", data, tmp_path / spec, solver=solver, progress=False,
                                      executor=pool)
    inline, fanned = runs["inline"], runs["threads:2"]
    assert fanned["history"] == inline["history"] and fanned["queries"] == inline["queries"]
    assert torch.equal(_learner(tmp_path / "threads:2"), _learner(tmp_path / "inline"))
    # inline: one call of all rollouts per unroll step; threads:2: two half blocks per unroll step
    assert inline["solver_calls"] == 2 * 2 and fanned["solver_calls"] == 2 * 2 * 2


def test_sol_compare_on_an_executor_equals_inline(tmp_path, capsys):
    reports = {}
    for spec in ("inline", "threads:2"):
        out = tmp_path / spec.replace(":", "-")
        assert main(["sol", "compare", "--seeds", "0", "--methods", "src,zo-sol", "--executor", spec, "--out", str(out), "--quiet",
                     "--scenario", "burgers", "--size", "tiny", "--n-train", "2", "--n-test", "2", "--train-steps",
                     "4", "--test-steps", "4", "--steps", "2", "--unroll", "2", "--batch-size", "2", "--hidden", "4",
                     "--json"]) == 0
        # everything but the wall time
        reports[spec] = {m: {k: v for k, v in r.items() if k != "seconds"}
                         for m, r in json.loads(capsys.readouterr().out).items()}
    assert reports["threads:2"] == reports["inline"] and reports["inline"]["zo-sol"]["queries"] > 0


@pytest.mark.slow
def test_bench_scaleout_runs_quick(tmp_path):
    import runpy

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scaleout.py"
    result = runpy.run_path(str(bench))["main"](["--quick", "--json", str(tmp_path / "scaleout.json")])
    assert (tmp_path / "scaleout.json").exists()
    assert result["speedup"] > 0 and result["wait_speedup"] > 0 and 0 < result["cores_free"] <= 2.5
