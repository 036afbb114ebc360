"""Chain rule: a zeroth-order estimate in a latent, autograd for the white-box part before it.

When the loss factors as ``l(theta) = h(z)`` with ``z = g(theta)`` a white-box map (e.g. a
denoiser and an encoder) and ``h`` only queryable (a frozen decoder and a black-box classifier),

    dl/dtheta = (dz/dtheta)^T g_z,    g_z = an estimate of dh/dz from queries of h,

so the queries scale with the latent size, not with theta's (ZO-AE-DS).
"""

from __future__ import annotations

import torch

from deepzero_oracle.estimators.base import Estimator


class ChainRule(Estimator):
    """``g_theta = (dz/dtheta)^T inner.estimate(latent oracle)``.

    The oracle provides ``latent(theta) -> Oracle`` (``z -> h(z)`` at ``z = g(theta)`` on the
    bound batch, sharing the oracle's query ledger) and ``pullback(g_z [latent dim]) -> [dim]``
    (the vector-Jacobian product through ``g``, by autograd). Queries are the inner
    estimator's, on the latent oracle.

    Args:
        inner: the estimator used in the latent, e.g. ``CGE(mu, difference="central")``.
    """

    name = "chain"

    def __init__(self, inner: Estimator):
        self.inner = inner
        self.name = f"chain({inner.name})"

    def estimate_and_loss(self, oracle, theta, mask=None, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(estimate [dim], l(theta) or None)``; ``mask [dim]`` zeroes coordinates of theta
        (the latent estimate is dense)."""
        latent = oracle.latent(theta)
        g_z, loss = self.inner.estimate_and_loss(latent, latent.theta(), None, generator)
        grad = oracle.pullback(g_z).to(theta.dtype)
        if mask is not None:
            grad = grad * torch.as_tensor(mask, dtype=grad.dtype)
        return grad, loss

    def queries_per_estimate(self, oracle, mask=None) -> int:
        return self.inner.queries_per_estimate(oracle.latent(oracle.theta()))

    def __repr__(self):
        return f"ChainRule({self.inner!r})"
