"""A pure-NumPy forward pass of the adapter's small CNN classifier.

No torch import: this file is copied next to a model server (e.g. an MLServer runtime, whose
virtual environment has no torch) so the *served* classifier is exactly the weights the adapter
exported with :func:`deepzero_oracle.adapters.defense.classifier.export_npz`.

The ``.npz`` holds ``spec``: layer kinds in order (``conv:<i>``, ``relu``, ``pool``, ``flatten``,
``linear:<i>``; 3x3 convs with padding 1 and 2x2 max-pooling, as the model zoo's ``deepzero_oracle.common.models.cnn``)
and ``<i>.weight`` / ``<i>.bias`` arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = ["load_npz", "forward"]


def load_npz(path) -> dict:
    """Read an exported classifier: ``{"spec": [str, ...], "<i>.weight": ndarray, ...}``."""
    with np.load(path, allow_pickle=False) as data:  # never unpickle a model file
        out = {k: np.array(data[k]) for k in data.files}
    out["spec"] = [str(s) for s in out["spec"]]
    return out


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    # [N, C, H, W] -> [N, O, H, W]; im2col through a strided view, one tensordot.
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [N, C, H, W, 3, 3]
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # [N, H, W, O]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) + b[None, :, None, None]


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def forward(weights: dict, x: np.ndarray) -> np.ndarray:
    """Logits ``[N, classes]`` for images ``x [N, C, H, W]`` (float32 or float64, same dtype out)."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
    h = x.astype(dtype, copy=False)
    for kind in weights["spec"]:
        name, _, idx = kind.partition(":")
        if name == "conv":
            h = _conv3x3(h, weights[f"{idx}.weight"].astype(dtype), weights[f"{idx}.bias"].astype(dtype))
        elif name == "relu":
            h = np.maximum(h, 0)
        elif name == "pool":
            h = _maxpool2(h)
        elif name == "flatten":
            h = h.reshape(len(h), -1)
        elif name == "linear":
            h = h @ weights[f"{idx}.weight"].astype(dtype).T + weights[f"{idx}.bias"].astype(dtype)
        else:
            raise ValueError(f"unknown layer kind {kind!r} in the exported classifier")
    return h.astype(dtype, copy=False)
