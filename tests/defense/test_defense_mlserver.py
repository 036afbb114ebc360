"""The defense against a classifier served by MLServer (KServe v2 over gRPC).

The adapter exports its FO-trained classifier as ``.npz``; MLServer (its own venv, no torch)
serves it with the pure-NumPy forward of ``adapters/defense/npcnn.py``. The adapter then knows
only the URL: a denoiser is trained by ZO-DS and certified through ``KServeBlackBox``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import deepzero_oracle.adapters.defense as defense_pkg
from deepzero_oracle.adapters.defense.classifier import open_classifier, train_classifier, whitebox_classifier
from deepzero_oracle.adapters.defense.certification import certify_front
from deepzero_oracle.adapters.defense.fronts import load_front
from deepzero_oracle.adapters.defense.training import DefenseConfig, train_defense
from deepzero_oracle.common.datasets import load_dataset
from support.mlserver_peer import VENV, ensure_mlserver_venv, function_model, start_mlserver

MODEL = "defense-classifier"

# served by tests/mlserver/function_runtime.py: the exported weights, loaded once on import
FUNCTION = '''"""The defense adapter's exported classifier, NumPy only: x [N, 1, 8, 8] -> logits [N, 10]."""
import os

from npcnn import forward, load_npz

WEIGHTS = load_npz(os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier.npz"))


def classify(x):
    return forward(WEIGHTS, x)
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ensure_mlserver_venv()
    work = tmp_path_factory.mktemp("mlserver-defense")
    clf = work / "classifier.pt"
    train_classifier("digits", clf, epochs=5, channels=(8, 8), max_train=600, batch_size=32,
                            lr=1e-2, progress=False)  # writes classifier.npz
    (work / "defense_function.py").write_text(FUNCTION)
    model = function_model("defense_function:classify", [("x", "FP32", [-1, 1, 8, 8])], [("logits", "FP32", [-1, 10])])
    with start_mlserver(work, {MODEL: model}, VENV, files=[Path(defense_pkg.__file__).parent / "npcnn.py"],
                        startup_timeout=180) as peer:
        yield {"spec": f"kserve://{peer.grpc}/{MODEL}", "weights": work / "classifier.npz", "clf": clf}


@pytest.mark.slow  # MLServer start-up + classifier training
def test_denoiser_trained_and_certified_against_mlserver(served, tmp_path):
    digest = hashlib.sha256(served["weights"].read_bytes()).hexdigest()
    # The adapter gets only the URL.
    box = open_classifier(served["spec"], "digits", timeout=120)
    data = load_dataset("digits")
    with torch.no_grad():
        want = whitebox_classifier(served["clf"])(data.x_test[:64])
    got = box(data.x_test[:64])
    assert got.shape == (64, 10) and torch.allclose(got, want, atol=1e-4)  # NumPy forward == torch

    cfg = DefenseConfig(method="zo-ds", dataset="digits", sigma=0.25, objective="mse+stab", epochs=1,
                        pretrain_epochs=1, max_train=64, width=4, depth=2)
    info = train_defense(cfg, box, tmp_path / "zo-ds", progress=False)
    assert info["queries"] > 0 and info["blackbox_images"] > 0
    front, _ = load_front(tmp_path / "zo-ds")
    run = certify_front(front, box, "digits", 0.25, n0=10, n=20, max_examples=3, progress=False,
                        log_path=tmp_path / "zo-ds" / "certify.tsv")
    assert run.queries == 3 * 30 and len(run.rows) == 3
    assert run.certified_accuracy()[0.0] >= 0  # ran end to end; tiny sizes certify little
    assert hashlib.sha256(served["weights"].read_bytes()).hexdigest() == digest
