"""The SOL corrector: a small CNN mapping a source state (+ physics parameter fields) to a correction.

One functional forward (`conv_stack`) serves both the plain module (P = 1) and P perturbed copies at
once (grouped convolutions), so ZO queries and FO training run the very same arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Corrector", "make_corrector", "conv_stack"]


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
        param_channels: number of parameter-field channels (``scenario.param_fields`` gives them).
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


def make_corrector(scenario, stats: dict, *, hidden: int = 8, depth: int = 2, kernel: int = 3, seed: int = 0) -> Corrector:
    """A float64 corrector for ``scenario`` with seeded initial weights.

    Args:
        scenario: a `deepzero_oracle.simulators.Scenario`.
        stats: see `Corrector` (from `deepzero_oracle.adapters.sol.data.corrector_stats`).
        hidden, depth, kernel: architecture.
        seed: initialization seed.
    Returns:
        `Corrector` (parameters count: ``sum(p.numel() for p in c.parameters())``).
    """
    pad = "circular" if scenario.name == "burgers" else "constant"
    n_param = len(stats["param_mean"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Corrector(len(scenario.channels), n_param, hidden=hidden, depth=depth, kernel=kernel,
                         pad_mode=pad, stats=stats)

