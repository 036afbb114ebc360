"""Batch sources for the Trainer: re-iterable, seeded, and resumable.

The Trainer accepts any iterable of tuples (a ``torch.utils.data.DataLoader`` works). A source
with ``state_dict()`` / ``load_state_dict()`` (like the ones here) is checkpointed at the start
of every epoch, so a run interrupted mid-epoch resumes on the same batches.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch


def source_seed(seed: int) -> int:
    """The generator seed of a batch source with user seed ``seed``: mixed, so that a source
    and a Trainer given the same seed draw unrelated streams (order vs directions and masks)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


class TensorBatches:
    """Minibatches of tensors that share their first dimension, reshuffled every epoch.

    Each ``iter()`` is one epoch: a new permutation drawn from the source's own generator
    (``shuffle=True``), then ``ceil(N / batch_size)`` tuples ``(t[idx] for t in tensors)``.

    Args:
        *tensors: ``[N, ...]`` each (e.g. images and labels).
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: draw a new order every epoch; else the stored order.
        seed: seeds the shuffling generator.
        transform: optional ``transform(batch_tuple, epoch) -> batch_tuple`` applied to every
            batch (e.g. fresh noise per epoch); ``epoch`` counts this source's epochs from 0.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 transform: Callable | None = None):
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f"all tensors need the same number of rows, got {[len(t) for t in tensors]}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tensors, self.batch_size, self.shuffle = tensors, int(batch_size), shuffle
        self.transform = transform
        self.generator = torch.Generator().manual_seed(source_seed(seed))
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        epoch, self.epoch = self.epoch, self.epoch + 1
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = tuple(t[idx] for t in self.tensors)
            yield self.transform(batch, epoch) if self.transform is not None else batch

    def state_dict(self) -> dict:
        """The shuffling generator and the epoch counter."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``."""
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])


class SampledBatches:
    """An endless stream of batches, each drawn by ``draw(generator)`` from a seeded generator.

    For training that counts steps, not epochs (e.g. random windows of trajectories):
    ``Trainer.fit(SampledBatches(draw, seed=0), max_steps=N)``.
    """

    def __init__(self, draw: Callable[[torch.Generator], tuple], *, seed: int = 0):
        self.draw = draw
        self.generator = torch.Generator().manual_seed(source_seed(seed))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield self.draw(self.generator)

    def state_dict(self) -> dict:
        """The generator's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``."""
        self.generator.set_state(state["generator"])


__all__ = ["SampledBatches", "TensorBatches", "source_seed"]
