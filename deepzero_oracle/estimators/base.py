"""What every estimator shares: the interface and mask handling."""

from __future__ import annotations

import torch


def mask_coordinates(mask, dim: int) -> torch.Tensor:
    """Indices ``[C]`` of the coordinates a boolean ``mask [dim]`` keeps (all when None)."""
    if mask is None:
        return torch.arange(dim)
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.shape != (dim,):
        raise ValueError(
            f"mask must be a boolean tensor shaped [{dim}] (one flag per coordinate of theta), "
            f"got dtype {mask.dtype} and shape {tuple(mask.shape)}"
        )
    return mask.nonzero().reshape(-1)


class Estimator:
    """``estimate(oracle, theta [dim], mask=None) -> gradient estimate [dim]``."""

    name = "estimator"

    def estimate(self, oracle, theta: torch.Tensor, mask=None, generator=None) -> torch.Tensor:
        """Gradient estimate ``[dim]`` at ``theta [dim]``; randomness comes from ``generator``."""
        raise NotImplementedError

    def queries_per_estimate(self, active: int) -> int:
        """Queries one estimate costs when ``active`` coordinates are unmasked."""
        raise NotImplementedError


class Autograd(Estimator):
    """The first-order baseline: the exact gradient by back-propagation (needs a
    differentiable oracle, e.g. a ``ModuleOracle`` without a black box). The mask zeroes
    coordinates, as a sparse gradient would."""

    name = "fo"

    def estimate(self, oracle, theta, mask=None, generator=None):
        grad = oracle.autograd_gradient(theta)
        if mask is not None:
            grad = grad * torch.as_tensor(mask, dtype=grad.dtype)
        return grad

    def queries_per_estimate(self, active):
        return 1

    def __repr__(self):
        return "Autograd()"
