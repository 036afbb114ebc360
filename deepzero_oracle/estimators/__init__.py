"""Gradient estimators: small pure pieces that read like the math.

``CGE(mu)`` and ``RGE(q, mu)`` estimate a gradient from oracle queries; ``Autograd()`` is the
first-order baseline. Each has ``estimate(oracle, theta [dim], mask=None) -> [dim]``; a boolean
``mask [dim]`` restricts the estimate to those coordinates (the rest are zero). RGE's random
directions are ``Directions`` recipes (a seed and a shape) that any worker can make into rows.
``ChainRule(inner)`` estimates in a latent and pulls the estimate back by autograd (ZO-AE-DS).
"""

from deepzero_oracle.estimators.base import Autograd, Estimator, mask_coordinates
from deepzero_oracle.estimators.cge import CGE
from deepzero_oracle.estimators.chain import ChainRule
from deepzero_oracle.estimators.directions import Directions
from deepzero_oracle.estimators.rge import RGE

__all__ = ["Autograd", "CGE", "ChainRule", "Directions", "Estimator", "RGE", "mask_coordinates"]
