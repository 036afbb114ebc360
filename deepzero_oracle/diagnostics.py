"""Is my estimate right? Compare a gradient estimate with autograd (our ground truth)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle.estimators import CGE
from deepzero_oracle.estimators.base import mask_coordinates
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.oracle import Oracle


def compare_to_autograd(target, estimator=None, *, data=None, loss_fn=None, theta=None, mask=None,
                        dtype: torch.dtype | None = torch.float64, generator=None) -> dict:
    """Estimate a gradient and measure it against back-propagation.

    Args:
        target: an ``nn.Module`` learner (then ``data=(x, y)`` and ``loss_fn`` are required;
            a copy is converted to ``dtype``, float64 by default, so finite differences are
            not drowned in rounding) or an ``Oracle`` with an autograd path (used as is).
        estimator: defaults to ``CGE(mu=1e-6, difference="central")``.
        theta: where to compare, ``[dim]``; defaults to the learner's current parameters.
        mask: optional boolean ``[dim]``; both gradients are compared on those coordinates.
    Returns:
        ``{"cosine", "relative_error", "max_abs_error", "queries", "coordinates",
        "estimate_norm", "autograd_norm"}``; relative error is ``|g_est - g| / |g|``.
    """
    if isinstance(target, nn.Module):
        if data is None or loss_fn is None:
            raise ValueError("comparing a module needs data=(x, y) and loss_fn")
        learner = copy.deepcopy(target)
        if dtype is not None:
            learner = learner.to(dtype)
        oracle = ModuleOracle(learner, loss_fn).bind(*data)
    elif isinstance(target, Oracle):
        oracle = target
    else:
        raise TypeError(f"target must be an nn.Module or an Oracle, got {type(target).__name__}")
    if theta is None:
        if not isinstance(oracle, ModuleOracle):
            raise ValueError("pass theta: this oracle has no parameters of its own")
        theta = oracle.theta()
    estimator = estimator or CGE(mu=1e-6, difference="central")
    before = oracle.queries
    estimate = estimator.estimate(oracle, theta, mask=mask, generator=generator)
    spent = oracle.queries - before
    truth = oracle.autograd_gradient(theta)
    keep = mask_coordinates(mask, oracle.dim)
    est, true = estimate[keep].to(torch.float64), truth[keep].to(torch.float64)
    return {
        "cosine": float(F.cosine_similarity(est, true, dim=0)),
        "relative_error": float((est - true).norm() / true.norm().clamp_min(1e-300)),
        "max_abs_error": float((est - true).abs().max()),
        "queries": spent,
        "coordinates": len(keep),
        "estimate_norm": float(est.norm()),
        "autograd_norm": float(true.norm()),
    }
