"""The white-box front placed before the black-box classifier: built, saved, loaded, put in front.

A run folder holds one trained front: ``front.pt`` (its state dict) and ``run.json`` (the
``DefenseConfig`` it was built from, the image shape, and what training spent). From them:

- :func:`build_front` makes the module for a config (a ``Denoiser``, or for ZO-AE-DS the
  denoiser, encoder and decoder in a row);
- :func:`save_front` writes ``front.pt`` and ``run.json`` (the last step of training);
- :func:`load_front` rebuilds it; :func:`open_trained_front` also checks the folder holds the
  method asked for (what ``defense certify`` does first);
- :func:`smoothed_pipeline` is the classifier that is then smoothed, ``f(front(x))``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from deepzero_oracle import LocalBlackBox
from deepzero_oracle.runs import save_torch, write_json

from deepzero_oracle.adapters.defense.denoiser import Decoder, Denoiser, Encoder, channels_last_runner, default_latent

if TYPE_CHECKING:
    from deepzero_oracle.adapters.defense.training import DefenseConfig

__all__ = ["build_front", "save_front", "load_front", "open_trained_front", "front_sha256", "smoothed_pipeline"]


def build_front(config: "DefenseConfig", image_shape: tuple[int, ...]) -> nn.Module:
    """The white-box module placed before the classifier, ``[B, C, H, W] -> [B, C, H, W]``.

    ``fo-ds`` / ``zo-ds``: a ``Denoiser``; ``zo-ae-ds``: ``Sequential(denoiser, encoder,
    decoder)`` (named ``denoiser``, ``encoder``, ``decoder``).
    ZO-AE-DS needs even image sides (the decoder up-samples by 2).
    """
    channels, size = image_shape[0], tuple(image_shape[1:])
    torch.manual_seed(config.seed)
    denoiser = Denoiser(channels, config.width, config.depth)
    if config.method != "zo-ae-ds":
        return denoiser
    latent = config.latent or default_latent(size)
    return nn.Sequential(OrderedDict(denoiser=denoiser, encoder=Encoder(size, latent, channels),
                                     decoder=Decoder(size, latent, channels)))


def save_front(front: nn.Module, out: str | Path, info: dict) -> None:
    """Write ``out/front.pt`` (``front``'s state dict), then ``out/run.json`` (``info``, which
    must hold ``config`` and ``image_shape`` for :func:`load_front`), each atomically."""
    out = Path(out)
    save_torch(front.state_dict(), out / "front.pt")
    write_json(out / "run.json", info)


def load_front(run_dir: str | Path) -> tuple[nn.Module, "DefenseConfig"]:
    """Rebuild the trained front from ``<run_dir>/run.json`` and ``front.pt``; eval mode."""
    from deepzero_oracle.adapters.defense.training import DefenseConfig  # training imports this module

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    config = DefenseConfig(**info["config"])
    front = build_front(config, tuple(info["image_shape"]))
    front.load_state_dict(torch.load(run_dir / "front.pt", weights_only=True))
    front.eval()
    return front, config


def open_trained_front(run_dir: str | Path, method: str) -> tuple[nn.Module, "DefenseConfig", dict]:
    """``(front, config, run.json)`` of the finished ``method`` run in ``run_dir``.

    FileNotFoundError (saying which command trains it) when the folder holds no finished run,
    ValueError when it holds another method's.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(
            f"{run_dir}/run.json not found: run `defense train --method {method} --out {run_dir}` first")
    front, config = load_front(run_dir)
    if config.method != method:
        raise ValueError(f"{run_dir} holds a {config.method} run, not {method}")
    return front, config, json.loads((run_dir / "run.json").read_text())


def front_sha256(run_dir: str | Path) -> str:
    """The SHA-256 of ``run_dir/front.pt``: which trained front a certification log belongs to."""
    return hashlib.sha256((Path(run_dir) / "front.pt").read_bytes()).hexdigest()


def smoothed_pipeline(front: nn.Module | None, blackbox: Callable) -> LocalBlackBox:
    """The base classifier that is smoothed: ``x [N, C, H, W] -> f(front(x)) [N, classes]``.

    ``front`` runs locally (white box, no grad) on a channels-last copy, whose convolutions run
    faster on a CPU (equal values up to float rounding); ``f`` is only queried and
    gets ``front(x)`` in the usual layout. ``None`` = no denoiser.
    """
    run = channels_last_runner(front) if front is not None else None

    def pipeline(x: torch.Tensor):
        with torch.no_grad():
            return blackbox(run(x) if run is not None else x)

    return LocalBlackBox(pipeline)
