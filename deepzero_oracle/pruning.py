"""Gradient sparsity: layer-wise ratios -> random coordinate masks, redrawn on a schedule.

DeepZero keeps only per-layer sparsity ratios; during training each layer's ratio is applied
to random coordinates, redrawn every few epochs (dense model, sparse gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepzero_oracle.estimators.rge import RGE
from deepzero_oracle.theta import ParamSlot

PRUNERS = ("zo-grasp", "random", "uniform")


def is_bias_or_norm(slot: ParamSlot, learner: torch.nn.Module) -> bool:
    """True for biases and normalisation-layer parameters (the reference code never sparsified them)."""
    module = learner.get_submodule(slot.module) if slot.module else learner
    return slot.attr == "bias" or isinstance(module, (torch.nn.modules.batchnorm._NormBase,
                                                      torch.nn.LayerNorm, torch.nn.GroupNorm))


def zo_grasp_scores(oracle, theta: torch.Tensor, rge: RGE | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """ZO-GraSP score ``-theta * (g(theta + mu g0) - g0) / mu`` per coordinate, ``[dim]``.

    ``g0 = RGE(theta)`` and ``g = RGE(theta + mu g0)`` share the *same* random directions, so
    their difference estimates the Hessian-gradient product without the noise of two
    independent draws. Costs ``2 * rge.queries_per_estimate(oracle)`` queries.
    """
    rge = rge or RGE(q=192, mu=5e-3)
    dirs = rge.directions(theta, None, generator)
    g0 = rge.estimate(oracle, theta, directions=dirs)
    g1 = rge.estimate(oracle, theta + rge.mu * g0, directions=dirs)
    return -theta * (g1 - g0) / rge.mu


def ratios_from_scores(slots: list[ParamSlot], scores: torch.Tensor, sparsity: float,
                       exempt: set[str] = frozenset()) -> dict[str, float]:
    """Layer-wise sparsity from a global ranking: the ``sparsity`` share of coordinates with
    the highest scores (over non-exempt tensors) is pruned; each tensor's ratio is the share
    of its coordinates among them. Exempt tensors get ratio 0 (dense)."""
    _check_sparsity(sparsity)
    included = [s for s in slots if s.name not in exempt]
    pool = torch.cat([scores[s.offset : s.offset + s.numel] for s in included])
    k = int(round(sparsity * pool.numel()))
    pruned = torch.zeros(pool.numel(), dtype=torch.bool)
    pruned[torch.argsort(pool, descending=True, stable=True)[:k]] = True
    ratios, start = {s.name: 0.0 for s in slots}, 0
    for s in included:
        ratios[s.name] = float(pruned[start : start + s.numel].float().mean())
        start += s.numel
    return ratios


def random_ratios(slots: list[ParamSlot], sparsity: float, generator: torch.Generator | None = None,
                  exempt: set[str] = frozenset()) -> dict[str, float]:
    """Random layer-wise ratios meeting the global ``sparsity`` (the baseline ZO-GraSP must beat)."""
    _check_sparsity(sparsity)
    included = [s for s in slots if s.name not in exempt]
    sizes = torch.tensor([s.numel for s in included], dtype=torch.float64)
    raw = torch.rand(len(included), generator=generator, dtype=torch.float64)
    target = sparsity * sizes.sum()
    # scale the random shares to the target, clipping at 1 and redistributing the excess
    ratios = torch.zeros_like(raw)
    free = torch.ones_like(raw, dtype=torch.bool)
    for _ in range(len(raw) + 1):
        remaining = target - (ratios * sizes)[~free].sum()
        scale = remaining / (raw * sizes)[free].sum().clamp_min(1e-12)
        ratios[free] = raw[free] * scale
        over = free & (ratios > 1)
        if not over.any():
            break
        ratios[over] = 1.0
        free &= ~over
    out = {s.name: 0.0 for s in slots}
    out.update({s.name: float(r) for s, r in zip(included, ratios)})
    return out


def global_sparsity(slots: list[ParamSlot], ratios: dict[str, float]) -> float:
    """Share of all coordinates left out by ``ratios``."""
    total = sum(s.numel for s in slots)
    return sum(ratios.get(s.name, 0.0) * s.numel for s in slots) / total


def save_ratios(path, ratios: dict[str, float], **meta) -> None:
    """Write layer-wise ratios (and what produced them) as JSON."""
    Path(path).write_text(json.dumps({"ratios": ratios, **meta}, indent=2))


def load_ratios(path) -> dict[str, float]:
    """Read ratios written by ``save_ratios``; checks every value is a sparsity in [0, 1]."""
    data = json.loads(Path(path).read_text())
    ratios = data.get("ratios") if isinstance(data, dict) else None
    if not isinstance(ratios, dict):
        raise ValueError(f"{path} holds no 'ratios' object; write it with save_ratios")
    for name, r in ratios.items():
        _check_sparsity(r, f"ratio of {name}")
    return {k: float(v) for k, v in ratios.items()}


def uniform_ratios(slots: list[ParamSlot], sparsity: float,
                   exempt: set[str] = frozenset()) -> dict[str, float]:
    """The same sparsity for every parameter tensor (exempt ones dense): ``{name: ratio}``."""
    _check_sparsity(sparsity)
    return {s.name: 0.0 if s.name in exempt else float(sparsity) for s in slots}


def kept_counts(slots: list[ParamSlot], ratios: dict[str, float]) -> dict[str, int]:
    """Coordinates a mask keeps per parameter tensor: ``round((1 - ratio) * numel)``, at least
    one where the ratio is below 1."""
    counts = {}
    for s in slots:
        ratio = ratios.get(s.name, 0.0)
        keep = int(round((1.0 - ratio) * s.numel))
        counts[s.name] = min(s.numel, max(keep, 1 if ratio < 1 else 0))
    return counts


def random_mask(slots: list[ParamSlot], ratios: dict[str, float],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask ``[dim]`` keeping ``kept_counts`` random coordinates of each parameter tensor."""
    dim = slots[-1].offset + slots[-1].numel
    mask = torch.zeros(dim, dtype=torch.bool)
    for s, keep in zip(slots, kept_counts(slots, ratios).values()):
        chosen = torch.randperm(s.numel, generator=generator)[:keep]
        mask[s.offset + chosen] = True
    return mask


