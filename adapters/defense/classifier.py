"""The frozen classifier the defense robustifies: trained once with FO, then only queried.

- :func:`train_classifier` trains the model zoo's ``cnn`` with autograd (the engine's Trainer
  with the ``Autograd`` estimator) on the offline example data and saves it (a state dict plus its shape metadata, and a NumPy ``.npz`` export that a
  model server without torch can load, see :mod:`.npcnn`).
- :func:`frozen_blackbox` exposes the saved model as a :class:`LocalBlackBox` around a closure
  that receives NumPy arrays and returns NumPy logits: nothing about the model leaks out (no
  ``parameters``, no autograd graph).
- :func:`open_classifier` turns a ``--classifier`` spec (``local``, ``grpc://host:port[/model]``,
  ``kserve://host:port/model``) into a black box.
- :func:`whitebox_classifier` loads the same weights as an ``nn.Module``: only FO-DS, the
  white-box reference, uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import Autograd, LocalBlackBox, ModuleOracle, TensorBatches, Trainer
from deepzero_oracle.apps.datasets import load_dataset
from deepzero_oracle.apps.models import cnn
from deepzero_oracle.atomic import save_torch

__all__ = [
    "default_classifier_path",
    "train_classifier",
    "ensure_classifier",
    "whitebox_classifier",
    "frozen_blackbox",
    "export_npz",
    "open_classifier",
    "numpy_classifier_fn",
]


def default_classifier_path(dataset: str, root: str | Path = "runs/defense") -> Path:
    """Where ``local`` classifiers live by default: ``<root>/classifier-<dataset>.pt``."""
    return Path(root) / f"classifier-{dataset}.pt"


def _build(meta: dict) -> nn.Sequential:
    return cnn(tuple(meta["in_shape"]), int(meta["classes"]), tuple(meta["channels"]))


def train_classifier(dataset: str, path: str | Path, *, epochs: int | None = None, batch_size: int = 64,
                     lr: float = 3e-3, channels: tuple[int, ...] = (16, 16, 32), seed: int = 0,
                     max_train: int | None = None, progress: bool = True) -> dict:
    """Train the base classifier with FO (autograd, Adam) on clean images and save it.

    Args:
        dataset: "digits" (8x8) or "mnist5k" (28x28).
        path: output ``.pt`` (``{"state_dict", "meta"}``); ``<path>.npz`` gets the NumPy export.
        epochs: default 15 on digits, 8 on MNIST-5k.
        max_train: train on the first ``max_train`` training images only (quick tests).
    Returns:
        the metadata dict (``in_shape``, ``classes``, ``channels``, ``dataset``, ``test_accuracy``).
    """
    data = load_dataset(dataset)
    x_train, y_train = data.x_train[:max_train], data.y_train[:max_train]
    torch.manual_seed(seed)
    meta = {"dataset": dataset, "in_shape": list(data.image_shape), "classes": data.classes,
            "channels": list(channels)}
    model = _build(meta)
    epochs = epochs if epochs is not None else (15 if dataset == "digits" else 8)
    # The defender's ordinary FO classifier (autograd), not a ZO experiment
    trainer = Trainer(ModuleOracle(model, F.cross_entropy), Autograd(), torch.optim.Adam(model.parameters(), lr=lr),
                      seed=seed, progress=progress, desc=f"classifier ({dataset})")
    trainer.fit(TensorBatches(x_train, y_train, batch_size=batch_size, seed=seed), epochs=epochs)
    model.eval()
    with torch.no_grad():
        meta["test_accuracy"] = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    path = save_torch({"state_dict": model.state_dict(), "meta": meta}, path)
    export_npz(model, path.with_suffix(".npz"))
    return meta


def ensure_classifier(dataset: str, path: str | Path | None = None, *, progress: bool = True) -> Path:
    """The path of a trained ``local`` classifier for ``dataset``, training it on first use."""
    path = Path(path) if path is not None else default_classifier_path(dataset)
    if not path.exists():
        train_classifier(dataset, path, progress=progress)
    return path


def whitebox_classifier(path: str | Path) -> nn.Module:
    """The saved classifier as a frozen ``nn.Module`` (eval mode, ``requires_grad=False``).

    Only for FO-DS, the white-box reference; every other method sees the black box.
    """
    saved = torch.load(path, weights_only=True)
    model = _build(saved["meta"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_npz(model: nn.Sequential, path: str | Path) -> Path:
    """Write ``model`` (a ``models.cnn`` Sequential) as ``.npz`` for :func:`.npcnn.forward`."""
    spec, arrays = [], {}
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            if layer.kernel_size != (3, 3) or layer.padding != (1, 1) or layer.stride != (1, 1):
                raise ValueError("the NumPy export handles 3x3 convolutions with padding 1, stride 1")
            spec.append(f"conv:{i}")
        elif isinstance(layer, nn.ReLU):
            spec.append("relu")
        elif isinstance(layer, nn.MaxPool2d):
            spec.append("pool")
        elif isinstance(layer, nn.Flatten):
            spec.append("flatten")
        elif isinstance(layer, nn.Linear):
            spec.append(f"linear:{i}")
        else:
            raise ValueError(f"cannot export layer {layer!r}")
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            arrays[f"{i}.weight"] = layer.weight.detach().numpy()
            arrays[f"{i}.bias"] = layer.bias.detach().numpy()
    path = Path(path)
    np.savez(path, spec=np.array(spec), **arrays)
    return path


def numpy_classifier_fn(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A closure ``x [N, C, H, W] ndarray -> logits [N, classes] ndarray`` over a saved classifier.

    The model lives only inside the closure; the returned function exposes no parameters and
    returns plain arrays, so no autograd graph can reach the weights.
    """
    model = whitebox_classifier(path)

    def classify(x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError("the frozen classifier takes numpy arrays only")
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return classify


def frozen_blackbox(path: str | Path) -> LocalBlackBox:
    """The saved classifier as a query-only black box: ``[N, C, H, W] -> [N, classes]`` logits."""
    return LocalBlackBox(numpy_classifier_fn(path), numpy=True)


def open_classifier(spec: str, dataset: str, *, path: str | Path | None = None, timeout: float = 60.0,
                    progress: bool = True):
    """A black box from a ``--classifier`` spec.

    Args:
        spec: ``local`` (the adapter's own classifier at ``path``, trained on first use),
            ``grpc://host:port[/model]`` (our gRPC server) or ``kserve://host:port/model`` (any
            KServe v2 gRPC server, e.g. MLServer or Triton).
        dataset: used for the default ``local`` path.
    Returns:
        a callable ``[N, C, H, W] -> [N, classes]`` (LocalBlackBox, GrpcBlackBox or KServeBlackBox).
    """
    if spec == "local":
        return frozen_blackbox(ensure_classifier(dataset, path, progress=progress))
    if spec.startswith("grpc://"):
        from deepzero_oracle.blackbox import GrpcBlackBox

        target, _, model = spec[len("grpc://"):].partition("/")
        return GrpcBlackBox(target, model=model, timeout=timeout)
    if spec.startswith("kserve://"):
        from deepzero_oracle.blackbox import KServeBlackBox

        target, _, model = spec[len("kserve://"):].partition("/")
        if not model:
            raise ValueError(f"{spec!r}: a KServe classifier needs a model name, kserve://host:port/model")
        return KServeBlackBox(target, model, protocol="grpc", timeout=timeout)
    raise ValueError(f"unknown classifier {spec!r}; use local, grpc://host:port[/model] or kserve://host:port/model")
