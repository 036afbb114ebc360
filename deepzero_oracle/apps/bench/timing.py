"""What every engine benchmark measures with: the two baselines and the measuring tools.

- ``ReferenceLoop``: DeepZero's per-coordinate CGE loop, feature reuse included.
- ``ReleasedCGE``: DeepZero's released non-distributed ``cge`` (a deep copy and a full forward
  per coordinate).
- Time (``timed``), arithmetic (``counted_flops``), the machine's attainable rate
  (``matmul_gflops``), peak memory (``peak_rss_mb``, ``in_child_process``), and the reports.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from deepzero_oracle.allocator import retain_freed_memory
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.runs import write_json, write_text


class ReferenceLoop:
    """DeepZero's per-coordinate CGE loop on an ``nn.Sequential`` learner, feature reuse included.

    ``losses(coords, mu) -> [C]``: loss with ``theta + mu e_i`` for each coordinate i.
    """

    def __init__(self, learner: nn.Sequential, loss_fn, x, y):
        self.layers, self.loss_fn, self.y = list(learner), loss_fn, y
        self.owner = []  # (layer index, parameter) in theta order
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                self.owner.append((i, p))
        self.locate = CoordinateLocator([p.numel() for _, p in self.owner])
        with torch.no_grad():  # the input of every layer, once
            self.inputs, h = [], x
            for layer in self.layers:
                self.inputs.append(h)
                h = layer(h)

    def losses(self, coords: torch.Tensor, mu: float) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for c in coords.tolist():
                k, local = self.locate(c)
                layer_index, p = self.owner[k]
                flat = p.data.view(-1)
                flat[local] += mu
                h = self.inputs[layer_index]
                for layer in self.layers[layer_index:]:
                    h = layer(h)
                out.append(self.loss_fn(h, self.y))
                flat[local] -= mu
        return torch.stack(out)


class CoordinateLocator:
    """``locate(c) -> (k, local)``: coordinate c of theta is entry ``local`` of tensor k, for
    tensors of ``sizes`` laid out one after the other."""

    def __init__(self, sizes: list[int]):
        sizes_t = torch.tensor(sizes)
        self.starts = torch.cumsum(sizes_t, 0) - sizes_t

    def __call__(self, c: int) -> tuple[int, int]:
        k = int(torch.searchsorted(self.starts, torch.tensor(c), right=True)) - 1
        return k, c - int(self.starts[k])


class ReleasedCGE:
    """DeepZero's released non-distributed ``cge``, as written there, in our words: per
    coordinate, a deep copy of the whole parameter dict, the one entry moved, the copy loaded
    into the model with ``load_state_dict`` and a full forward. No feature reuse, no batching.

    Runs on its own deep copy of ``learner`` (its train-mode forwards move running statistics).
    ``losses(coords, mu) -> [C]``: loss with ``theta + mu e_i`` for each coordinate i.
    """

    def __init__(self, learner: nn.Module, loss_fn, x, y):
        self.model, self.loss_fn, self.x, self.y = copy.deepcopy(learner), loss_fn, x, y
        self.params = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        self.names = list(self.params)
        self.locate = CoordinateLocator([v.numel() for v in self.params.values()])

    def losses(self, coords: torch.Tensor, mu: float) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for c in coords.tolist():
                k, local = self.locate(c)
                perturbed = copy.deepcopy(self.params)
                perturbed[self.names[k]].view(-1)[local] += mu
                self.model.load_state_dict(perturbed, strict=False)
                out.append(self.loss_fn(self.model(self.x), self.y))
        self.model.load_state_dict(self.params, strict=False)
        return torch.stack(out)


def timed(fn):
    """``(fn(), seconds it took)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def counted_flops(fn) -> int:
    """Multiply-add FLOPs (matmuls and convolutions only) that ``fn()`` performs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_coordinates(oracle: ModuleOracle, per_tensor: int, generator) -> list[torch.Tensor]:
    """Per parameter tensor, up to ``per_tensor`` random coordinates (all when 0)."""
    picks = []
    for s in oracle.slots:
        n = s.numel if per_tensor <= 0 else min(per_tensor, s.numel)
        picks.append(s.offset + torch.randperm(s.numel, generator=generator)[:n].sort().values)
    return picks


def estimated_seconds(rates: list[float], oracle: ModuleOracle) -> float:
    """Time for all coordinates from per-tensor rates (coords/s)."""
    return sum(s.numel / r for s, r in zip(oracle.slots, rates))


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Measured float32 GFLOP/s of an ``n x n`` matmul (the median of ``repeats``): the
    machine's attainable rate, against which FLOP efficiencies are stated."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b)[1] for _ in range(repeats)) / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh child process, so ``ru_maxrss`` is its alone, set up as
    the command line sets up its own: freed memory retained (``retain_freed_memory``)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=retain_freed_memory) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def write_report(report: dict, text: str, out_dir, stem: str, options: dict) -> None:
    """``report`` as ``<stem>[-eval].json`` and ``text`` as ``.md`` under ``out_dir`` (None: nowhere)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem += "-eval" if options.get("eval_mode") else ""
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", text + "\n")


__all__ = ["CoordinateLocator", "ReferenceLoop", "ReleasedCGE", "counted_flops", "estimated_seconds",
           "in_child_process", "matmul_gflops", "peak_rss_mb", "sample_coordinates", "timed", "write_report"]
