"""Randomized gradient estimate (RGE)."""

from __future__ import annotations

import torch

from deepzero_oracle.estimators.base import Estimator, mask_coordinates
from deepzero_oracle.estimators.directions import Directions, check_distribution, direction_matrix


class RGE(Estimator):
    """``g = (phi / q) sum_j (l(theta + mu u_j) - l(theta)) / mu * u_j``.

    With ``u ~ N(0, I)`` we have ``E[u u^T] = I`` so ``phi = 1``; with u uniform on the unit
    sphere ``E[u u^T] = I / d`` so ``phi = d`` (d = number of unmasked coordinates). Either way
    the estimate is unbiased for the gradient of the mu-smoothed loss.

    Args:
        q: number of random directions.
        mu: smoothing radius.
        distribution: "gaussian" or "sphere".
        antithetic: use ``(l(theta + mu u) - l(theta - mu u)) / 2mu`` (2q queries instead of q + 1).
    """

    name = "rge"

    def __init__(self, q: int = 192, mu: float = 5e-3, distribution: str = "gaussian",
                 antithetic: bool = False):
        if int(q) < 1:
            raise ValueError(f"q must be at least 1, got {q}")
        if not mu > 0:
            raise ValueError(f"mu must be positive, got {mu}")
        check_distribution(distribution)
        self.q, self.mu, self.distribution, self.antithetic = int(q), float(mu), distribution, antithetic

    def directions(self, theta, mask=None, generator=None) -> Directions:
        """A recipe for ``q`` random directions ``[q, dim]`` (``.matrix()``), zero outside the
        mask; its seed is drawn from ``generator`` (None: torch's global RNG)."""
        return Directions.draw(self.q, theta.numel(), generator, mask, dtype=theta.dtype,
                               distribution=self.distribution)

    def estimate(self, oracle, theta, mask=None, generator=None, directions=None) -> torch.Tensor:
        """Returns the estimate ``[dim]``. Pass ``directions`` (a ``Directions`` recipe or a
        tensor ``[q, dim]``) to reuse directions (e.g. two estimates that must share them);
        otherwise they are drawn from ``generator`` (or torch's global RNG)."""
        return self.estimate_and_loss(oracle, theta, mask, generator, directions)[0]

    def estimate_and_loss(self, oracle, theta, mask=None, generator=None,
                          directions=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(estimate [dim], l(theta) or None)``; ``directions`` as for ``estimate``. The
        oracle gets the directions as they are (a recipe travels as one), the estimate is
        computed with their matrix."""
        dirs = self.directions(theta, mask, generator) if directions is None else directions
        d = len(mask_coordinates(mask, oracle.dim))
        base = None
        if self.antithetic:
            plus = oracle.direction_losses(theta, dirs, self.mu)
            minus = oracle.direction_losses(theta, dirs, -self.mu)
            slopes = (plus - minus) / (2 * self.mu)
        else:
            base = oracle.loss(theta)
            slopes = (oracle.direction_losses(theta, dirs, self.mu) - base) / self.mu
        phi = d if self.distribution == "sphere" else 1
        matrix = direction_matrix(dirs).to(theta.device)  # recipes draw on the CPU
        return phi / len(matrix) * (slopes.to(matrix.dtype) @ matrix), base

    def queries_per_estimate(self, oracle, mask=None) -> int:
        return 2 * self.q if self.antithetic else self.q + 1

    def __repr__(self):
        return (f"RGE(q={self.q}, mu={self.mu:g}, distribution={self.distribution!r}, "
                f"antithetic={self.antithetic})")
