"""SOL on a user's own solver and data (tests/support/sol_byo_solvers.py, never the built-in scenarios):
the trajectories format and its validation, every method through the CLI with a MODULE:FUNCTION
solver (K = 2 params, and K = 0), the same solver served by ``deepzero-oracle serve`` and reached
through grpc:// and kserve://, a user's corrector module, and bad input refused before anything is
trained or written."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from support import sol_byo_solvers as user
from support.server_process import ServerProcess

from deepzero_oracle import CGE
from deepzero_oracle.adapters.sol.data import prepare_data
from deepzero_oracle.adapters.sol.methods import METHODS
from deepzero_oracle.adapters.sol.oracle import SOLOracle, unrolled_loss
from deepzero_oracle.adapters.sol.trajectories import FORMAT, FORMAT_VERSION, Trajectories, load_trajectories
from deepzero_oracle.apps.cli import main as cli

TESTS = Path(__file__).resolve().parents[1]
SOLVER = "support.sol_byo_solvers:coarse_step"  # NumPy in -> NumPy out, torch in -> torch out
RECIPE = ["--steps", "3", "--unroll", "2", "--batch-size", "2", "--hidden", "4", "--sparsity", "0.5", "--lr", "1e-2",
          "--quiet"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return user.make_trajectories().save(tmp_path_factory.mktemp("byo") / "trajectories.npz")


@pytest.fixture(scope="module")
def comparison(data_file, tmp_path_factory):
    """All four methods through the CLI on the user's data and MODULE:FUNCTION solver."""
    out = tmp_path_factory.mktemp("byo-cmp")
    results = {}
    for m in METHODS:
        results[m] = _train(out, m, "--data", str(data_file), "--solver", SOLVER)
    return out, results


@pytest.fixture(scope="module")
def served():
    """``deepzero-oracle serve support.sol_byo_solvers:numpy_step --port 0 --http-port 0``: nothing
    declared about the tensors; gRPC and the KServe v2 REST endpoint."""
    with ServerProcess("support.sol_byo_solvers:numpy_step", "--http-port", "0", cwd=TESTS) as proc:
        yield proc


def _train(out, method, *flags) -> dict:
    code = cli(["sol", "train", "--out", str(out), "--method", method, *RECIPE, *flags])
    assert code == 0, f"sol train --method {method} exited {code}"
    return json.loads((Path(out) / method / "eval.json").read_text())


