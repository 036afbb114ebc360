"""Coordinate-wise gradient estimate (CGE)."""

from __future__ import annotations

import torch

from deepzero_oracle.estimators.base import Estimator, mask_coordinates


class CGE(Estimator):
    """``g_i = (l(theta + mu e_i) - l(theta)) / mu`` for each (unmasked) coordinate i.

    Args:
        mu: finite-difference step (DeepZero's default 5e-3).
        difference: "forward" (C + 1 queries for C coordinates) or "central"
            (``(l(theta + mu e_i) - l(theta - mu e_i)) / 2mu``, 2C queries, error O(mu^2)).
        joint: forward differences only: ask for ``l(theta)`` in the same ``losses`` request
            as its C perturbations, so a black box whose batch members interact (an iterative
            solver, a batch-normalising model) cannot bias the differences. Bypasses an
            oracle's coordinate fast path.
    """

    name = "cge"

    def __init__(self, mu: float = 5e-3, difference: str = "forward", joint: bool = False):
        if not mu > 0:
            raise ValueError(f"mu must be positive, got {mu}")
        if difference not in ("forward", "central"):
            raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
        if joint and difference != "forward":
            raise ValueError("joint=True needs forward differences (central ones have no l(theta))")
        self.mu, self.difference, self.joint = float(mu), difference, bool(joint)

    def estimate_and_loss(self, oracle, theta, mask=None, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(estimate [dim], l(theta) or None)``; masked-out coordinates are zero and not
        queried (``generator`` is accepted for a uniform interface; CGE draws nothing)."""
        coords = mask_coordinates(mask, oracle.dim)
        grad = torch.zeros_like(theta)
        if self.difference == "central":
            plus = oracle.coordinate_losses(theta, coords, self.mu)
            minus = oracle.coordinate_losses(theta, coords, -self.mu)
            grad[coords] = ((plus - minus) / (2 * self.mu)).to(grad.dtype)
            return grad, None
        if self.joint:
            thetas = theta.repeat(len(coords) + 1, 1)
            thetas[torch.arange(1, len(coords) + 1, device=coords.device), coords] += self.mu
            values = oracle.losses(thetas)
            base, moved = values[0], values[1:]
        else:
            base = oracle.loss(theta)
            moved = oracle.coordinate_losses(theta, coords, self.mu)
        grad[coords] = ((moved - base) / self.mu).to(grad.dtype)
        return grad, base

    def queries_per_estimate(self, oracle, mask=None) -> int:
        active = len(mask_coordinates(mask, oracle.dim))
        return active + 1 if self.difference == "forward" else 2 * active

    def __repr__(self):
        joint = ", joint=True" if self.joint else ""
        return f"CGE(mu={self.mu:g}, difference={self.difference!r}{joint})"
