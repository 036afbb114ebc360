"""Random search directions as a recipe: a seed and a shape, made into rows wherever needed.

A ``Directions`` is small and immutable, so it travels to parallel workers instead of its
``[q, dim]`` matrix, and any worker makes exactly the rows it needs, bitwise equal to the same
rows of the full matrix: rows come in blocks of ``rows_per_seed``, block k drawn from its own
generator seeded by ``(seed, k)``.
"""

from __future__ import annotations

import dataclasses

import torch

from deepzero_oracle.estimators.base import mask_coordinates

DISTRIBUTIONS = ("gaussian", "sphere")


def check_distribution(distribution: str) -> str:
    """``distribution`` if it is one of ``DISTRIBUTIONS``, else a ValueError."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'gaussian' or 'sphere', got {distribution!r}")
    return distribution


@dataclasses.dataclass(frozen=True, eq=False)
class Directions:
    """``q`` random directions in ``R^dim``, zero outside the kept coordinates.

    Attributes:
        seed: any integer; the same recipe gives the same rows everywhere.
        q, dim: shape of the directions ``[q, dim]``.
        dtype: a floating torch dtype.
        distribution: "gaussian" (``N(0, I)`` on the kept coordinates) or "sphere" (unit rows).
        coords: kept coordinates ``[d]`` (long; None: all ``dim``).
        rows_per_seed: rows per generator (fixes the draws: part of the recipe).
    """

    seed: int
    q: int
    dim: int
    dtype: torch.dtype = torch.float32
    distribution: str = "gaussian"
    coords: torch.Tensor | None = None
    rows_per_seed: int = 16

    def __post_init__(self):
        check_distribution(self.distribution)
        if int(self.q) < 0 or int(self.dim) < 1 or int(self.rows_per_seed) < 1:
            raise ValueError(f"need q >= 0, dim >= 1 and rows_per_seed >= 1; got q={self.q}, "
                             f"dim={self.dim}, rows_per_seed={self.rows_per_seed}")
        if not self.dtype.is_floating_point:
            raise TypeError(f"directions must be floating point, got {self.dtype}")
        if self.coords is not None:  # a private copy: the recipe must not change under us
            coords = torch.as_tensor(self.coords, dtype=torch.long).reshape(-1).clone()
            if coords.numel() and (coords.min() < 0 or coords.max() >= self.dim):
                raise IndexError(f"coords must lie in [0, {self.dim})")
            object.__setattr__(self, "coords", coords)

    @classmethod
    def masked(cls, seed: int, q: int, dim: int, mask=None, *, dtype: torch.dtype | None = None,
               distribution: str = "gaussian") -> "Directions":
        """The recipe with ``seed`` for ``q`` directions ``[q, dim]``, zero outside a boolean
        ``mask [dim]`` (None: all coordinates kept); ``dtype`` defaults to
        ``torch.get_default_dtype()``."""
        coords = None if mask is None else mask_coordinates(mask, int(dim))
        return cls(int(seed), int(q), int(dim), dtype or torch.get_default_dtype(), distribution,
                   coords)

    @classmethod
    def draw(cls, q: int, dim: int, generator: torch.Generator | None = None, mask=None, *,
             dtype: torch.dtype | None = None, distribution: str = "gaussian") -> "Directions":
        """As ``masked``, with the seed drawn from ``generator`` (None: torch's global RNG), so
        a seeded run draws the same directions again."""
        seed = int(torch.randint(2**63 - 1, (), generator=generator))
        return cls.masked(seed, q, dim, mask, dtype=dtype, distribution=distribution)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Directions ``[stop - start, dim]`` for rows ``[start, stop)``, made without the
        rows before ``start``."""
        if not 0 <= start <= stop <= self.q:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.q} directions")
        out = torch.zeros(stop - start, self.dim, dtype=self.dtype)
        size = self.rows_per_seed
        for k in range(start // size, -(-stop // size)):
            first = k * size  # row number of the block's first row
            lo, hi = max(start, first), min(stop, first + size)
            part = self._block(k)[lo - first : hi - first]
            if self.coords is None:
                out[lo - start : hi - start] = part
            else:
                out[lo - start : hi - start, self.coords] = part
        return out

    def matrix(self) -> torch.Tensor:
        """All directions ``[q, dim]``."""
        return self.rows(0, self.q)

    def _block(self, k: int) -> torch.Tensor:
        """Block k on the kept coordinates: ``[min(rows_per_seed, q - k rows_per_seed), d]``
        (always drawn whole, so its rows do not depend on which of them are asked for)."""
        n = min(self.rows_per_seed, self.q - k * self.rows_per_seed)
        # splitmix-style mixing: distinct, well-spread generator seeds per (seed, block)
        mixed = (self.seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 1) % 2**63
        generator = torch.Generator().manual_seed(mixed)
        width = self.dim if self.coords is None else len(self.coords)
        u = torch.randn(n, width, generator=generator, dtype=self.dtype)
        if self.distribution == "sphere":
            u = u / u.norm(dim=1, keepdim=True)
        return u


def direction_matrix(dirs) -> torch.Tensor:
    """The rows ``[Q, dim]`` of ``dirs``: a recipe (anything with ``matrix()``) or a tensor."""
    return dirs.matrix() if hasattr(dirs, "matrix") else torch.as_tensor(dirs)


__all__ = ["DISTRIBUTIONS", "Directions", "check_distribution", "direction_matrix"]
