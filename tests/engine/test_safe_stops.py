"""Safe stops: SIGINT (Ctrl-C) and SIGTERM end a run between steps (or certified images) with its
state saved, exit 130 / 143 with one line on stderr, and the same command resumes it bit for bit.

The commands are signalled for real in a child process once it has logged a few steps; the
Trainer and the defense commands are also stopped in process at an exact step (the signal sent
from a callback or from the black box itself).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from support import stop_functions
from deepzero_oracle import RGE, Callback, ModuleOracle, StopRequested, TensorBatches, Trainer
from deepzero_oracle.apps.cli import main
from deepzero_oracle.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from deepzero_oracle.stops import stop_on_signals

CLI = [sys.executable, "-m", "deepzero_oracle.apps.cli"]
TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--estimator", "rge", "--q", "4", "--lr", "0.01",
         "--epochs", "1", "--batch-size", "32", "--quiet"]
SOL_DATA = ["--scenario", "burgers", "--size", "tiny", "--n-train", "3", "--n-test", "2", "--train-steps", "6",
            "--test-steps", "6", "--quiet"]
SOL_TRAIN = ["--method", "zo-sol", "--steps", "20", "--unroll", "2", "--batch-size", "2", "--hidden", "4",
             "--sparsity", "0.5", "--lr", "1e-2", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    # the child processes run with OMP_NUM_THREADS=1: the same kernels, so the same bits
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _signal_child(argv: list[str], log: Path, signum: int, rows: int = 3) -> tuple[int, str]:
    """Run ``deepzero-oracle ARGV`` in a child process, send ``signum`` once ``log`` holds more
    than ``rows`` rows, and return (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300  # a bound on the wait, not a timing assertion
        while child.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) > rows + 1:  # the header, then rows
                break
            time.sleep(0.02)
        assert child.poll() is None, f"the run ended before it could be signalled: {child.communicate()[1]}"
        child.send_signal(signum)
        _, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, err


def _assert_one_line(err: str, command: str, signame: str, argv: list[str]) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"deepzero-oracle {command}: stopped by {signame} after "), line
    assert line.endswith(f"resume with: {shlex.join(['deepzero-oracle', *argv])}"), line
    return line


