"""The classifier the defense robustifies, which it only queries.

- :func:`open_classifier` turns a ``--classifier`` value into a :class:`Classifier`
  (``images [N, C, H, W] -> logits [N, classes]``) checked against the data before any training:
  the model's KServe v2 metadata (input name, datatype, shape) and one probe call whose answer
  must have one score per class. Specs: ``local``, or any black-box spec of
  ``deepzero_oracle.blackbox.spec`` (``grpc://``, ``kserve://``, ``kserve+http://``,
  ``MODULE:FUNCTION``; a ``MODULE:ATTR`` naming a ``torch.nn.Module`` is also a white box).
- ``local``, the example classifier: :func:`train_classifier` trains the model zoo's ``cnn``
  with autograd (the engine's Trainer with the ``Autograd`` estimator) on an example dataset and
  saves it (a state dict plus its shape metadata, and a NumPy ``.npz`` export that a model server
  without torch can load, see :mod:`.npcnn`).
- :func:`frozen_blackbox` exposes a saved model as a :class:`LocalBlackBox` around a closure
  that receives NumPy arrays and returns NumPy logits (:func:`query_only`): nothing about the
  model leaks out (no ``parameters``, no autograd graph).
- :func:`whitebox_classifier` loads the same weights as a frozen ``nn.Module``: only FO-DS, the
  white-box reference, uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import Autograd, LocalBlackBox, ModuleOracle, TensorBatches, Trainer
from deepzero_oracle.blackbox import BlackBoxError, BlackBoxTimeout, BlackBoxUnavailable, as_tensor
from deepzero_oracle.blackbox.spec import BlackBoxSpec, load_callable, open_blackbox
from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.common.models import cnn
from deepzero_oracle.adapters.defense.denoiser import channels_last_runner
from deepzero_oracle.runs import save_torch

__all__ = [
    "FLOAT_DATATYPES",
    "PROBE_IMAGES",
    "Classifier",
    "ClassifierInput",
    "classifier_input",
    "default_classifier_path",
    "train_classifier",
    "ensure_classifier",
    "whitebox_classifier",
    "frozen_blackbox",
    "export_npz",
    "open_classifier",
    "numpy_classifier_fn",
    "query_only",
    "freeze",
]


def default_classifier_path(dataset: str, root: str | Path = "runs/defense") -> Path:
    """Where ``local`` classifiers live by default: ``<root>/classifier-<dataset>.pt``."""
    return Path(root) / f"classifier-{dataset}.pt"


def _build(meta: dict) -> nn.Sequential:
    return cnn(tuple(meta["in_shape"]), int(meta["classes"]), tuple(meta["channels"]))


def train_classifier(dataset: str, path: str | Path, *, epochs: int | None = None, batch_size: int = 64,
                     lr: float = 3e-3, channels: tuple[int, ...] = (16, 16, 32), seed: int = 0,
                     max_train: int | None = None, progress: bool | None = None) -> dict:
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


def ensure_classifier(dataset: str, path: str | Path | None = None, *, progress: bool | None = None) -> Path:
    """The path of a trained ``local`` classifier for ``dataset``, training it on first use."""
    path = Path(path) if path is not None else default_classifier_path(dataset)
    if not path.exists():
        train_classifier(dataset, path, progress=progress)
    return path


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with ``requires_grad=False`` everywhere (in place); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def whitebox_classifier(path: str | Path) -> nn.Module:
    """The saved classifier as a frozen ``nn.Module`` (eval mode, ``requires_grad=False``).

    Only for FO-DS, the white-box reference; every other method sees the black box.
    """
    saved = torch.load(path, weights_only=True)
    model = _build(saved["meta"])
    model.load_state_dict(saved["state_dict"])
    return freeze(model)


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


def query_only(model: nn.Module, *, channels_last: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A closure ``x [N, C, H, W] ndarray -> scores [N, classes] ndarray`` over ``model``.

    The model lives only inside the closure; the returned function exposes no parameters and
    returns plain arrays, so no autograd graph can reach the weights. Inputs are cast to the
    model's floating dtype. ``channels_last`` runs a channels-last copy of the model (faster
    convolutions on a CPU, equal scores up to float rounding); only for models
    whose layers take any memory layout (the model zoo's; a ``.view`` on activations does not).
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    run = channels_last_runner(model) if channels_last else model

    def classify(x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError("the frozen classifier takes numpy arrays only")
        with torch.no_grad():
            return run(torch.from_numpy(np.ascontiguousarray(x)).to(dtype)).numpy()

    return classify


def numpy_classifier_fn(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`query_only` over a saved ``local`` classifier: ``x [N, C, H, W] -> logits [N, classes]``."""
    return query_only(whitebox_classifier(path), channels_last=True)