def _files(folder: Path) -> dict:
    """Every file under ``folder`` with a hash of its bytes (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv, code, match, capsys, untouched: Path | None = None) -> None:
    before = _files(untouched) if untouched is not None else None
    assert cli(argv) == code
    err = capsys.readouterr().err
    assert match in err, err
    if untouched is not None:
        assert _files(untouched) == before


# ---------------------------------------------------------------------- the format
def test_format_round_trip_keeps_arrays_metadata_and_digest(tmp_path):
    traj = user.make_trajectories()
    path = traj.save(tmp_path / "t.npz")
    back = load_trajectories(path, unroll=5)
    for k in ("train_states", "test_states", "train_params", "test_params"):
        assert np.array_equal(getattr(back, k), getattr(traj, k))
    assert back.metadata == traj.metadata and back.digest() == traj.digest()
    assert back.n_params == 2 and back.channels == 1 and back.grid == (8, 8) and back.periodic
    with np.load(path) as z:
        assert str(z["format"]) == FORMAT and int(z["format_version"]) == FORMAT_VERSION
    # K = 0: no params written; the corrector's fields are empty, the digest ignores absent params
    bare = user.make_trajectories(n_params=0)
    with np.load(bare.save(tmp_path / "bare.npz")) as z:
        assert "train_params" not in z.files
    assert load_trajectories(tmp_path / "bare.npz").corrector_fields("train").shape == (3, 0, 8, 8)
    fields = traj.corrector_fields("test")  # params as constant fields
    assert fields.shape == (2, 2, 8, 8) and np.all(fields[:, :, 3, 5] == traj.test_params)
    other = Trajectories(traj.train_states, traj.test_states + 1e-9, traj.train_params, traj.test_params)
    assert other.digest() != traj.digest()


def _good_arrays() -> dict:
    t = user.make_trajectories()
    return {"format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION), "train_states": t.train_states,
            "test_states": t.test_states, "train_params": t.train_params, "test_params": t.test_params}


def _nan_states():
    a = _good_arrays()["train_states"].copy()
    a[1, 2, 0, 3, 4] = np.nan
    return a


BAD_FILES = {
    "missing train_states": ({"train_states": None}, "missing key(s) ['train_states']"),
    "other format": ({"format": np.array("someone/else")}, "format is 'someone/else'"),
    "wrong rank": ({"test_states": np.zeros((2, 6, 8, 8))}, "test_states must be [S', T'+1, C, H, W] (rank 5)"),
    "NaN": ({"train_states": _nan_states()}, "train_states contains NaN or Inf (first at index (1, 2, 0, 3, 4))"),
    "S mismatch": ({"train_params": np.ones((2, 2))}, "train_params has 2 rows but train_states has S = 3"),
    "K mismatch": ({"test_params": np.ones((2, 3))}, "train_params and test_params must have the same K"),
    "C/H/W mismatch": ({"test_states": np.zeros((2, 6, 1, 8, 9))}, "must share C, H, W"),
    "params without test": ({"test_params": None}, "train_params and test_params come together"),
    "unknown key": ({"train_param": np.ones((3, 2))}, "unknown key(s) ['train_param']"),
    "newer version": ({"format_version": np.array(2)}, "format_version 2 is not supported"),
    "strings": ({"train_states": np.array(["a"])}, "train_states must hold real numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_loader_names_what_is_wrong(case, tmp_path):
    change, message = BAD_FILES[case]
    arrays = {k: v for k, v in {**_good_arrays(), **change}.items() if v is not None}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as e:
        load_trajectories(tmp_path / "bad.npz")
    assert message in str(e.value)


def test_loader_refuses_trajectories_too_short_for_unroll(data_file):
    with pytest.raises(ValueError, match="unroll 6 needs training trajectories of T >= 6 steps"):
        load_trajectories(data_file, unroll=6)


def test_bad_data_fails_with_exit_code_2_before_anything_is_written(comparison, tmp_path, capsys):
    out, _ = comparison
    arrays = _good_arrays()
    arrays["train_params"] = np.ones((2, 2))
    np.savez(tmp_path / "bad.npz", **arrays)
    _refused(["sol", "train", "--out", str(tmp_path / "new"), "--method", "zo-sol", "--data", str(tmp_path / "bad.npz"),
              "--solver", SOLVER], 2, "train_params has 2 rows", capsys)
    assert not (tmp_path / "new").exists()
    _refused(["sol", "train", "--out", str(tmp_path / "new"), "--method", "zo-sol", "--data", str(tmp_path / "no.npz"),
              "--solver", SOLVER], 2, "no trajectories file", capsys)
    _refused(["sol", "train", "--out", str(tmp_path / "new"), "--method", "zo-sol", "--solver", SOLVER], 2,
             "pass --data FILE.npz", capsys)
    assert not (tmp_path / "new").exists()
    # a finished comparison is left exactly as it was: other data, unroll too long
    other = user.make_trajectories(seed=5).save(tmp_path / "other.npz")
    _refused(["sol", "train", "--out", str(out), "--method", "zo-sol", "--data", str(other), "--solver", SOLVER],
             2, "holds a comparison on other data", capsys, untouched=out)
    _refused(["sol", "train", "--out", str(out), "--method", "zo-sol", "--unroll", "9", "--solver", SOLVER], 2,
             "unroll 9 needs training trajectories", capsys, untouched=out)


# ---------------------------------------------------------------------- a user's solver, in process
def test_all_four_methods_on_a_user_solver_with_two_params(comparison, capsys):
    out, results = comparison
    assert cli(["sol", "report", "--out", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == list(METHODS)
    for m, row in table.items():
        assert {"mae_mean", "mae_std", "mae_ci95", "queries", "seconds"} <= set(row)
        assert np.isfinite(row["mae_mean"]) and row["mae_mean"] > 0, m
    assert table["zo-sol"]["queries"] > 0 and table["src"]["queries"] == table["fo-sol"]["queries"] == 0
    assert len({table[m]["mae_mean"] for m in METHODS}) == 4  # each trained corrector moved away from SRC
    # SRC is the user's solver alone, rolled out through the solver spec from the test states
    traj = load_trajectories(out / json.loads((out / "config.json").read_text())["data"])
    state, err = traj.test_states[:, 0], []
    for t in range(1, traj.test_states.shape[1]):
        state = user.coarse_step(state, traj.test_params)
        err.append(np.abs(state - traj.test_states[:, t]).mean(axis=(1, 2, 3)))
    assert results["src"]["mae_mean"] == pytest.approx(float(np.mean(err)), rel=1e-12)
    assert "# SOL comparison: trajectories.npz" in (out / "report.md").read_text()
    # eval re-reads the checkpoint with the recorded solver and gives the same number
    assert cli(["sol", "eval", "--out", str(out), "--method", "fo-sol", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mae_mean"] == results["fo-sol"]["mae_mean"]
    # NON's pairs went through the solver once and are cached beside the data
    assert len(list((out / "data").glob("pairs-*.npz"))) == 1


def test_zo_estimate_of_a_user_corrector_module_matches_autograd_through_the_solver():
    traj = user.make_trajectories()
    data = prepare_data(traj, user.coarse_step)
    torch.manual_seed(0)
    corrector = user.tiny_corrector(1, 2).double()
    i, t0 = np.array([0, 2, 1]), np.array([0, 2, 3])
    ref = traj.train_states
    args = (torch.from_numpy(ref[i, t0]), traj.train_params[i], torch.from_numpy(data.train_fields[i]),
            torch.from_numpy(np.stack([ref[i, t0 + 1], ref[i, t0 + 2]], axis=1)))
    oracle = SOLOracle(corrector, user.numpy_step, 2, max_batch=16).bind(*args)  # P copies by vmap
    loss = unrolled_loss(corrector, user.coarse_step, *args, 2)
    loss.backward()
    fo = torch.cat([p.grad.reshape(-1) for p in corrector.parameters()])
    assert float(oracle.loss(oracle.theta())) == pytest.approx(float(loss.detach()), rel=1e-12)
    zo = CGE(mu=1e-6, joint=True).estimate(oracle, oracle.theta())
    assert float(zo @ fo / (zo.norm() * fo.norm())) > 0.9999
    assert float((zo - fo).norm() / fo.norm()) < 1e-2


def test_a_user_corrector_factory_trains_and_an_unfit_one_is_refused(data_file, tmp_path, capsys):
    r = _train(tmp_path, "zo-sol", "--data", str(data_file), "--solver", SOLVER,
               "--corrector", "support.sol_byo_solvers:tiny_corrector")
    assert r["queries"] > 0 and np.isfinite(r["mae_mean"])
    ck = torch.load(tmp_path / "zo-sol" / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)
    init = user.tiny_corrector(1, 2).double().state_dict()
    assert set(ck["learner"]) == set(init) and not torch.equal(ck["learner"]["first.weight"], init["first.weight"])
    _refused(["sol", "train", "--out", str(tmp_path / "wide"), "--method", "zo-sol", "--data", str(data_file),
              "--solver", SOLVER, "--corrector", "support.sol_byo_solvers:wide_corrector", "--unroll", "2"], 2,
             "a correction has the state's shape [2, 1, 8, 8]", capsys)
    assert not (tmp_path / "wide").exists()


def test_a_state_only_solver_receives_only_the_state(tmp_path, capsys):
    data = user.make_trajectories(n_params=0).save(tmp_path / "k0.npz")
    src = _train(tmp_path / "cmp", "src", "--data", str(data), "--solver", "support.sol_byo_solvers:state_only_step")
    zo = _train(tmp_path / "cmp", "zo-sol", "--solver", "support.sol_byo_solvers:state_only_step")  # data: the folder's
    assert zo["queries"] > 0 and zo["mae_mean"] != src["mae_mean"]
    # a two-argument solver on K = 0 data fails its probe with the contract in the message
    _refused(["sol", "train", "--out", str(tmp_path / "two"), "--method", "src", "--data", str(data),
              "--solver", "support.sol_byo_solvers:numpy_step", "--unroll", "2"], 2, "state [2, 1, 8, 8] only (K = 0)", capsys)


# ---------------------------------------------------------------------- bad solvers
@pytest.mark.parametrize("solver, message", [
    ("support.sol_byo_solvers:wrong_shape_step", "returned shape [2, 1, 7, 8]"),
    ("support.sol_byo_solvers:float32_step", "returned float32; it must return float64"),
    ("support.sol_byo_solvers:nan_step", "returned NaN/Inf for finite training states"),
    ("support.sol_byo_solvers:no_such_step", "cannot load it (AttributeError"),
])
def test_a_broken_solver_is_refused_before_training(solver, message, comparison, capsys):
    out, _ = comparison
    _refused(["sol", "train", "--out", str(out), "--method", "zo-sol", "--solver", solver], 2, message, capsys,
             untouched=out)


def test_an_unreachable_solver_exits_5_and_writes_nothing(data_file, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _refused(["sol", "train", "--out", str(tmp_path / "x"), "--method", "zo-sol", "--data", str(data_file),
              "--solver", f"grpc://127.0.0.1:{port}", "--timeout", "5", "--unroll", "2"], 5, "127.0.0.1", capsys)
    assert not (tmp_path / "x").exists()


def test_fo_sol_is_refused_for_a_solver_without_a_gradient_path(comparison, served, capsys):
    out, _ = comparison
    _refused(["sol", "train", "--out", str(out), "--method", "fo-sol", "--solver", f"grpc://{served.address}"], 2,
             "is reached over the network and can only be queried", capsys, untouched=out)
    _refused(["sol", "train", "--out", str(out), "--method", "fo-sol", "--solver", "support.sol_byo_solvers:numpy_step"], 2,
             "written with torch operations", capsys, untouched=out)
    # another solver for a trained method is another run: refused on resume, naming the difference
    _refused(["sol", "train", "--out", str(out), "--method", "zo-sol", "--solver", "support.sol_byo_solvers:numpy_step"], 2,
             "solver: 'support.sol_byo_solvers:coarse_step' in the run, 'support.sol_byo_solvers:numpy_step' now", capsys, untouched=out)


# ---------------------------------------------------------------------- the solver served
def test_served_solver_through_grpc_and_kserve_trains_like_the_in_process_one(data_file, served, tmp_path):
    rest = served.rest_url.removeprefix("http://")
    specs = {"python": "support.sol_byo_solvers:numpy_step", "grpc": f"grpc://{served.address}",
             "kserve": f"kserve://{served.address}/numpy_step", "kserve+http": f"kserve+http://{rest}/numpy_step"}
    runs = {}
    for kind, spec in specs.items():
        runs[kind] = {m: _train(tmp_path / kind, m, "--data", str(data_file), "--solver", spec)
                      for m in ("src", "non", "zo-sol")}
    for kind in ("grpc", "kserve", "kserve+http"):
        for m in ("src", "non", "zo-sol"):
            assert runs[kind][m]["mae_mean"] == pytest.approx(runs["python"][m]["mae_mean"], rel=1e-12), (kind, m)
        history = json.loads((tmp_path / kind / "zo-sol" / "train.json").read_text())["history"]
        local = json.loads((tmp_path / "python" / "zo-sol" / "train.json").read_text())["history"]
        assert np.allclose(history, local, rtol=1e-12, atol=0) and len(history) == 3
        assert runs[kind]["zo-sol"]["queries"] == runs["python"]["zo-sol"]["queries"] > 0


@pytest.mark.slow
def test_the_python_api_example_improves_on_its_own_solver(tmp_path):
    import subprocess
    import sys

    example = TESTS.parent / "examples" / "own_solver" / "python_api.py"
    done = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]  # test MAE: SRC a, ZO-SOL b after N queries
    src, zo = (float(w.rstrip(",")) for w in (line.split()[3], line.split()[5]))
    assert zo < src and load_trajectories(tmp_path / "trajectories.npz").n_params == 2


# ---------------------------------------------------------------------- a file made by hand, a budget
def test_a_hand_made_file_of_just_the_arrays_trains_and_a_budget_stops_and_continues(tmp_path, capsys):
    """np.savez with only the documented arrays (no format keys) is read as format version 1."""
    t = user.make_trajectories()
    np.savez(tmp_path / "mine.npz", train_states=t.train_states, test_states=t.test_states,
             train_params=t.train_params, test_params=t.test_params)
    mine = load_trajectories(tmp_path / "mine.npz")
    assert np.array_equal(mine.train_states, t.train_states) and np.array_equal(mine.test_params, t.test_params)
    one = ["sol", "train", "--method", "zo-sol", "--data", str(tmp_path / "mine.npz"), "--solver", SOLVER, *RECIPE]
    assert cli([*one, "--steps", "1", "--out", str(tmp_path / "one")]) == 0
    per_step = json.loads((tmp_path / "one" / "zo-sol" / "train.json").read_text())["queries"]
    assert per_step > 0
    capsys.readouterr()
    # a budget for one step of three: exit 4, the checkpoint kept, one line on how to continue
    out = tmp_path / "budget"
    assert cli([*one, "--out", str(out), "--max-queries", str(per_step + 1)]) == 4
    err = capsys.readouterr().err
    assert f"query budget of {per_step + 1} reached after {per_step} queries" in err and "--max-queries" in err
    assert (out / "zo-sol" / "checkpoint.pt").exists() and not (out / "zo-sol" / "eval.json").exists()
    assert cli([*one, "--out", str(out), "--max-queries", str(10 * per_step)]) == 0
    done = json.loads((out / "zo-sol" / "train.json").read_text())
    assert done["step"] == 3 and done["queries"] == 3 * per_step and done["stopped_reason"] is None
