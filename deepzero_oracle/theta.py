"""The layout of theta: which coordinates belong to which parameter of a learner.

theta is the flat vector of a learner's trainable parameters in ``named_parameters`` order
(``requires_grad=True`` only). Everything that maps between theta and modules goes through
here: pruning (per-tensor ratios), the fast path (which module a coordinate moves), the
Trainer (estimates into ``param.grad``) and the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ParamSlot:
    """Where one trainable parameter lives in theta and in the learner."""

    name: str  # qualified name, as in learner.named_parameters()
    module: str  # qualified name of the module holding it ("" for the learner itself)
    attr: str  # attribute on that module, e.g. "weight" or "bias"
    offset: int  # first coordinate in theta
    shape: torch.Size
    numel: int

    @property
    def stop(self) -> int:
        """One past the last coordinate in theta."""
        return self.offset + self.numel


def parameter_slots(learner: nn.Module) -> list[ParamSlot]:
    """Trainable parameters of ``learner`` in theta order (``named_parameters`` order)."""
    slots, offset = [], 0
    for name, p in learner.named_parameters():
        if not p.requires_grad:
            continue
        module, _, attr = name.rpartition(".")
        slots.append(ParamSlot(name, module, attr, offset, p.shape, p.numel()))
        offset += p.numel()
    return slots


def trainable_parameters(learner: nn.Module, slots: list[ParamSlot] | None = None) -> list[nn.Parameter]:
    """The parameters that make up theta, in theta order."""
    named = dict(learner.named_parameters())
    return [named[s.name] for s in (slots if slots is not None else parameter_slots(learner))]


def flatten(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat, detached copy ``[dim]``."""
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def theta_of(learner: nn.Module) -> torch.Tensor:
    """theta ``[dim]`` of a learner: a copy of its trainable parameters."""
    return flatten(trainable_parameters(learner))


def unflatten(theta: torch.Tensor, slots: list[ParamSlot]) -> dict[str, torch.Tensor]:
    """Views of theta ``[..., dim]`` as parameters ``{name: [..., *shape]}``."""
    lead = theta.shape[:-1]
    return {s.name: theta[..., s.offset : s.stop].reshape(*lead, *s.shape) for s in slots}


def load_theta(params: Iterable[torch.Tensor], theta: torch.Tensor) -> None:
    """Copy ``theta [dim]`` into ``params`` (in theta order), in place."""
    params = list(params)
    _check_total(params, theta, "theta")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(theta[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def assign_gradient(params: Iterable[torch.nn.Parameter], grad: torch.Tensor) -> None:
    """Write a flat gradient ``[dim]`` into ``param.grad`` of each parameter, in theta order."""
    params = list(params)
    _check_total(params, grad, "gradient")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = grad[offset : offset + n].reshape(p.shape).to(p.dtype).clone()
        offset += n


def _check_total(params: list[torch.Tensor], flat: torch.Tensor, what: str) -> None:
    total = sum(p.numel() for p in params)
    if total != flat.numel():
        raise ValueError(f"{what} has {flat.numel()} entries but the parameters hold {total}")


__all__ = ["ParamSlot", "assign_gradient", "flatten", "load_theta", "parameter_slots", "theta_of",
           "trainable_parameters", "unflatten"]
