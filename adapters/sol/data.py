"""SOL data: train/test cases, down-sampled reference trajectories, source/reference pairs (NON).

Everything is seeded and cached as ``.npz`` under ``<out>/data`` (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from deepzero_oracle.simulators import Cases, get_scenario

__all__ = ["LR_SCHEDULES", "SIZES", "SOLConfig", "SOLData", "prepare_data", "scenario_for"]

# Scenario options per size preset: "tiny" for tests, "small" for the demo / this machine, "full" = defaults.
SIZES = {
    "burgers": {
        "tiny": dict(source_resolution=8, factor=2, reference_substeps=2, length=16.0),
        "small": dict(source_resolution=16),
        "full": {},
    },
    "wake2d": {
        "tiny": dict(source_resolution=8, factor=2, warmup_steps=20, re_range=(300.0, 1000.0)),
        "small": dict(source_resolution=16, warmup_steps=150, re_range=(300.0, 2000.0)),
        "full": {},
    },
}


LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class SOLConfig:
    """Everything that defines one SOL comparison (all methods share data, corrector and metric).

    Attributes:
        scenario: ``"burgers"`` or ``"wake2d"``; size: a key of `SIZES`.
        n_train / n_test: simulations; train_steps / test_steps: trajectory lengths (steps).
        hidden, depth, kernel: corrector architecture.
        unroll: n of SOL-n (solver steps per training window).
        batch_size: windows per optimizer step (NON uses ``batch_size * unroll`` pairs, the same data
            volume).
        steps: optimizer steps; lr: Adam learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine decay to 0 over ``steps``: with a few windows
            per step the last updates are noisy, and decay keeps that noise out of the final corrector).
        sparsity: ZO-SOL gradient sparsity (share of coordinates *not* estimated per step).
        redraw_every: steps between redraws of the random sparse coordinate mask.
        mu: CGE finite-difference step (the loss is float64 and deterministic, so small mu is safe).
        checkpoint_every: steps between checkpoints.
        seed: seed of the corrector init and window sampling (data seeds: seed+1 train, seed+2 test).
    """

    scenario: str = "burgers"
    size: str = "small"
    n_train: int = 8
    n_test: int = 8
    train_steps: int = 32
    test_steps: int = 32
    hidden: int = 8
    depth: int = 2
    kernel: int = 3
    unroll: int = 8
    batch_size: int = 4
    steps: int = 200
    lr: float = 3e-3
    lr_schedule: str = "constant"
    sparsity: float = 0.8
    redraw_every: int = 1
    mu: float = 1e-4
    checkpoint_every: int = 10
    seed: int = 0

    def check(self) -> "SOLConfig":
        """Validate; returns self. Raises ValueError naming the bad field."""
        if self.scenario not in SIZES:
            raise ValueError(f"scenario must be one of {sorted(SIZES)}, got {self.scenario!r}")
        if self.size not in SIZES[self.scenario]:
            raise ValueError(f"size must be one of {sorted(SIZES[self.scenario])}, got {self.size!r}")
        if self.unroll < 1 or self.unroll > self.train_steps:
            raise ValueError(f"unroll must be in [1, train_steps={self.train_steps}], got {self.unroll}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for k in ("n_train", "n_test", "test_steps", "batch_size", "steps", "checkpoint_every", "redraw_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SOLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def scenario_for(cfg: SOLConfig):
    """The `Scenario` of a config (its size preset applied)."""
    return get_scenario(cfg.scenario, **SIZES[cfg.scenario][cfg.size])


@dataclasses.dataclass
class SOLData:
    """Arrays of one comparison (float64, source grid).

    Attributes:
        train_cases / test_cases: `Cases`.
        train_ref: ``[N_train, T_train + 1, C, H, W]`` down-sampled reference trajectories.
        test_ref: ``[N_test, T_test + 1, C, H, W]``.
        train_src_next: ``[N_train, T_train, C, H, W]`` = source_step(train_ref[:, t]) (NON's inputs).
        train_pf / test_pf: ``[N, P_f, H, W]`` param fields.
        stats: normalization constants for `make_corrector`.
    """

    train_cases: Cases
    test_cases: Cases
    train_ref: np.ndarray
    test_ref: np.ndarray
    train_src_next: np.ndarray
    train_pf: np.ndarray
    test_pf: np.ndarray
    stats: dict


def prepare_data(cfg: SOLConfig, out_dir, *, progress: bool = False) -> SOLData:
    """Generate (or reload from ``<out_dir>/data``) the cases, reference trajectories and NON pairs.

    Args:
        cfg: the comparison's config.
        out_dir: run root; arrays are cached in ``out_dir/data``.
        progress: tqdm bars for the reference solver.
    Returns:
        `SOLData`.
    """
    sc = scenario_for(cfg)
    cache = Path(out_dir) / "data"
    train = sc.generate_cases(cfg.n_train, seed=cfg.seed + 1, cache_dir=cache)
    test = sc.generate_cases(cfg.n_test, seed=cfg.seed + 2, cache_dir=cache)
    train_ref = sc.reference_trajectory(train, cfg.train_steps, cache_dir=cache, progress=progress)
    test_ref = sc.reference_trajectory(test, cfg.test_steps, cache_dir=cache, progress=progress)
    pairs = cache / f"pairs-{_key(cfg)}.npz"
    if pairs.exists():
        with np.load(pairs, allow_pickle=False) as z:
            src_next = z["src_next"]
    else:
        n, t1 = train_ref.shape[:2]
        flat = train_ref[:, :-1].reshape(n * (t1 - 1), *train_ref.shape[2:])
        p = np.repeat(train.params, t1 - 1, axis=0)
        src_next = np.asarray(sc.source_step(flat, p)).reshape(n, t1 - 1, *train_ref.shape[2:])
        np.savez_compressed(pairs, src_next=src_next)
    train_pf, test_pf = sc.param_fields(train.params), sc.param_fields(test.params)
    err = train_ref[:, 1:] - src_next  # the per-step error the corrector must learn: sets its output scale
    mask = None
    if cfg.scenario == "wake2d":
        fluid = sc.fluid_mask("source").astype(np.float64)
        mask = np.stack([fluid, fluid])
        mask[0, :, -1] = 0.0  # v_x's last column is the right wall (padding)
    stats = {
        "state_mean": train_ref.mean(axis=(0, 1, 3, 4)), "state_std": train_ref.std(axis=(0, 1, 3, 4)) + 1e-8,
        "param_mean": train_pf.mean(axis=(0, 2, 3)), "param_std": train_pf.std(axis=(0, 2, 3)) + 1e-8,
        "out_scale": float(err.std()) + 1e-12, "mask": mask,
    }
    for k in ("param_std", "state_std"):  # constant channels (a fixed mask, one Re): keep them O(1)
        stats[k] = np.where(stats[k] < 1e-6, 1.0, stats[k])
    return SOLData(train, test, train_ref, test_ref, src_next, train_pf, test_pf, stats)


def _key(cfg: SOLConfig) -> str:
    import hashlib
    keep = {k: getattr(cfg, k) for k in ("scenario", "size", "n_train", "train_steps", "seed")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
