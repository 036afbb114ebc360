"""The model zoo: small learners sized for coordinate-wise estimates on a CPU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mlp", "cnn", "resnet8", "resnet20")
SHORTCUTS = ("A", "B")


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


class SubsamplePad(nn.Module):
    """Shortcut option A of the CIFAR ResNets: keep every second pixel and append zero
    channels, ``[B, C, H, W] -> [B, C + extra, ceil(H/2), ceil(W/2)]`` (no parameters).
    The extra channels are split evenly before and after the input's (odd counts: one more
    after)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.before = extra_channels // 2
        self.after = extra_channels - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """Two 3x3 Conv2d -> BatchNorm2d layers with a ReLU between, plus the shortcut, then a ReLU:
    ``[B, c_in, H, W] -> [B, c_out, H/stride, W/stride]``.

    The shortcut is the identity when shapes agree; otherwise option "A" (``SubsamplePad``, no
    parameters) or "B" (1x1 Conv2d with stride, then BatchNorm2d).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            if stride != 2 or c_out < c_in:
                raise ValueError(f"shortcut A subsamples by 2 and pads channels; got stride {stride}, "
                                 f"{c_in} -> {c_out} channels (use shortcut='B')")
            self.shortcut = SubsamplePad(c_out - c_in)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet(in_shape: tuple[int, ...], classes: int, blocks_per_stage: int = 3,
           widths: tuple[int, ...] = (16, 32, 64), shortcut: str = "A") -> nn.Sequential:
    """CIFAR-layout ResNet (He et al. 2016, section 4.2): a 3x3 Conv2d -> BatchNorm2d -> ReLU
    stem, ``len(widths)`` stages of ``blocks_per_stage`` ``BasicBlock``s (every stage after the
    first halves the image), global average pooling and one Linear. Input ``[B, *in_shape]``,
    output ``[B, classes]``.

    An ``nn.Sequential`` of blocks, so the per-coordinate reference loop of the bench can reuse
    each block's input. 3 blocks per stage: ResNet-20 (~270k parameters); 1: ResNet-8 (~75k).
    """
    c = in_shape[0]
    layers = [nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(c, width, stride, shortcut))
            c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def resnet20(in_shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, shortcut: str = "A") -> nn.Sequential:
    """ResNet-20 in the CIFAR layout: 3 stages x 3 ``BasicBlock``s, 16/32/64 channels."""
    return resnet(in_shape, classes, 3, shortcut=shortcut)


def resnet8(in_shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, shortcut: str = "A") -> nn.Sequential:
    """ResNet-8: ResNet-20's layout with one ``BasicBlock`` per stage (for tests)."""
    return resnet(in_shape, classes, 1, shortcut=shortcut)


def build_model(name: str, in_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A learner by name (one of ``MODELS``) for images shaped ``in_shape``."""
    if name == "mlp":
        return mlp(in_shape, classes)
    if name == "cnn":
        return cnn(in_shape, classes)
    if name == "resnet8":
        return resnet8(in_shape, classes)
    if name == "resnet20":
        return resnet20(in_shape, classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["MODELS", "SHORTCUTS", "BasicBlock", "SubsamplePad", "build_model", "cnn", "mlp", "resnet",
           "resnet8", "resnet20"]
