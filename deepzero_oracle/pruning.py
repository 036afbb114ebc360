"""Gradient sparsity: layer-wise ratios -> random coordinate masks, redrawn on a schedule.

DeepZero keeps only per-layer sparsity ratios; during training each layer's ratio is applied
to random coordinates, redrawn every few epochs (dense model, sparse gradient).
"""

from __future__ import annotations

import torch

from deepzero_oracle.graph import ParamSlot


def uniform_ratios(slots: list[ParamSlot], sparsity: float) -> dict[str, float]:
    """The same sparsity for every parameter tensor: ``{name: sparsity}``."""
    _check_sparsity(sparsity)
    return {s.name: float(sparsity) for s in slots}


def random_mask(slots: list[ParamSlot], ratios: dict[str, float],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask ``[dim]`` keeping ``round((1 - ratio) * numel)`` random coordinates of each
    parameter tensor (at least one where the ratio is below 1)."""
    dim = slots[-1].offset + slots[-1].numel
    mask = torch.zeros(dim, dtype=torch.bool)
    for s in slots:
        ratio = ratios.get(s.name, 0.0)
        keep = int(round((1.0 - ratio) * s.numel))
        keep = min(s.numel, max(keep, 1 if ratio < 1 else 0))
        chosen = torch.randperm(s.numel, generator=generator)[:keep]
        mask[s.offset + chosen] = True
    return mask


class MaskSchedule:
    """Random masks with fixed layer-wise ratios, redrawn every ``redraw_every`` epochs.

    Args:
        slots: the learner's parameter slots (``oracle.slots``).
        ratios: ``{parameter name: sparsity in [0, 1]}``; missing names stay dense.
        redraw_every: epochs between redraws (DeepZero: 5).
    Call ``mask_for(epoch, generator) -> [dim]`` at each step; the mask is part of the
    trainer's checkpoint through ``state_dict``.
    """

    def __init__(self, slots: list[ParamSlot], ratios: dict[str, float], redraw_every: int = 5):
        if redraw_every < 1:
            raise ValueError(f"redraw_every must be at least 1 epoch, got {redraw_every}")
        for name, r in ratios.items():
            _check_sparsity(r, name)
        self.slots, self.ratios, self.redraw_every = slots, dict(ratios), int(redraw_every)
        self.mask: torch.Tensor | None = None
        self.drawn_at: int | None = None

    def mask_for(self, epoch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mask ``[dim]`` for ``epoch`` (0-based); redrawn when the schedule says so."""
        due = self.drawn_at is None or (epoch // self.redraw_every) != (self.drawn_at // self.redraw_every)
        if self.mask is None or due:
            self.mask = random_mask(self.slots, self.ratios, generator)
            self.drawn_at = epoch
        return self.mask

    @property
    def density(self) -> float:
        """Share of coordinates kept by the current mask."""
        return float(self.mask.float().mean()) if self.mask is not None else float("nan")

    def state_dict(self) -> dict:
        return {"mask": self.mask, "drawn_at": self.drawn_at, "ratios": self.ratios}

    def load_state_dict(self, state: dict) -> None:
        self.mask, self.drawn_at, self.ratios = state["mask"], state["drawn_at"], dict(state["ratios"])


def _check_sparsity(value: float, name: str = "sparsity") -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (share of gradient coordinates set to zero), got {value}")
