"""PhiFlow plumbing shared by the scenarios: backend/precision context and tensor wrapping.

We never call ``math.set_global_precision`` or import ``phi.torch.flow`` (which would switch the whole
process to the torch backend); every solver call runs inside `phi_context` instead, so other PhiFlow
users in the same process are unaffected.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from deepzero_oracle.extras import require

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # phiml touches numpy.core on import
    require("sim", "phi.field", "phi.math", "phi.torch", "phiml.math",
            feature="a built-in simulator (burgers, wake2d)")
    from phi import field, math
    from phi.torch import TORCH

from phiml.math import batch, channel, spatial

__all__ = ["math", "field", "TORCH", "batch", "channel", "spatial", "phi_context", "wrap_bchw", "wrap_b"]


@contextlib.contextmanager
def phi_context():
    """Torch backend + float64 for everything created inside (tracing included)."""
    with warnings.catch_warnings():
        # Deprecation notices from inside phiflow/phiml/torch.jit (emitted on every JIT trace) are
        # not actionable for our users.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch\.jit|phi|phiml)(\.|$)")
        with TORCH, math.precision(64):
            yield


def wrap_bchw(x: torch.Tensor, vector: str = "x,y"):
    """``[N, C, H, W]`` torch -> phiml tensor ``(b, vector, x, y)``; H is y and W is x.

    The spatial dims are wrapped in the grids' (x, y) order: PhiFlow infers a field's vector order
    from its values' spatial order, and a (y, x) tensor on an (x, y) grid fails or mixes components."""
    return math.tensor(x.transpose(2, 3), batch("b"), channel(vector=vector), spatial("x,y"))


def wrap_b(x: torch.Tensor):
    """``[N, H, W]`` torch -> phiml tensor ``(b, x, y)`` (see `wrap_bchw` for the order)."""
    return math.tensor(x.transpose(1, 2), batch("b"), spatial("x,y"))
