"""SOL data: a comparison's recipe (`SOLConfig`) and what training needs beyond the trajectories
(`SOLData`: the corrector's input fields, NON's precomputed solver steps, normalization constants).

The trajectories themselves come from a file in the common format (`trajectories.py`); NON's pairs
are computed once through the comparison's solver and cached as ``.npz`` (never pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from .solver import Solver, solve_checked
from .trajectories import Trajectories

__all__ = ["ESTIMATORS", "LR_SCHEDULES", "SOLConfig", "SOLData", "corrector_stats", "prepare_data"]

LR_SCHEDULES = ("constant", "cosine")
ESTIMATORS = ("cge", "rge")


@dataclasses.dataclass
class SOLConfig:
    """The training recipe of one SOL comparison (all methods share corrector, windows and metric).

    Attributes:
        hidden, depth, kernel: the default corrector's architecture.
        corrector: ``MODULE:FACTORY`` of a user's corrector (``factory(channels, n_params) -> nn.Module``),
            or "" for the default CNN.
        unroll: n of SOL-n (solver steps per training window).
        batch_size: windows per optimizer step (NON uses ``batch_size * unroll`` pairs, the same data
            volume).
        steps: optimizer steps; lr: Adam learning rate (NON, FO-SOL).
        zo_lr: ZO-SOL's Adam learning rate; 0 means ``lr / sqrt(1 - sparsity)``. A sparse
            estimate moves each coordinate on about one step in 1 / (1 - sparsity), and Adam,
            which normalises by the running second moment, then moves it about
            sqrt(1 - sparsity) times as far per step as a dense gradient would; the scaled rate
            restores the dense step length.
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine decay to 0 over ``steps``: with a few windows
            per step the last updates are noisy, and decay keeps that noise out of the final corrector).
        sparsity: ZO-SOL gradient sparsity (share of coordinates *not* estimated per step).
        redraw_every: steps between redraws of the random sparse coordinate mask.
        mu: the finite-difference step (the loss is float64 and deterministic, so small mu is safe).
        estimator: ZO-SOL's gradient estimate: ``"cge"`` (coordinate-wise, forward differences on the
            ``1 - sparsity`` share of coordinates each step) or ``"rge"`` (``q`` random directions).
        q, distribution, antithetic: RGE's directions per step, their law ("gaussian" or "sphere"),
            and central differences (``2q`` queries a step instead of ``q + 1``).
        warmup: steps of linear learning-rate warm-up (from 1/warmup of the rate) before the schedule.
        clip: largest norm of a step's gradient estimate (``Trainer(clip_norm=...)``); 0: no clipping.
        checkpoint_every: steps between checkpoints.
        seed: seed of the corrector init and window sampling.
    """

    hidden: int = 8
    depth: int = 2
    kernel: int = 3
    corrector: str = ""
    unroll: int = 4
    batch_size: int = 4
    steps: int = 400
    lr: float = 3e-3
    zo_lr: float = 0.0
    lr_schedule: str = "cosine"
    sparsity: float = 0.95
    redraw_every: int = 1
    mu: float = 1e-4
    estimator: str = "cge"
    q: int = 16
    distribution: str = "gaussian"
    antithetic: bool = False
    warmup: int = 0
    clip: float = 0.0
    checkpoint_every: int = 10
    seed: int = 0

    def check(self) -> "SOLConfig":
        """Validate; returns self. Raises ValueError naming the bad field."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not self.lr > 0 or not self.mu > 0 or self.zo_lr < 0:
            raise ValueError(f"lr and mu must be positive and zo_lr >= 0, got lr={self.lr}, mu={self.mu}, "
                             f"zo_lr={self.zo_lr}")
        if self.estimator not in ESTIMATORS or self.distribution not in ("gaussian", "sphere"):
            raise ValueError(f"estimator must be one of {ESTIMATORS} and distribution 'gaussian' or 'sphere', got "
                             f"{self.estimator!r} and {self.distribution!r}")
        if self.warmup < 0 or self.clip < 0:
            raise ValueError(f"warmup and clip must be >= 0, got {self.warmup} and {self.clip}")
        for k in ("unroll", "batch_size", "steps", "checkpoint_every", "redraw_every", "hidden", "depth", "kernel",
                  "q"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        return self

    @property
    def zo_rate(self) -> float:
        """ZO-SOL's Adam learning rate (``zo_lr``, or ``lr / sqrt(1 - sparsity)`` when it is 0)."""
        return self.zo_lr or self.lr / (1.0 - self.sparsity) ** 0.5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SOLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class SOLData:
    """What training and evaluation need, on the source grid (float64).

    Attributes:
        trajectories: the comparison's `Trajectories` (``train_states [S, T+1, C, H, W]``, ...).
        train_fields / test_fields: ``[S, F, H, W]`` corrector input fields.
        train_src_next: ``[S, T, C, H, W]`` = solver(train_states[:, t]) (NON's inputs), or None.
        stats: normalization constants of the default corrector (`corrector_stats`).
    """

    trajectories: Trajectories
    train_fields: np.ndarray
    test_fields: np.ndarray
    train_src_next: np.ndarray | None
    stats: dict


def prepare_data(trajectories: Trajectories, solver=None, *, cache_dir=None) -> SOLData:
    """Compute (or reload from ``cache_dir``) NON's pairs through ``solver``, and the corrector's inputs.

    Args:
        trajectories: the data.
        solver: a `Solver` or ``f(state [N, C, H, W], params [N, K]) -> [N, C, H, W]``; it is called on all
            S x T training states (in one call), once per data and solver. None: no pairs (SRC, or a
            corrector whose constants come from a checkpoint), and an output scale of 1.
        cache_dir: if given, the pairs are kept there as ``pairs-<key>.npz``, keyed by the data's digest and
            the solver's spec.
    Returns:
        `SOLData`.
    """
    train_fields = trajectories.corrector_fields("train")
    test_fields = trajectories.corrector_fields("test")
    if solver is None:
        return SOLData(trajectories, train_fields, test_fields, None,
                       corrector_stats(trajectories, train_fields, None))
    solver = Solver.of(solver)
    ref = trajectories.train_states
    n, t1 = ref.shape[:2]
    key = hashlib.sha256(f"{trajectories.digest()} {solver.spec}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"pairs-{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            src_next = z["src_next"]
    else:
        flat = torch.from_numpy(ref[:, :-1].reshape(n * (t1 - 1), *ref.shape[2:]))
        params = np.repeat(trajectories.train_params, t1 - 1, axis=0)
        src_next = solve_checked(solver, flat, params, "NON pairs").numpy().reshape(n, t1 - 1, *ref.shape[2:])
        if path is not None:
            from deepzero_oracle.runs import atomic_write

            atomic_write(path, lambda tmp: np.savez_compressed(tmp, src_next=src_next))
    stats = corrector_stats(trajectories, train_fields, src_next)
    return SOLData(trajectories, train_fields, test_fields, src_next, stats)


def corrector_stats(trajectories: Trajectories, train_fields: np.ndarray, src_next: np.ndarray | None) -> dict:
    """The default corrector's constants: per-channel state and field mean/std over the training data,
    the output scale (std of the per-step error ``ref_{t+1} - solver(ref_t)`` the corrector must learn;
    1 without ``src_next``) and the correction mask."""
    ref = trajectories.train_states
    out_scale = 1.0 if src_next is None else float((ref[:, 1:] - src_next).std()) + 1e-12
    stats = {
        "state_mean": ref.mean(axis=(0, 1, 3, 4)), "state_std": ref.std(axis=(0, 1, 3, 4)) + 1e-8,
        "param_mean": train_fields.mean(axis=(0, 2, 3)), "param_std": train_fields.std(axis=(0, 2, 3)) + 1e-8,
        "out_scale": out_scale, "mask": trajectories.correction_mask,
    }
    for k in ("param_std", "state_std"):  # constant channels (a fixed mask, one Re): keep them O(1)
        stats[k] = np.where(stats[k] < 1e-6, 1.0, stats[k])
    return stats
