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
    """A gradient estimate from oracle queries.

    ``estimate(oracle, theta [dim], mask=None, generator=None) -> [dim]``; a boolean
    ``mask [dim]`` restricts it to those coordinates (the rest are zero). Subclasses implement
    ``estimate_and_loss``, which also hands back ``l(theta)`` when the estimate computed it
    anyway (so training logs its loss at no extra query), and ``queries_per_estimate``.
    """

    name = "estimator"

    def estimate(self, oracle, theta: torch.Tensor, mask=None, generator=None) -> torch.Tensor:
        """Gradient estimate ``[dim]`` at ``theta [dim]``; randomness comes from ``generator``."""
        return self.estimate_and_loss(oracle, theta, mask, generator)[0]

    def estimate_and_loss(self, oracle, theta: torch.Tensor, mask=None,
                          generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(gradient estimate [dim], l(theta) as a 0-d tensor, or None if not computed)``."""
        raise NotImplementedError

    def queries_per_estimate(self, oracle, mask=None) -> int:
        """Queries one estimate on ``oracle`` costs with ``mask`` (before spending any)."""
        raise NotImplementedError


class Autograd(Estimator):
    """The first-order baseline: the exact gradient by back-propagation (needs a
    differentiable oracle, e.g. a ``ModuleOracle`` without a black box). The mask zeroes
    coordinates, as a sparse gradient would. One query per estimate."""

    name = "fo"

    def estimate_and_loss(self, oracle, theta, mask=None, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad, loss = oracle.autograd_gradient(theta, with_loss=True)
        if mask is not None:
            grad = grad * torch.as_tensor(mask, dtype=grad.dtype)
        return grad, loss

    def queries_per_estimate(self, oracle, mask=None) -> int:
        return 1

    def __repr__(self):
        return "Autograd()"