class MaskSchedule:
    """Random masks with fixed layer-wise ratios, redrawn every ``redraw_every`` epochs (or
    steps, with ``unit="step"``).

    Args:
        slots: the learner's parameter slots (``oracle.slots``).
        ratios: ``{parameter name: sparsity in [0, 1]}``; missing names stay dense.
        redraw_every: epochs (or steps) between redraws (DeepZero: 5 epochs).
        unit: "epoch" or "step": what ``redraw_every`` counts.
    Call ``mask_for(epoch_or_step, generator) -> [dim]`` at each step (the Trainer does); the
    mask is part of the trainer's checkpoint through ``state_dict``.
    """

    def __init__(self, slots: list[ParamSlot], ratios: dict[str, float], redraw_every: int = 5,
                 unit: str = "epoch"):
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
        if redraw_every < 1:
            raise ValueError(f"redraw_every must be at least 1 {unit}, got {redraw_every}")
        for name, r in ratios.items():
            _check_sparsity(r, name)
        self.slots, self.ratios, self.redraw_every = slots, dict(ratios), int(redraw_every)
        self.unit = unit
        self.mask: torch.Tensor | None = None
        self.drawn_at: int | None = None

    def mask_for(self, when: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mask ``[dim]`` for epoch (or step) ``when``, 0-based; redrawn when due."""
        due = self.drawn_at is None or (when // self.redraw_every) != (self.drawn_at // self.redraw_every)
        if self.mask is None or due:
            self.mask = random_mask(self.slots, self.ratios, generator)
            self.drawn_at = when
        return self.mask

    @property
    def active(self) -> int:
        """Coordinates every mask of this schedule keeps (the same count at each redraw)."""
        return sum(kept_counts(self.slots, self.ratios).values())

    @property
    def density(self) -> float:
        """Share of coordinates kept by the current mask."""
        return float(self.mask.float().mean()) if self.mask is not None else float("nan")

    def state_dict(self) -> dict:
        return {"mask": self.mask, "drawn_at": self.drawn_at, "ratios": self.ratios}

    def load_state_dict(self, state: dict) -> None:
        self.mask, self.drawn_at, self.ratios = state["mask"], state["drawn_at"], dict(state["ratios"])


def class_balanced_sample(x: torch.Tensor, y: torch.Tensor, per_class: int,
                          generator: torch.Generator | None = None):
    """``per_class`` random examples of each class (ZO-GraSP scores a small balanced sample):
    ``(x [K*per_class, ...], y [K*per_class])`` for ``x [N, ...]``, labels ``y [N]``."""
    picks = []
    for c in y.unique():
        idx = (y == c).nonzero().reshape(-1)
        if len(idx) < per_class:
            raise ValueError(f"class {int(c)} has {len(idx)} examples, fewer than per_class={per_class}")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    order = torch.cat(picks)
    return x[order], y[order]


def _check_sparsity(value: float, name: str = "sparsity") -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (share of gradient coordinates set to zero), got {value}")
