"""The defense against a classifier served by MLServer (KServe v2 over gRPC).

The adapter exports its FO-trained classifier as ``.npz``; MLServer (its own venv, no torch)
serves it with the pure-NumPy forward of ``adapters/defense/npcnn.py``. The adapter then knows
only the URL: a denoiser is trained by ZO-DS and certified through ``KServeBlackBox``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import deepzero_oracle.adapters.defense as defense_pkg
from deepzero_oracle.adapters.defense.classifier import open_classifier, train_classifier, whitebox_classifier
from deepzero_oracle.adapters.defense.methods import DefenseConfig, certify_front, load_front, train_defense
from deepzero_oracle.apps.datasets import load_dataset
from test_kserve import VENV, _free_port, _ready, _stop, ensure_mlserver_venv

MODEL = "defense-classifier"

RUNTIME = '''
"""MLServer runtime: the defense adapter's exported classifier, NumPy only."""
import os

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from npcnn import forward, load_npz


class Classifier(MLModel):
    async def load(self) -> bool:
        self.weights = load_npz(os.path.join(os.getcwd(), "classifier.npz"))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("logits", forward(self.weights, x))])
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ensure_mlserver_venv()
    work = tmp_path_factory.mktemp("mlserver-defense")
    clf = work / "classifier.pt"
    train_classifier("digits", clf, epochs=5, channels=(8, 8), max_train=600, batch_size=32,
                            lr=1e-2, progress=False)  # writes classifier.npz
    shutil.copy(Path(defense_pkg.__file__).parent / "npcnn.py", work / "npcnn.py")
    (work / "defense_runtime.py").write_text(RUNTIME)
    (work / MODEL).mkdir()
    (work / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "defense_runtime.Classifier",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}))
    settings = {"host": "127.0.0.1", "http_port": _free_port(), "grpc_port": _free_port(),
                "parallel_workers": 0, "metrics_endpoint": None, "load_models_at_startup": True}
    (work / "settings.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(work / "mlserver.log", "wb") as log:
        proc = subprocess.Popen([str(VENV / "bin" / "mlserver"), "start", "."], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = f"http://127.0.0.1:{settings['http_port']}/v2/models/{MODEL}/ready"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not _ready(ready):
            time.sleep(0.3)
        if not _ready(ready):
            pytest.fail("MLServer did not get ready; log tail:\n"
                        + (work / "mlserver.log").read_text(errors="replace")[-3000:])
        yield {"spec": f"kserve://127.0.0.1:{settings['grpc_port']}/{MODEL}", "weights": work / "classifier.npz",
               "clf": clf}
    finally:
        _stop(proc)


@pytest.mark.slow  # ~65 s on 2 busy cores (MLServer start-up + classifier training)
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
