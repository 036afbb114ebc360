"""The classifier to robustify, as a plain function: images [N, C, H, W] in [0, 1] ->
probabilities [N, classes]. NumPy only (the MLP trained by train_mlp.py); the defense never sees
its weights, only its answers.

    deepzero-oracle serve classifier:classify --port 50061     # from this folder
    deepzero-oracle defense train ... --classifier kserve://127.0.0.1:50061/classify
"""

from pathlib import Path

import numpy as np

_WEIGHTS = np.load(Path(__file__).with_name("mlp.npz"))


def classify(images):
    """``images [N, C, H, W]`` (NumPy array or torch tensor) -> probabilities ``[N, classes]`` (float32)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    hidden = np.maximum(x @ _WEIGHTS["w1"] + _WEIGHTS["b1"], 0.0)
    logits = hidden @ _WEIGHTS["w2"] + _WEIGHTS["b2"]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)
