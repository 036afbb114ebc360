"""The defense from Python: the "From Python" example of docs/DEFENSE.md runs as written (a
user's NumPy classifier, a denoiser trained by ZO through its calls, certification), the
package exports what that needs, a query budget stops and continues a run, and a hand-made
image ``.npz`` with exactly the documented keys is read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import deepzero_oracle.adapters.defense as defense
from deepzero_oracle.adapters.defense import (load_data, load_front, open_classifier, read_npz,
                                              train_defense)

DOC = Path(__file__).resolve().parents[2] / "docs" / "DEFENSE.md"


def _example() -> str:
    section = DOC.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The docs' example, run in a fresh folder; its namespace."""
    folder = tmp_path_factory.mktemp("from-python")
    here = Path.cwd()
    os.chdir(folder)
    try:
        namespace = {"__name__": "defense_example"}
        exec(compile(_example(), str(DOC), "exec"), namespace)
    finally:
        os.chdir(here)
    return folder, namespace


def test_the_package_exports_what_a_user_needs():
    for name in ("train_defense", "certify", "certify_front", "Smooth", "DefenseConfig", "open_classifier",
                 "load_front", "load_data", "Classifier", "CertifyRun", "METHODS"):
        assert name in defense.__all__, name
        assert getattr(defense, name) is not None
    assert defense.certify is defense.certify_front
    with pytest.raises(AttributeError):
        defense.no_such_thing  # noqa: B018


def test_the_docs_example_trains_and_certifies_a_numpy_classifier(example):
    folder, ns = example
    info, result = ns["info"], ns["result"]
    run = folder / "runs" / "mine" / "zo-ds"
    assert (run / "front.pt").exists() and (run / "run.json").exists() and (run / "certify.tsv").exists()
    assert info["method"] == "zo-ds" and info["stopped_reason"] is None
    assert info["classifier"]["spec"] == "python:my_classifier" and info["classifier"]["output"] == "logits"
    # the clean labels (one query per training image) plus the ZO steps' queries
    assert info["queries"] > 96 and info["blackbox_images"] > info["queries"]
    assert info["pipeline_clean_accuracy"] > 0.5  # the front keeps the classifier's own answers mostly
    summary = result.summary()
    assert summary["examples"] == 16 and summary["queries"] == 16 * (10 + 1000)
    accuracy = summary["certified_accuracy"]
    assert list(accuracy) == ["0.0", "0.25", "0.5", "0.75"]
    assert all(0.0 <= a <= 1.0 for a in accuracy.values()) and accuracy["0.0"] >= accuracy["0.75"]
    assert {int(r["predict"]) for r in result.rows} <= {-1, 0, 1, 2}


def test_a_budget_stops_the_run_and_a_larger_one_continues_it(example, tmp_path):
    folder, ns = example
    data, config, full = load_data(str(folder / "mine.npz")), ns["config"], ns["info"]
    with open_classifier(ns["my_classifier"], data) as classifier:
        out = tmp_path / "budget"
        stopped = train_defense(config, classifier, out, data=data, max_queries=full["queries"] // 2)
        assert stopped["stopped_reason"] == f"query budget of {full['queries'] // 2} reached"
        assert 96 < stopped["queries"] <= full["queries"] // 2
        assert (out / "stab" / "checkpoint.pt").exists() and not (out / "front.pt").exists()
        done = train_defense(config, classifier, out, data=data, max_queries=full["queries"])
    assert done["stopped_reason"] is None and done["queries"] == full["queries"]
    resumed, _ = load_front(out)
    straight, _ = load_front(folder / "runs" / "mine" / "zo-ds")
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name  # the same trajectory as the uninterrupted run


def test_a_hand_made_image_npz_with_the_documented_keys_is_read(example, tmp_path):
    folder, _ = example
    with np.load(folder / "mine.npz") as archive:
        assert sorted(archive.files) == ["x_test", "x_train", "y_test", "y_train"]
    data = read_npz(folder / "mine.npz")
    assert data.x_train.shape == (96, 1, 8, 8) and data.x_test.shape == (16, 1, 8, 8)
    assert data.classes == int(max(data.y_train.max(), data.y_test.max())) + 1
    # uint8 labels, float64 images and the optional class count, as numpy.savez writes them
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "more.npz", x_train=rng.random((12, 3, 4, 4)), y_train=np.arange(12, dtype=np.uint8) % 3,
             x_test=rng.random((5, 3, 4, 4)), y_test=np.arange(5, dtype=np.uint8) % 3, classes=np.int64(10))
    more = load_data(str(tmp_path / "more.npz"))
    assert more.classes == 10 and more.x_train.dtype == torch.float32 and more.y_train.dtype == torch.int64