def _same(a, b, where: str = "") -> None:
    """Checkpoint contents equal bit for bit (tensors by torch.equal), wall-clock seconds aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k != "seconds":
                _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _handlers() -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def _steps(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _assert_same_run(resumed: Path, straight: Path) -> None:
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    _same(a, b)
    assert a["oracle"] == b["oracle"] and a["step"] == b["step"]  # query counts included
    assert _steps(resumed / "steps.csv") == _steps(straight / "steps.csv")


# ------------------------------------------------------------------------------ the commands
def test_train_stops_on_sigint_and_the_same_command_resumes_bit_for_bit(tmp_path):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    argv = [*TRAIN, "--out", str(stopped)]
    code, err = _signal_child(argv, stopped / "steps.csv", signal.SIGINT)
    assert code == EXIT_INTERRUPTED == 130
    line = _assert_one_line(err, "train", "SIGINT", argv)
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=True)
    steps = len(_steps(stopped / "steps.csv"))
    # the step in flight was completed and counted: the checkpoint, the log and the line agree
    assert 3 <= checkpoint["step"] == steps < 45 and f"after step {steps} " in line and str(stopped) in line
    assert checkpoint["oracle"]["queries"] == 5 * steps  # RGE q=4: 5 queries a step, none half-spent
    assert main(argv) == 0  # the command of the hint
    assert main([*TRAIN, "--out", str(straight)]) == 0
    _assert_same_run(stopped, straight)


def test_sol_train_stops_on_sigterm_and_resumes_bit_for_bit(tmp_path):
    data = tmp_path / "data"
    assert main(["sol", "generate", "--out", str(data), *SOL_DATA]) == 0
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    argv = ["sol", "train", "--out", str(stopped), "--data", str(data / "trajectories.npz"), *SOL_TRAIN]
    code, err = _signal_child(argv, stopped / "zo-sol" / "steps.csv", signal.SIGTERM)
    assert code == EXIT_TERMINATED == 143
    _assert_one_line(err, "sol train", "SIGTERM", argv)
    step = torch.load(stopped / "zo-sol" / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 20 and not (stopped / "zo-sol" / "train.json").exists()
    assert main(argv) == 0
    assert main(["sol", "train", "--out", str(straight), "--data", str(data / "trajectories.npz"), *SOL_TRAIN]) == 0
    _assert_same_run(stopped / "zo-sol", straight / "zo-sol")
    for name in ("train.json", "eval.json"):  # queries, solver calls, steps and the test MAE
        a, b = (json.loads((d / "zo-sol" / name).read_text()) for d in (stopped, straight))
        a.pop("seconds"), b.pop("seconds")
        assert a == b


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from deepzero_oracle.adapters.defense.classifier import numpy_classifier_fn, train_classifier

    path = tmp_path_factory.mktemp("clf") / "classifier-digits.pt"
    train_classifier("digits", path, epochs=1, channels=(4,), max_train=200, progress=False)
    return numpy_classifier_fn(path)


CERTIFY = ["defense", "certify", "--method", "none", "--classifier", "support.stop_functions:classify", "--dataset",
           "digits", "--sigma", "0.25", "--n0", "10", "--n", "20", "--max-examples", "6", "--batch-size", "1000",
           "--quiet"]


def _log_rows(path: Path) -> list[list[str]]:
    """The log's rows without their wall-clock ``time`` column."""
    return [line.split("\t")[:-1] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_defense_certify_stops_after_the_image_in_flight_and_resumes_the_same_log(classifier, tmp_path, capsys,
                                                                                 signum):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    argv = [*CERTIFY, "--out", str(stopped)]
    before = _handlers()
    # 1 probe call, then 2 calls per image (n0, then n): the signal comes inside image 3
    stop_functions.arm(classifier, at=1 + 2 * 2 + 1, signum=signum)
    assert main(argv) == 128 + signum
    line = _assert_one_line(capsys.readouterr().err, "defense certify", signal.Signals(signum).name, argv)
    assert "after example 3 of 6" in line
    rows = _log_rows(stopped / "certify.tsv")
    assert len(rows) == 1 + 3 and not (stopped / "certify.json").exists()  # the header, 3 whole rows
    assert _handlers() == before  # the handlers are given back
    stop_functions.arm(classifier)
    assert main(argv) == 0
    assert main([*CERTIFY, "--out", str(straight)]) == 0
    assert _log_rows(stopped / "certify.tsv") == _log_rows(straight / "certify.tsv")
    assert len(_log_rows(straight / "certify.tsv")) == 7


DEFENSE_TRAIN = ["defense", "train", "--method", "zo-ds", "--classifier", "support.stop_functions:classify", "--dataset",
                 "digits", "--sigma", "0.25", "--objective", "stab", "--epochs", "2", "--max-train", "32",
                 "--batch-size", "8", "--width", "4", "--depth", "2", "--sparsity", "0", "--quiet"]


def test_defense_train_stops_mid_epoch_and_resumes_to_the_same_front_and_counts(classifier, tmp_path, capsys):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stop_functions.arm(classifier)
    assert main([*DEFENSE_TRAIN, "--out", str(straight)]) == 0
    calls = stop_functions.CALLS
    capsys.readouterr()
    argv = [*DEFENSE_TRAIN, "--out", str(stopped)]
    stop_functions.arm(classifier, at=calls * 3 // 4, signum=signal.SIGINT)  # in the second epoch's steps
    assert main(argv) == EXIT_INTERRUPTED
    _assert_one_line(capsys.readouterr().err, "defense train", "SIGINT", argv)
    step = torch.load(stopped / "stab" / "checkpoint.pt", weights_only=True)["step"]
    assert 4 < step < 8 and not (stopped / "run.json").exists()  # mid-way through epoch 2 of 4 steps each
    stop_functions.arm(classifier)
    assert main(argv) == 0
    _assert_same_run(stopped / "stab", straight / "stab")
    a, b = (json.loads((d / "run.json").read_text()) for d in (stopped, straight))
    assert (a["queries"], a["blackbox_images"]) == (b["queries"], b["blackbox_images"])
    fa, fb = (torch.load(d / "front.pt", weights_only=True) for d in (stopped, straight))
    _same(fa, fb)


# ------------------------------------------------------------------------------ the engine
class _SignalAt(Callback):
    """Sends ``signums`` to this process at the end of step ``step`` (as if Ctrl-C came then)."""

    def __init__(self, step: int, *signums: int):
        self.step, self.signums = step, signums

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step:
            for s in self.signums:
                os.kill(os.getpid(), s)


def _trainer(out, *callbacks, checkpoint_every=None, estimator=None) -> tuple[Trainer, TensorBatches]:
    torch.manual_seed(0)
    learner = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(2, (40,))
    oracle = ModuleOracle(learner, F.cross_entropy)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(oracle, estimator or RGE(q=2, mu=1e-3), optimizer, callbacks=callbacks, out_dir=out,
                      checkpoint_every=checkpoint_every, progress=False, seed=3)
    return trainer, TensorBatches(x, y, batch_size=8, seed=1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_trainer_fit_stops_after_the_step_in_flight_and_resumes_exactly(tmp_path, signum):
    before = _handlers()
    trainer, batches = _trainer(tmp_path / "straight")
    trainer.fit(batches, epochs=3)
    stopper, batches = _trainer(tmp_path / "stopped", _SignalAt(7, signum))
    with pytest.raises(StopRequested) as info:
        stopper.fit(batches, epochs=3)
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt) and stop.signum == signum and stop.exit_code == 128 + signum
    assert stop.saved and stop.run_dir == tmp_path / "stopped" and "after step 7 " in str(stop)
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["step"] == 7  # mid-epoch 2
    assert _handlers() == before
    resumed, batches = _trainer(tmp_path / "stopped")
    resumed.fit(batches, epochs=3)
    _assert_same_run(tmp_path / "stopped", tmp_path / "straight")


def test_a_second_signal_abandons_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # 5 steps an epoch: checkpoints at steps 3, 5 (the epoch's end), 6, 9, ...
    trainer, batches = _trainer(tmp_path, _SignalAt(8, signal.SIGINT, signal.SIGINT), checkpoint_every=3)
    with pytest.raises(StopRequested) as info:
        trainer.fit(batches, epochs=3)
    stop = info.value
    assert stop.second and not stop.saved
    assert "aborted by a second SIGINT" in str(stop) and "the checkpoint of step 6" in str(stop)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6


class _WorkersStoppedToo(RGE):
    """RGE whose ``fail_at``-th estimate meets the signal and fails, as a step does whose
    executor workers a scheduler signalled along with the main process."""

    def __init__(self, fail_at: int):
        super().__init__(q=2, mu=1e-3)
        self.calls, self.fail_at = 0, fail_at

    def estimate_and_loss(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("the workers were stopped too")
        return super().estimate_and_loss(*args, **kwargs)


def test_a_step_that_fails_once_signalled_stops_without_saving_it(tmp_path):
    trainer, batches = _trainer(tmp_path, checkpoint_every=2, estimator=_WorkersStoppedToo(fail_at=4))
    with pytest.raises(StopRequested) as info:
        trainer.fit(batches, epochs=3)
    stop = info.value
    assert stop.signum == signal.SIGTERM and not stop.saved and isinstance(stop.__cause__, RuntimeError)
    assert "during step 4, which failed (RuntimeError)" in str(stop) and "the checkpoint of step 2" in str(stop)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_signal_during_a_save_waits_for_it_and_outside_a_loop_stops_at_once():
    before = _handlers()
    with stop_on_signals(defer=False) as stop:  # what the command line wraps a command in
        with stop_on_signals() as inner:  # a loop, sharing the handlers
            assert inner is stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.signum == signal.SIGTERM  # a flag, nothing raised
            with stop.shielded():
                os.kill(os.getpid(), signal.SIGINT)  # a second one during a save: ignored
            assert stop.signum == signal.SIGTERM
            with pytest.raises(StopRequested) as info:  # ... after it, an abort
                os.kill(os.getpid(), signal.SIGINT)
            assert info.value.second
    with pytest.raises(StopRequested) as info:
        with stop_on_signals(defer=False):
            os.kill(os.getpid(), signal.SIGINT)
    assert info.value.signum == signal.SIGINT and not info.value.second and not info.value.saved
    done = []
    with pytest.raises(StopRequested):
        with stop_on_signals(defer=False) as stop:
            with stop.shielded():  # a save outside any loop: finished first, then the stop
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("saved")
            done.append("went on")
    assert done == ["saved"]
    assert _handlers() == before


def test_handle_signals_false_leaves_ctrl_c_alone(tmp_path):
    trainer, batches = _trainer(tmp_path, _SignalAt(2, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit(batches, epochs=1, handle_signals=False)
    assert not isinstance(info.value, StopRequested)
