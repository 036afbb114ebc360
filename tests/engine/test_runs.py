"""RunFolder: the settings file, the resume check, restart and atomic writes; and the callers
(certification, SOL trajectories) that now refuse other settings with SettingsMismatch."""

from __future__ import annotations

import json

import pytest
import torch

from deepzero_oracle.errors import SettingsMismatch
from deepzero_oracle.runs import RunFolder, atomic_write, check_settings, save_torch, write_json


def test_a_new_run_writes_its_settings_and_the_same_settings_resume(tmp_path):
    run = RunFolder(tmp_path / "a", {"lr": 0.1, "layers": (2, 3)})
    assert run.open() is False  # a new run
    assert json.loads((tmp_path / "a" / "settings.json").read_text()) == {"lr": 0.1, "layers": [2, 3]}
    # a tuple saved as a JSON list, 2.0 as 2: the same settings
    assert RunFolder(tmp_path / "a", {"lr": 0.1, "layers": [2, 3]}).open() is True
    named = RunFolder(tmp_path / "a", {"n": 2.0}, name="certify")
    assert named.settings_path == tmp_path / "a" / "certify.settings.json"
    named.open()
    assert RunFolder(tmp_path / "a", {"n": 2}, name="certify").open() is True


def test_each_difference_is_named_with_what_to_do(tmp_path):
    RunFolder(tmp_path, {"lr": 0.1, "model": "mlp", "steps": 10}).open()
    with pytest.raises(SettingsMismatch) as err:
        RunFolder(tmp_path, {"lr": 0.05, "model": "cnn", "steps": 10, "seed": 1}).open()
    message = str(err.value)
    assert "lr: 0.1 in the run, 0.05 now" in message
    assert "model: 'mlp' in the run, 'cnn' now" in message
    assert "seed: None in the run, 1 now" in message  # a key new to this run
    assert "steps" not in message  # unchanged
    assert "--restart" in message and "--out" in message
    assert isinstance(err.value, ValueError)  # the command line exits 2 for it
    # the refused run changed nothing on disk
    assert json.loads((tmp_path / "settings.json").read_text())["lr"] == 0.1


def test_a_checkpoints_settings_are_checked_and_a_missing_one_is_a_new_run(tmp_path):
    run = RunFolder(tmp_path, {"stage": "x", "lr": 0.1})
    run.check_checkpoint()  # nothing there: nothing to check
    save_torch({"settings": {"stage": "x", "lr": 0.1}, "w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    run.check_checkpoint()
    with pytest.raises(SettingsMismatch, match=r"lr: 0\.1 in the run, 0\.2 now"):
        RunFolder(tmp_path, {"stage": "x", "lr": 0.2}).check_checkpoint()
    check_settings(None, {"lr": 1})  # a run without settings: nothing compared


def test_restart_removes_only_what_the_run_wrote(tmp_path):
    run = RunFolder(tmp_path, {"lr": 0.1}, files=("log.csv", "stage"))
    run.open()
    run.write_text("log.csv", "step\n1\n")
    run.save_torch("stage/checkpoint.pt", {"w": torch.zeros(1)})
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.csv").write_text("x")
    RunFolder(tmp_path, {"lr": 0.5}, files=("log.csv", "stage")).open(restart=True)  # other settings: a new run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other", "settings.json"]
    assert (tmp_path / "other" / "keep.csv").read_text() == "x"
    assert json.loads((tmp_path / "settings.json").read_text()) == {"lr": 0.5}


def test_an_atomic_write_that_fails_leaves_no_partial_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"ok": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"ok": 2, "trunc')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"ok": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
    with pytest.raises(TypeError):  # not JSON: the write fails before anything is replaced
        RunFolder(tmp_path).write_json("result.json", {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_certify_resume_with_other_settings_raises_settings_mismatch(tmp_path):
    from deepzero_oracle.adapters.defense.certification import certify_dataset
    from deepzero_oracle.adapters.defense.smoothing import Smooth

    def sign_of_pixel0(x):  # [B, 1, 2, 2] -> the label [B]: 1 iff the first pixel is positive
        return (x[:, 0, 0, 0] > 0).long()

    xs, labels = torch.ones(2, 1, 2, 2), torch.ones(2, dtype=torch.long)
    log = tmp_path / "certify.tsv"
    kw = dict(n0=10, n=50, alpha=0.01, batch_size=50, progress=False)
    certify_dataset(Smooth(sign_of_pixel0, 2, 0.25), xs, labels, log_path=log, **kw)
    assert (tmp_path / "certify.settings.json").exists()
    with pytest.raises(SettingsMismatch, match="n: 50 in the run, 60 now") as err:
        certify_dataset(Smooth(sign_of_pixel0, 2, 0.25), xs, labels, log_path=log, resume=True,
                        **dict(kw, n=60))
    assert "--restart" in str(err.value)


def test_sol_trajectories_of_other_settings_raise_settings_mismatch(tmp_path):
    from deepzero_oracle.adapters.sol import compare

    settings = dict(scenario="burgers", size="tiny", n_train=1, n_test=1, train_steps=2, test_steps=2)
    info = compare.generate(tmp_path, progress=False, **settings)
    assert info["train_states"][0] == 1
    before = (tmp_path / "trajectories.npz").read_bytes()
    with pytest.raises(SettingsMismatch, match="n_test: 1 in the run, 2 now") as err:
        compare.generate(tmp_path, progress=False, **dict(settings, n_test=2))
    assert "--restart" in str(err.value) and "n_train" not in str(err.value)
    assert (tmp_path / "trajectories.npz").read_bytes() == before  # refused before anything changed
    (tmp_path / "mine.txt").write_text("kept")
    assert compare.generate(tmp_path, progress=False, restart=True, **dict(settings, n_test=2))["test_states"][0] == 2
    assert (tmp_path / "mine.txt").read_text() == "kept"