def frozen_blackbox(path: str | Path) -> LocalBlackBox:
    """The saved classifier as a query-only black box: ``[N, C, H, W] -> [N, classes]`` logits."""
    return LocalBlackBox(numpy_classifier_fn(path), numpy=True)


# ----------------------------------------------------------------------------------------------
# Any classifier from a spec, checked against the data before training
# ----------------------------------------------------------------------------------------------

#: The datatypes images may be sent in (they are floats in [0, 1]).
FLOAT_DATATYPES = {"FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64}
#: Images sent by the probe call that checks a classifier before training.
PROBE_IMAGES = 8


@dataclass(frozen=True)
class ClassifierInput:
    """How images are sent to a classifier.

    Attributes:
        name: the input tensor's name in the model's metadata (None: not declared).
        datatype: "FP16", "FP32" or "FP64"; images are cast to it before every call.
        shape: the declared shape, e.g. ``(-1, 1, 8, 8)`` (-1: any), or None if not declared.
    """

    name: str | None = None
    datatype: str = "FP32"
    shape: tuple[int, ...] | None = None


def classifier_input(metadata: dict | None, image_shape: tuple[int, ...], classes: int,
                     where: str = "the classifier") -> ClassifierInput:
    """Read a model's KServe v2 metadata and check it against the data.

    Args:
        metadata: ``{"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}`` or None.
        image_shape: the data's ``(C, H, W)``; classes: its class count.
        where: the spec, for the messages.
    Returns:
        the :class:`ClassifierInput`; an undeclared datatype is FP32, an undeclared shape the data's.
    Raises:
        ValueError: more than one input, a non-float datatype, a shape that does not fit
        ``[N, C, H, W]``, or a declared output width other than ``classes``.
    """
    if not metadata:
        return ClassifierInput()
    inputs = metadata.get("inputs") or []
    if len(inputs) > 1:
        names = [t.get("name") for t in inputs]
        raise ValueError(f"{where} takes {len(inputs)} inputs {names}; a classifier takes one image tensor "
                         f"[N, {', '.join(map(str, image_shape))}]")
    if not inputs:
        return ClassifierInput()
    declared = inputs[0]
    name, datatype = declared.get("name") or None, declared.get("datatype") or "FP32"
    if datatype not in FLOAT_DATATYPES:
        raise ValueError(f"{where}: input {name!r} is declared {datatype}, but images in [0, 1] are sent as "
                         f"floats; declare it {', '.join(FLOAT_DATATYPES)} (scale pixels inside the model)")
    shape = tuple(int(d) for d in declared.get("shape") or ()) or None
    if shape is not None:
        image = shape[1:] if len(shape) == len(image_shape) + 1 else shape
        if len(image) != len(image_shape) or any(d not in (-1, s) for d, s in zip(image, image_shape)):
            raise ValueError(f"{where}: input {name!r} is declared with shape {list(shape)}, but the images are "
                             f"[N, {', '.join(map(str, image_shape))}] (-1 means any); serve a classifier for "
                             "these images or give images of its shape")
    outputs = metadata.get("outputs") or []
    if len(outputs) == 1 and len(outputs[0].get("shape") or ()) == 2 and outputs[0]["shape"][1] not in (-1, classes):
        raise ValueError(f"{where}: output {outputs[0].get('name')!r} is declared {list(outputs[0]['shape'])}, "
                         f"but the data has {classes} classes; the classifier must score every class")
    return ClassifierInput(name, datatype, shape)


class Classifier:
    """A classifier black box checked against the data: ``images [N, C, H, W] -> scores [N, classes]``.

    Images are sent in the declared datatype. Scores are logits: a classifier found by
    :meth:`probe` to answer probabilities (rows in [0, 1] summing to 1) is answered with their
    logarithms, which have the same softmax and argmax, so cross-entropy sees the right thing.

    Args:
        spec: the ``--classifier`` value (for messages and run records).
        blackbox: the opened black box (LocalBlackBox, GrpcBlackBox or KServeBlackBox).
        classes: the data's class count.
        whitebox: the same classifier as a frozen ``nn.Module`` when it is one (FO-DS needs it).
    """

    def __init__(self, spec: str, blackbox: Callable, classes: int, *, whitebox: nn.Module | None = None):
        self.spec, self.blackbox, self.classes, self.whitebox = spec, blackbox, int(classes), whitebox
        self.input = ClassifierInput()
        self.output = "logits"

    def __call__(self, images) -> torch.Tensor:
        """``images [N, C, H, W]`` -> logits ``[N, classes]`` in the images' float dtype."""
        images = as_tensor(images).detach()
        scores = self.blackbox(images.to(FLOAT_DATATYPES[self.input.datatype]))
        if isinstance(scores, tuple):
            raise ValueError(f"{self.spec} answers {len(scores)} outputs; a classifier answers one, scores "
                             f"[N, {self.classes}]")
        scores = as_tensor(scores).to(images.dtype if images.is_floating_point() else torch.float32)
        if self.output == "probabilities":
            scores = scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
        return scores

    def check(self, images: torch.Tensor) -> "Classifier":
        """Read the model's metadata, then :meth:`probe` with ``images [n, C, H, W]``; returns self.

        A black box that cannot be reached raises ``BlackBoxUnavailable`` / ``BlackBoxTimeout``;
        any other failure is a ``ValueError`` saying what to change.
        """
        where = f"--classifier {self.spec}"
        try:
            metadata = getattr(self.blackbox, "metadata", lambda: None)()
        except (BlackBoxUnavailable, BlackBoxTimeout):
            raise
        except BlackBoxError as err:
            raise ValueError(f"{where}: its metadata could not be read: {err}") from err
        self.input = classifier_input(metadata, tuple(images.shape[1:]), self.classes, where)
        return self.probe(images)

    def probe(self, images: torch.Tensor) -> "Classifier":
        """One call on ``images [n, C, H, W]``: the answer must be finite scores ``[n, classes]``.

        Decides whether the classifier answers logits or probabilities; returns self.
        """
        where = f"--classifier {self.spec}"
        self.output = "logits"
        sent = f"{len(images)} images [{', '.join(map(str, images.shape))}] as {self.input.datatype}"
        try:
            scores = self(images)
        except (BlackBoxUnavailable, BlackBoxTimeout):
            raise
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 -- whatever the user's classifier raised, said before training
            raise ValueError(f"{where} failed on a probe of {sent}: {type(err).__name__}: {err}") from err
        if scores.ndim != 2 or scores.shape[1] != self.classes:
            raise ValueError(f"{where} answered a probe of {sent} with scores shaped {list(scores.shape)}; "
                             f"expected [{len(images)}, {self.classes}], one score per class of the data "
                             f"({self.classes} classes; an .npz may state more with its 'classes' entry)")
        if not torch.isfinite(scores).all():
            raise ValueError(f"{where} answered a probe of {sent} with NaN or Inf scores; it must answer "
                             "finite logits or probabilities")
        if bool((scores >= 0).all() and (scores <= 1 + 1e-6).all()
                and torch.allclose(scores.sum(1), torch.ones(len(scores), dtype=scores.dtype), atol=1e-3)):
            self.output = "probabilities"
        return self

    def describe(self) -> dict:
        """What the run depends on about the classifier, JSON-friendly."""
        return {"spec": self.spec, "input": self.input.name, "datatype": self.input.datatype,
                "shape": list(self.input.shape) if self.input.shape else None, "output": self.output,
                "classes": self.classes, "differentiable": self.whitebox is not None}

    def close(self) -> None:
        """Close the black box's connection."""
        getattr(self.blackbox, "close", lambda: None)()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _import_classifier(spec: BlackBoxSpec):
    where = f"--classifier {spec}"
    try:
        obj = load_callable(str(spec))
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: cannot load it ({type(err).__name__}: {err})") from err
    if isinstance(obj, Mapping):
        raise ValueError(f"{where} is a mapping of several callables; name one: MODULE:NAME")
    return obj


def open_classifier(spec: str | Callable, data, *, path: str | Path | None = None, timeout: float = 60.0,
                    progress: bool | None = None) -> Classifier:
    """The classifier a ``--classifier`` spec names, checked against ``data`` before any training.

    Args:
        spec: ``local`` (the adapter's own CNN for an example dataset, at ``path``, trained on
            first use), or a black-box spec (``deepzero_oracle.blackbox.spec``):
            ``grpc://HOST:PORT[/MODEL]``, ``kserve://HOST:PORT/MODEL``,
            ``kserve+http://HOST:PORT/MODEL`` (``grpcs``, ``kserves``, ``kserve+https``: over TLS),
            ``MODULE:FUNCTION`` (called in this process with
            NumPy arrays ``[N, C, H, W]``; a ``torch.nn.Module`` is also a white box for FO-DS),
            or the callable itself (from Python: ``fn(images [N, C, H, W] ndarray) -> scores
            [N, classes]``; an ``nn.Module`` is called with tensors and is also a white box).
        data: a Dataset (``x_train [N, C, H, W]``, ``classes``, ``name``) or a ``--data`` value.
        timeout: deadline of every remote call, in seconds.
    Returns:
        a :class:`Classifier` ``[N, C, H, W] -> logits [N, classes]``, probed on a few training
        images; close it (or use it as a context manager) when done.
    Raises:
        BlackBoxUnavailable / BlackBoxTimeout: a remote classifier cannot be reached.
        ValueError: anything else that does not fit the data (the message says what).
    """
    from deepzero_oracle.common.datasets import DATASETS, load_data

    data = load_data(data) if isinstance(data, str) else data
    whitebox = None
    if callable(spec):  # from Python: the function or module itself
        fn, spec = spec, f"python:{getattr(spec, '__qualname__', type(spec).__name__)}"
        if isinstance(fn, nn.Module):
            whitebox = freeze(fn)
            fn = query_only(whitebox)
        blackbox = LocalBlackBox(fn, numpy=True)
    elif spec == "local":
        if data.name not in DATASETS:
            raise ValueError(f"--classifier local is the adapter's own CNN for {' and '.join(DATASETS)}; for your "
                             "own images name your classifier: --classifier MODULE:FUNCTION, grpc://HOST:PORT[/MODEL] "
                             "or kserve://HOST:PORT/MODEL")
        whitebox = whitebox_classifier(ensure_classifier(data.name, path, progress=progress))
        blackbox = LocalBlackBox(query_only(whitebox, channels_last=True), numpy=True)
    else:
        parsed = BlackBoxSpec.parse(spec)
        if parsed.kind == "python":
            fn = _import_classifier(parsed)
            if isinstance(fn, nn.Module):
                whitebox = freeze(fn)
                fn = query_only(whitebox)
            blackbox = LocalBlackBox(fn, numpy=True)
        else:
            blackbox = open_blackbox(parsed, timeout=timeout)
    classifier = Classifier(spec, blackbox, data.classes, whitebox=whitebox)
    try:
        return classifier.check(data.x_train[:PROBE_IMAGES])
    except BaseException:
        classifier.close()
        raise
