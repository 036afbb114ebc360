"""Small white-box front-ends placed before the black-box classifier.

- :class:`Denoiser`: a residual conv net ``x + body(x)`` (a DnCNN sized for 2 CPU cores).
- :class:`Encoder` / :class:`Decoder`: the small autoencoder of ZO-AE-DS; the ZO estimate is taken
  in its latent ``z [B, latent]``, the decoder is pre-trained and frozen.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["Denoiser", "Encoder", "Decoder", "channels_last_runner", "default_latent"]


class Denoiser(nn.Module):
    """Residual denoiser ``[B, C, H, W] -> [B, C, H, W]``: ``x + body(x)``.

    ``body`` is ``depth`` 3x3 convs (padding 1) with ReLUs between them, ``width`` channels inside.
    Width 16, depth 3 on one channel: 2,625 parameters. The last conv starts small so the
    untrained denoiser is close to the identity (the classifier sees near-clean inputs at first).
    """

    def __init__(self, channels: int = 1, width: int = 16, depth: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 convolutions, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            self.body[-1].weight.mul_(0.1)
            self.body[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> denoised ``[B, C, H, W]``."""
        return x + self.body(x)


def _size(side: int | tuple[int, int]) -> tuple[int, int]:
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def default_latent(side: int | tuple[int, int]) -> int:
    """Latent size for ``side x side`` (or ``(H, W)``) images: about 1/16 of the pixels as in
    ZO-AE-DS (192 for 32x32x3), but at least 16 so 8x8 digits stay recognisable."""
    height, width = _size(side)
    return max(16, (height * width) // 16)


class Encoder(nn.Module):
    """``[B, C, H, W] -> z [B, latent]``: strided 3x3 conv (8 channels), ReLU, Linear.

    ``side``: the image side, or ``(H, W)``.
    """

    def __init__(self, side: int | tuple[int, int], latent: int, channels: int = 1, width: int = 8):
        super().__init__()
        half_h, half_w = ((s + 1) // 2 for s in _size(side))
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(width * half_h * half_w, latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``z [B, latent]``."""
        return self.net(x)


class Decoder(nn.Module):
    """``z [B, latent] -> [B, C, H, W]``: Linear, ReLU, transposed conv (x2 up-sampling).

    ``side``: the image side, or ``(H, W)``; both must be even.
    """

    def __init__(self, side: int | tuple[int, int], latent: int, channels: int = 1, width: int = 8):
        super().__init__()
        if any(s % 2 for s in _size(side)):
            raise ValueError(f"the ZO-AE-DS decoder up-samples by 2, so it needs even image sides, got "
                             f"{'x'.join(map(str, _size(side)))}; crop or pad the images, or use zo-ds")
        self.width, self.half = width, tuple(s // 2 for s in _size(side))
        self.fc = nn.Sequential(nn.Linear(latent, width * self.half[0] * self.half[1]), nn.ReLU())
        self.up = nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, latent]`` -> images ``[B, C, H, W]``."""
        h = self.fc(z).reshape(len(z), self.width, *self.half)
        return self.up(h)


def channels_last_runner(model: nn.Module):
    """``x [N, C, H, W] -> model(x)`` on a channels-last copy of ``model`` (``model`` is left as
    it is): small convolutions run faster on a CPU that way, with equal values up to
    float rounding. The answer comes back in the usual layout. Only for models whose layers take
    any memory layout (a ``.view`` on activations does not)."""
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return fast(x).contiguous()

    return run
