"""Train a denoiser in front of a black-box classifier (FO-DS, ZO-DS, ZO-AE-DS) and certify it.

All methods share the frozen classifier ``f`` and the objectives of denoised smoothing
(Salman et al. 2020), with ``delta ~ N(0, sigma^2 I)`` drawn afresh every epoch:

- ``mse``:  ``MSE(D(x + delta), x)``; needs no classifier at all (FO, white-box denoiser only);
- ``stab``: ``CE(f(D(x + delta)), argmax f(x))`` (the labels are the black box's clean predictions);
- ``mse+stab``: ``mse`` for ``pretrain_epochs``, then ``stab`` for ``epochs``.

How the ``stab`` gradient is obtained is what distinguishes the methods:

- ``fo-ds``: autograd through the classifier (white-box reference, local classifier only);
- ``zo-ds`` (DeepZero): sparse CGE over the denoiser's weights, through the black box only;
  layer-wise sparsity ratios from ZO-GraSP, random coordinates redrawn every few epochs;
- ``zo-ae-ds``: denoiser ``D`` + encoder ``E`` -> latent ``z`` -> frozen pre-trained decoder
  ``Dec`` -> black box. CGE with central differences estimates ``dL/dz`` (2 x latent queries per
  image), autograd carries it back through ``E`` and ``D`` (chain rule, :class:`LatentCGE`).

Costs are reported as oracle ``queries`` (the engine's unit: one loss at one theta) and as
``blackbox_images`` (rows sent to the black box), which compares methods with different thetas.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import (CGE, RGE, Autograd, Callback, Estimator, LocalBlackBox, MaskSchedule, ModuleOracle,
                            Oracle, Trainer)
from deepzero_oracle.blackbox import as_tensor
from deepzero_oracle.data import class_balanced_sample, load_dataset
from deepzero_oracle.pruning import ratios_from_scores, uniform_ratios, zo_grasp_scores

from deepzero_oracle.adapters.defense.certify_log import CertifyRun, certify_dataset
from deepzero_oracle.adapters.defense.denoiser import Decoder, Denoiser, Encoder, default_latent
from deepzero_oracle.adapters.defense.smoothing import Smooth

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "DefenseConfig",
    "CountingBlackBox",
    "LatentOracle",
    "LatentCGE",
    "build_front",
    "load_front",
    "clean_labels",
    "train_defense",
    "smoothed_pipeline",
    "certify_front",
]

METHODS = ("fo-ds", "zo-ds", "zo-ae-ds")
OBJECTIVES = ("mse", "stab", "mse+stab")


@dataclass
class DefenseConfig:
    """Everything that defines a defense run (saved as ``run.json``).

    Attributes:
        method: one of :data:`METHODS`.
        dataset: "digits" or "mnist5k".
        sigma: noise level of training and certification (0.12, 0.25, 0.5).
        objective: one of :data:`OBJECTIVES`.
        epochs: epochs of the main objective (``stab``; ``mse`` when the objective is ``mse``).
        pretrain_epochs: MSE epochs before ``stab`` for ``mse+stab`` (None: same as ``epochs``).
        ae_epochs: ZO-AE-DS autoencoder pre-training epochs (clean images, FO).
        batch_size, lr: Adam recipe shared by all methods.
        width, depth: denoiser size.
        latent: ZO-AE-DS latent size (None: :func:`default_latent`).
        sparsity: ZO-DS gradient sparsity (share of denoiser coordinates not queried per step).
        pruner: "zo-grasp" (DeepZero) or "uniform" layer-wise ratios for ZO-DS.
        redraw_every: epochs between ZO-DS mask redraws.
        mu: finite-difference step of CGE (both ZO methods).
        max_train: use only the first ``max_train`` training images (None: all).
        seed: seeds initialisation, noise, masks and shuffling.
    """

    method: str = "zo-ds"
    dataset: str = "digits"
    sigma: float = 0.25
    objective: str = "mse+stab"
    epochs: int = 5
    pretrain_epochs: int | None = None
    ae_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    width: int = 16
    depth: int = 3
    latent: int | None = None
    sparsity: float = 0.9
    pruner: str = "zo-grasp"
    redraw_every: int = 5
    mu: float = 5e-3
    max_train: int | None = None
    seed: int = 0

    def check(self) -> "DefenseConfig":
        """Validate the fields; returns self. Raises ``ValueError`` naming the bad field."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
        if self.pruner not in ("zo-grasp", "uniform"):
            raise ValueError(f"pruner must be 'zo-grasp' or 'uniform', got {self.pruner!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("epochs", "ae_epochs", "batch_size"):
            if getattr(self, name) < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be non-negative (batch_size >= 1), got {getattr(self, name)}")
        return self


class CountingBlackBox:
    """Wraps a black box and counts the images (rows) and calls sent to it; only forwards calls.

    ``box(x [N, ...]) -> [N, ...]`` exactly as the wrapped black box answers.
    """

    def __init__(self, blackbox: Callable):
        self.blackbox = blackbox
        self.rows = 0
        self.calls = 0

    def __call__(self, x):
        x = as_tensor(x).detach()
        self.rows += int(x.shape[0])
        self.calls += 1
        return as_tensor(self.blackbox(x))


# ----------------------------------------------------------------------------------------------
# ZO-AE-DS: a ZO estimate in the latent, autograd for the white-box part
# ----------------------------------------------------------------------------------------------


class LatentOracle(Oracle):
    """``theta = z.flatten() [B * latent] -> mean_i loss_i(blackbox(decoder(z_i)), y_i)``.

    Coordinate ``(i, j)`` of ``z`` only changes image ``i``'s loss, so ``coordinate_losses``
    decodes and sends one image per coordinate (plus the B unperturbed images once per theta)
    instead of the whole batch; the value returned is still the full batch loss, so CGE on this
    oracle is CGE on the true objective. A query is one such loss, i.e. one perturbed image.

    Args:
        decoder: frozen callable ``z [N, latent] -> images [N, ...]`` (white box, no grad needed).
        blackbox: ``images [N, ...] -> scores [N, classes]``.
        per_sample_loss: ``(scores [N, classes], targets [N]) -> [N]``.
        z: latents ``[B, latent]`` of the bound batch; targets ``y [B]``.
    """

    def __init__(self, decoder: Callable, blackbox: Callable, per_sample_loss: Callable, z: torch.Tensor,
                 y: torch.Tensor, **kw):
        self.z = z.detach().clone()
        self.B, self.k = self.z.shape
        super().__init__(self.B * self.k, **kw)
        self.decoder, self.blackbox, self.per_sample_loss, self.y = decoder, blackbox, per_sample_loss, y
        self._base_theta = None
        self._base_losses = None

    def theta(self) -> torch.Tensor:
        """The bound latents as theta ``[B * latent]``."""
        return self.z.reshape(-1).clone()

    def _image_losses(self, z_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = as_tensor(self.blackbox(self.decoder(z_rows)))
            return self.per_sample_loss(scores.to(z_rows.dtype), targets).reshape(-1)

    def _per_sample(self, theta: torch.Tensor) -> torch.Tensor:
        # Cached per theta: CGE asks for many coordinates around the same point.
        if self._base_theta is None or not torch.equal(self._base_theta, theta):
            self._base_theta = theta.clone()
            self._base_losses = self._image_losses(theta.reshape(self.B, self.k), self.y)
        return self._base_losses

    def evaluate_losses(self, thetas):
        # Generic path (a full batch per theta): used for plain loss queries.
        z = thetas.reshape(-1, self.k)
        per = self._image_losses(z, self.y.repeat(len(thetas)))
        return per.reshape(len(thetas), self.B).mean(1)

    def evaluate_coordinates(self, theta, coords, mu):
        base = self._per_sample(theta)
        sample = torch.div(coords, self.k, rounding_mode="floor")
        rows = theta.reshape(self.B, self.k)[sample].clone()
        rows[torch.arange(len(coords)), coords % self.k] += mu
        moved = self._image_losses(rows, self.y[sample])
        return (base.sum() - base[sample] + moved) / self.B


class LatentCGE(Estimator):
    """ZO-AE-DS's gradient: CGE (central differences) in the latent, chain rule for the rest.

    For a ``ModuleOracle`` whose learner is the white-box front ``x -> z`` (denoiser + encoder)
    and whose black box is ``z -> f(Dec(z))`` with a frozen decoder ``Dec``:
    ``dL/dtheta = (dz/dtheta)^T g_z`` with ``g_z`` from :class:`LatentOracle` (2 x latent queries
    per image) and the vector-Jacobian product by autograd through the learner only.
    The queries are added to ``oracle.queries`` so the Trainer's counts and checkpoints see them.

    Args:
        decoder: the frozen decoder ``z [N, latent] -> images``.
        blackbox: the classifier black box ``images -> scores``.
        mu: CGE step in the latent.
        per_sample_loss: ``(scores [N, C], y [N]) -> [N]``; default per-image cross-entropy.
    """

    name = "latent-cge"

    def __init__(self, decoder: Callable, blackbox: Callable, mu: float = 5e-3,
                 per_sample_loss: Callable | None = None):
        self.decoder, self.blackbox = decoder, blackbox
        self.cge = CGE(mu=mu, difference="central")
        self.per_sample_loss = per_sample_loss or (lambda s, y: F.cross_entropy(s, y, reduction="none"))

    def estimate(self, oracle, theta, mask=None, generator=None):
        """Gradient estimate ``[dim]`` for the learner's theta ``[dim]`` (mask zeroes coordinates)."""
        params = oracle.parameters()
        oracle.set_theta(theta)
        with torch.enable_grad():
            z = oracle.learner(oracle.x)  # [B, latent], with the graph through the white-box part
            latent = LatentOracle(self.decoder, self.blackbox, self.per_sample_loss, z, oracle.y)
            g_z = self.cge.estimate(latent, latent.theta())
            grads = torch.autograd.grad(z, params, grad_outputs=g_z.reshape(z.shape).to(z.dtype))
        oracle.queries += latent.queries
        grad = torch.cat([g.reshape(-1) for g in grads]).to(theta.dtype)
        if mask is not None:
            grad = grad * torch.as_tensor(mask, dtype=grad.dtype)
        return grad

    def queries_per_estimate(self, oracle, mask=None) -> int:
        raise NotImplementedError("LatentCGE costs 2 x latent x batch queries; use epochs, not max_queries")


# ----------------------------------------------------------------------------------------------
# Front-ends
# ----------------------------------------------------------------------------------------------


def build_front(config: DefenseConfig, image_shape: tuple[int, ...]) -> nn.Module:
    """The white-box module placed before the classifier, ``[B, C, H, W] -> [B, C, H, W]``.

    ``fo-ds`` / ``zo-ds``: a :class:`Denoiser`; ``zo-ae-ds``: ``Sequential(denoiser, encoder,
    decoder)`` (named ``denoiser``, ``encoder``, ``decoder``).
    """
    channels, side = image_shape[0], image_shape[-1]
    torch.manual_seed(config.seed)
    denoiser = Denoiser(channels, config.width, config.depth)
    if config.method != "zo-ae-ds":
        return denoiser
    latent = config.latent or default_latent(side)
    return nn.Sequential(OrderedDict(denoiser=denoiser, encoder=Encoder(side, latent, channels),
                                     decoder=Decoder(side, latent, channels)))


def load_front(run_dir: str | Path) -> tuple[nn.Module, DefenseConfig]:
    """Rebuild the trained front from ``<run_dir>/run.json`` and ``front.pt``; eval mode."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    config = DefenseConfig(**info["config"])
    front = build_front(config, tuple(info["image_shape"]))
    front.load_state_dict(torch.load(run_dir / "front.pt", weights_only=True))
    front.eval()
    return front, config


def clean_labels(blackbox: Callable, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """``argmax f(x)`` for ``x [N, ...]`` in batches: the stability objective's targets ``[N]``."""
    out = [as_tensor(blackbox(x[i : i + batch])).argmax(1) for i in range(0, len(x), batch)]
    return torch.cat(out).long()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _noisy(x: torch.Tensor, sigma: float, seed: int, epoch: int) -> torch.Tensor:
    # Noise per (seed, epoch): fresh every epoch, and a resumed run draws the same noise.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _fit_noisy(trainer: Trainer, x, y, config: DefenseConfig, epochs: int, salt: int) -> None:
    """Run ``trainer`` to ``epochs`` epochs, each on ``x + fresh noise`` with targets ``y``."""
    if trainer.checkpoint_path is not None and trainer.checkpoint_path.exists():
        trainer.load_checkpoint(trainer.checkpoint_path)
    while trainer.epoch < epochs:
        xn = _noisy(x, config.sigma, config.seed + 7919 * salt, trainer.epoch)
        trainer.fit(xn, y, epochs=trainer.epoch + 1, batch_size=config.batch_size, resume=False)


def train_defense(config: DefenseConfig, blackbox: Callable, out: str | Path, *,
                  whitebox: nn.Module | None = None, progress: bool = True) -> dict:
    """Train the front for ``config.method`` against ``blackbox`` and save it under ``out``.

    Args:
        config: the run's :class:`DefenseConfig`.
        blackbox: the classifier, only queried: ``images [N, C, H, W] -> scores [N, classes]``.
        out: run folder: ``front.pt``, ``run.json`` and one checkpointed Trainer folder per stage
            (``ae/``, ``mse/``, ``stab/``); rerunning resumes every stage from its checkpoint.
        whitebox: the same classifier as an ``nn.Module``; required by ``fo-ds`` only.
    Returns:
        the ``run.json`` dict: config, ``queries`` (oracle queries of the black-box stage plus
        ZO-GraSP and clean-label queries), ``blackbox_images``, seconds, the accuracy of
        ``f(front(x))`` on the first 500 clean test images (``pipeline_clean_accuracy``), image shape.
    """
    config.check()
    if config.method == "fo-ds" and whitebox is None:
        raise ValueError("fo-ds is the white-box reference: it needs the classifier module (use --classifier local)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(config.dataset)
    x = data.x_train if config.max_train is None else data.x_train[: config.max_train]
    box = CountingBlackBox(blackbox)
    started = time.perf_counter()
    front = build_front(config, data.image_shape)
    denoiser = front.denoiser if config.method == "zo-ae-ds" else front
    adam = lambda params: torch.optim.Adam(params, lr=config.lr)  # noqa: E731
    extra_queries = 0

    if config.method == "zo-ae-ds":
        # Autoencoder pre-training on clean images (white box, FO); the decoder is then frozen.
        ae = nn.Sequential(front.encoder, front.decoder)
        oracle = ModuleOracle(ae, F.mse_loss)
        trainer = Trainer(oracle, Autograd(), adam(ae.parameters()), out_dir=out / "ae",
                          seed=config.seed, progress=progress)
        trainer.fit(x, x, epochs=config.ae_epochs, batch_size=config.batch_size)
        for p in front.decoder.parameters():
            p.requires_grad_(False)
        front.decoder.eval()

    mse_epochs = config.epochs if config.objective == "mse" else (
        (config.pretrain_epochs if config.pretrain_epochs is not None else config.epochs)
        if config.objective == "mse+stab" else 0)
    if mse_epochs:
        # MSE needs no classifier: every method pre-trains the same way (FO on its white box).
        if config.method == "zo-ae-ds":
            learner = nn.Sequential(front.denoiser, front.encoder)
            oracle = ModuleOracle(learner, F.mse_loss, blackbox=front.decoder)
        else:
            learner = denoiser
            oracle = ModuleOracle(learner, F.mse_loss)
        trainer = Trainer(oracle, Autograd(), adam(learner.parameters()), out_dir=out / "mse",
                          seed=config.seed, progress=progress)
        _fit_noisy(trainer, x, x, config, mse_epochs, salt=1)

    stab_queries, prior_images = 0, 0
    if config.objective in ("stab", "mse+stab") and config.epochs:
        stab_dir = out / "stab"
        # A resumed run reuses the targets and the ZO-GraSP mask (restored from the checkpoint)
        # and the ledger of what was spent before, so totals do not depend on interruptions.
        resuming = (stab_dir / "checkpoint.pt").exists() and (stab_dir / "ledger.json").exists()
        if resuming:
            ledger = json.loads((stab_dir / "ledger.json").read_text())
            extra_queries, prior_images = int(ledger["extra_queries"]), int(ledger["blackbox_images"])
            y = torch.load(stab_dir / "labels.pt", weights_only=True)
        else:
            y = clean_labels(box, x)
            extra_queries += len(x)  # one query per clean image for the targets
            stab_dir.mkdir(parents=True, exist_ok=True)
            torch.save(y, stab_dir / "labels.pt")
        if config.method == "fo-ds":
            learner = denoiser
            oracle = ModuleOracle(learner, F.cross_entropy, blackbox=whitebox)
            estimator, masks = Autograd(), None
        elif config.method == "zo-ds":
            learner = denoiser
            oracle = ModuleOracle(learner, F.cross_entropy, blackbox=box)
            estimator = CGE(mu=config.mu)
            if resuming:  # placeholder ratios; the checkpoint restores the real schedule
                masks = None if config.sparsity == 0 else MaskSchedule(
                    oracle.slots, uniform_ratios(oracle.slots, config.sparsity), redraw_every=config.redraw_every)
            else:
                masks, grasp_queries = _zo_ds_masks(oracle, x, y, config)
                extra_queries += grasp_queries
        else:
            learner = nn.Sequential(front.denoiser, front.encoder)
            decoder = front.decoder
            oracle = ModuleOracle(learner, F.cross_entropy, blackbox=lambda z: box(decoder(z)))
            estimator, masks = LatentCGE(decoder, box, mu=config.mu), None
        ledger_cb = _Ledger(stab_dir / "ledger.json", box, extra_queries, prior_images)
        trainer = Trainer(oracle, estimator, adam(learner.parameters()), mask_schedule=masks,
                          callbacks=[ledger_cb], out_dir=stab_dir, seed=config.seed, progress=progress)
        _fit_noisy(trainer, x, y, config, config.epochs, salt=2)
        stab_queries = oracle.queries

    front.eval()
    torch.save(front.state_dict(), out / "front.pt")
    acc = _clean_accuracy(front, blackbox, data.x_test[:500], data.y_test[:500])
    info = {
        "method": config.method,
        "config": asdict(config),
        "image_shape": list(data.image_shape),
        "front_parameters": sum(p.numel() for p in front.parameters()),
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "queries": int(stab_queries + extra_queries),
        "blackbox_images": int(prior_images + box.rows),
        "seconds": round(time.perf_counter() - started, 2),
        "pipeline_clean_accuracy": acc,
    }
    (out / "run.json").write_text(json.dumps(info, indent=2))
    return info


class _Ledger(Callback):
    """Writes what the stab stage has spent (besides the checkpointed oracle queries) each epoch."""

    def __init__(self, path: Path, box: CountingBlackBox, extra_queries: int, prior_images: int):
        self.path, self.box, self.extra, self.prior = path, box, extra_queries, prior_images

    def on_epoch_end(self, trainer, metrics):
        self.path.write_text(json.dumps({"extra_queries": self.extra,
                                         "blackbox_images": self.prior + self.box.rows}))


def _zo_ds_masks(oracle: ModuleOracle, x, y, config: DefenseConfig) -> tuple[MaskSchedule | None, int]:
    """Layer-wise ratios (ZO-GraSP on 25 noisy images per class, or uniform) -> a MaskSchedule."""
    if config.sparsity == 0:
        return None, 0
    if config.pruner == "uniform":
        ratios = uniform_ratios(oracle.slots, config.sparsity)
        return MaskSchedule(oracle.slots, ratios, redraw_every=config.redraw_every), 0
    per_class = max(1, min(25, int(torch.bincount(y).min())))
    xs, ys = class_balanced_sample(x, y, per_class, generator=torch.Generator().manual_seed(config.seed))
    before = oracle.queries
    oracle.bind(_noisy(xs, config.sigma, config.seed, -1), ys)
    scores = zo_grasp_scores(oracle, oracle.theta(), RGE(q=192, mu=config.mu),
                             generator=torch.Generator().manual_seed(config.seed))
    spent = oracle.queries - before
    oracle.queries = before  # reported separately from the training queries
    ratios = ratios_from_scores(oracle.slots, scores, config.sparsity)
    return MaskSchedule(oracle.slots, ratios, redraw_every=config.redraw_every), spent


def _clean_accuracy(front: nn.Module, blackbox: Callable, x, y) -> float:
    with torch.no_grad():
        pred = as_tensor(blackbox(front(x))).argmax(1)
    return float((pred == y).float().mean())


# ----------------------------------------------------------------------------------------------
# Certification
# ----------------------------------------------------------------------------------------------


def smoothed_pipeline(front: nn.Module | None, blackbox: Callable) -> LocalBlackBox:
    """The base classifier that is smoothed: ``x [N, C, H, W] -> f(front(x)) [N, classes]``.

    ``front`` runs locally (white box, no grad); ``f`` is only queried. ``None`` = no denoiser.
    """

    def pipeline(x: torch.Tensor):
        with torch.no_grad():
            return blackbox(front(x) if front is not None else x)

    return LocalBlackBox(pipeline)


def certify_front(front: nn.Module | None, blackbox: Callable, dataset: str, sigma: float, *, n0: int = 100,
                  n: int = 100_000, alpha: float = 0.001, max_examples: int = 100, batch_size: int = 1000,
                  seed: int = 0, log_path: str | Path | None = None, progress: bool = True,
                  resume: bool = False, settings: dict | None = None) -> CertifyRun:
    """CERTIFY the first ``max_examples`` test images of ``dataset`` through ``f(front(x + noise))``.

    Returns the :class:`CertifyRun` (rows, queries = noisy samples, samples/s); the per-example
    log goes to ``log_path``. ``resume`` and ``settings`` are :func:`certify_dataset`'s.
    """
    data = load_dataset(dataset)
    xs, ys = data.x_test[:max_examples], data.y_test[:max_examples]
    smooth = Smooth(smoothed_pipeline(front, blackbox), data.classes, sigma)
    return certify_dataset(smooth, xs, ys, n0, n, alpha, batch_size, seed=seed, log_path=log_path,
                           progress=progress, resume=resume, settings={"dataset": dataset, **(settings or {})})
