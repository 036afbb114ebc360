"""The model zoo: small learners sized for coordinate-wise estimates on a CPU."""

from __future__ import annotations

import torch.nn as nn

MODELS = ("mlp", "cnn")


def mlp(in_shape: tuple[int, ...], classes: int, hidden: tuple[int, ...] = (32,)) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear. Input ``[B, *in_shape]``."""
    layers, width = [nn.Flatten()], 1
    for s in in_shape:
        width *= s
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(in_shape: tuple[int, ...], classes: int, channels: tuple[int, ...] = (16, 16, 32)) -> nn.Sequential:
    """DeepZero-style small CNN: [Conv3x3 -> ReLU -> MaxPool2] blocks while the image is at
    least 4 pixels wide (at most ``len(channels)`` blocks), then one Linear.

    On 28x28 inputs: 3 blocks, ~10k parameters; on 8x8 digits: 2 blocks, ~3k parameters.
    """
    c, side = in_shape[0], in_shape[-1]
    layers = []
    for width in channels:
        if side < 4:
            break
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, side = width, side // 2
    layers += [nn.Flatten(), nn.Linear(c * side * side, classes)]
    return nn.Sequential(*layers)


def build_model(name: str, in_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A learner by name ("mlp" or "cnn") for images shaped ``in_shape``."""
    if name == "mlp":
        return mlp(in_shape, classes)
    if name == "cnn":
        return cnn(in_shape, classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["MODELS", "build_model", "cnn", "mlp"]
