"""The SOL corrector: a network mapping a source state (+ parameter fields) to a correction.

The default `Corrector` is a small CNN: one functional forward (`conv_stack`) serves both the plain
module (P = 1) and P perturbed copies at once (grouped convolutions, its ``batched`` method), so ZO
queries and FO training run the very same arithmetic. Any other ``nn.Module`` with
``forward(state [B, C, H, W], param_fields [B, F, H, W]) -> correction [B, C, H, W]`` works too
(`load_factory`, ``--corrector MODULE:FACTORY``); `corrections` evaluates P parameter copies of it
with ``torch.func.functional_call`` + ``vmap``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Corrector", "check_corrector", "conv_stack", "corrections", "load_factory", "make_corrector"]


def conv_stack(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], pad_mode: str) -> torch.Tensor:
    """Run P copies of a conv/tanh stack, copy p on its own inputs.

    Args:
        x: ``[P, B, C_in, H, W]`` inputs (copy p sees ``x[p]``).
        weights: per layer ``[P, C_out, C_in, k, k]``.
        biases: per layer ``[P, C_out]``.
        pad_mode: ``"circular"`` (periodic domains) or ``"constant"`` (walls).
    Returns:
        ``[P, B, C_out_last, H, W]``.
    """
    P, B, _, H, W = x.shape
    h = x.permute(1, 0, 2, 3, 4).reshape(B, -1, H, W)  # copies become channel groups of one conv
    for i, (w, b) in enumerate(zip(weights, biases)):
        k = w.shape[-1]
        pad = k // 2
        h = F.pad(h, (pad, pad, pad, pad), mode=pad_mode)
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), groups=P)
        if i < len(weights) - 1:
            h = torch.tanh(h)
    return h.reshape(B, P, -1, H, W).permute(1, 0, 2, 3, 4)


class Corrector(nn.Module):
    """``correction = out_scale * mask * CNN([normalized state, normalized param fields])``.

    Args:
        channels: C, state channels.
        param_channels: F, the static input fields (K params as constant fields, or the data's fields).
        hidden: channels of the hidden layers.
        depth: conv layers (>= 1); tanh between them.
        kernel: odd kernel size.
        pad_mode: ``"circular"`` or ``"constant"``.
        stats: normalization constants (buffers, not trained): ``state_mean/state_std [C]``,
            ``param_mean/param_std [P]``, ``out_scale`` (scalar) and ``mask [C, H, W]``.
    The trainable parameters (theta) are only the conv weights and biases.
    """

    def __init__(self, channels: int, param_channels: int, *, hidden: int = 8, depth: int = 2, kernel: int = 3,
                 pad_mode: str = "circular", stats: dict | None = None):
        super().__init__()
        if depth < 1 or kernel % 2 == 0 or hidden < 1:
            raise ValueError(f"corrector: need depth >= 1, odd kernel, hidden >= 1; got {depth}, {kernel}, {hidden}")
        self.pad_mode = pad_mode
        sizes = [channels + param_channels] + [hidden] * (depth - 1) + [channels]
        self.layers = nn.ModuleList(nn.Conv2d(a, b, kernel) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():
            self.layers[-1].weight.mul_(0.1)  # start near the source solver (small corrections)
            self.layers[-1].bias.zero_()
        stats = stats or {}
        self.register_buffer("state_mean", torch.as_tensor(stats.get("state_mean", np.zeros(channels)), dtype=torch.float64))
        self.register_buffer("state_std", torch.as_tensor(stats.get("state_std", np.ones(channels)), dtype=torch.float64))
        self.register_buffer("param_mean", torch.as_tensor(stats.get("param_mean", np.zeros(param_channels)), dtype=torch.float64))
        self.register_buffer("param_std", torch.as_tensor(stats.get("param_std", np.ones(param_channels)), dtype=torch.float64))
        self.register_buffer("out_scale", torch.as_tensor(float(stats.get("out_scale", 1.0)), dtype=torch.float64))
        mask = stats.get("mask")
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float64) if mask is not None else torch.ones(()))
        self.double()

    def inputs(self, state: torch.Tensor, param_fields: torch.Tensor) -> torch.Tensor:
        """``state [..., C, H, W]``, ``param_fields [..., P, H, W]`` -> normalized ``[..., C + P, H, W]``."""
        s = (state - self.state_mean[:, None, None]) / self.state_std[:, None, None]
        p = (param_fields - self.param_mean[:, None, None]) / self.param_std[:, None, None]
        return torch.cat([s, p], dim=-3)

    def batched(self, state: torch.Tensor, param_fields: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Corrections of P parameter copies.

        Args:
            state: ``[P, B, C, H, W]``.
            param_fields: ``[B, P_f, H, W]`` (shared by all copies).
            params: ``{name: [P, *shape]}`` in ``named_parameters`` order.
        Returns:
            ``[P, B, C, H, W]``.
        """
        x = self.inputs(state, param_fields.expand(state.shape[0], *param_fields.shape))
        n = len(self.layers)
        ws = [params[f"layers.{i}.weight"] for i in range(n)]
        bs = [params[f"layers.{i}.bias"] for i in range(n)]
        return self.out_scale * self.mask * conv_stack(x, ws, bs, self.pad_mode)

    def forward(self, state: torch.Tensor, param_fields: torch.Tensor) -> torch.Tensor:
        """``state [B, C, H, W]``, ``param_fields [B, P_f, H, W]`` -> correction ``[B, C, H, W]``."""
        params = {k: v[None] for k, v in self.named_parameters()}
        return self.batched(state[None], param_fields, params)[0]


def make_corrector(channels: int, n_fields: int, stats: dict | None = None, *, periodic: bool = False,
                   hidden: int = 8, depth: int = 2, kernel: int = 3, seed: int = 0) -> Corrector:
    """The default float64 corrector with seeded initial weights.

    Args:
        channels: C, state channels; n_fields: F, the corrector's static input fields (K params by default).
        stats: see `Corrector` (from `deepzero_oracle.adapters.sol.data.corrector_stats`).
        periodic: the domain wraps around (circular padding; else zero padding).
        hidden, depth, kernel: architecture.
        seed: initialization seed.
    Returns:
        `Corrector` (parameters count: ``sum(p.numel() for p in c.parameters())``).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Corrector(channels, n_fields, hidden=hidden, depth=depth, kernel=kernel,
                         pad_mode="circular" if periodic else "constant", stats=stats)


def load_factory(spec: str):
    """The factory a ``--corrector MODULE:FACTORY`` names: ``factory(channels, n_params) -> nn.Module``."""
    from deepzero_oracle.blackbox.spec import load_callable

    try:
        return load_callable(spec)
    except (ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"--corrector {spec}: cannot load it ({type(e).__name__}: {e}); expected MODULE:FACTORY "
                         f"naming factory(channels, n_params) -> nn.Module") from e


def check_corrector(module: nn.Module, state: torch.Tensor, param_fields: torch.Tensor, where: str) -> nn.Module:
    """Check a corrector once on real inputs: trainable parameters, and ``module(state [B, C, H, W],
    param_fields [B, F, H, W])`` returns a finite ``[B, C, H, W]``. Returns the module; ValueError else."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"{where} returned {type(module).__name__}; it must return a torch nn.Module")
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{where}: the corrector has no trainable parameters")
    try:
        with torch.no_grad():
            out = module(state, param_fields)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way: bad input
        raise ValueError(f"{where}: forward(state {list(state.shape)}, param_fields {list(param_fields.shape)}) "
                         f"failed: {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(state.shape):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where}: forward(state {list(state.shape)}, param_fields {list(param_fields.shape)}) "
                         f"returned {got}; a correction has the state's shape {list(state.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{where}: the corrector's output is NaN/Inf on training states")
    return module


def corrections(module: nn.Module, state: torch.Tensor, param_fields: torch.Tensor,
                params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Corrections of P parameter copies of a corrector, each on its own states.

    Args:
        module: the corrector; one with a ``batched(state, param_fields, params)`` method (the default
            `Corrector`) uses it, any other is run by ``torch.func.functional_call`` under ``vmap``.
        state: ``[P, B, C, H, W]``.
        param_fields: ``[B, F, H, W]`` (shared by all copies).
        params: ``{name: [P, *shape]}``, the trainable parameters of each copy.
    Returns:
        ``[P, B, C, H, W]``.
    """
    batched = getattr(module, "batched", None)
    if callable(batched):
        return batched(state, param_fields, params)

    def one_copy(weights, s):
        return torch.func.functional_call(module, weights, (s, param_fields))

    return torch.func.vmap(one_copy)(params, state)
