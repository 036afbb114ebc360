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
  ``Dec`` -> black box. Plain CGE with central differences on ``LatentOracle`` estimates
  ``dL/dz`` (2 x latent queries per image), autograd carries it back through ``E`` and ``D``
  (the engine's ``ChainRule`` estimator on a ``ZOAEOracle``).

Every stage (autoencoder pre-training, MSE pre-training, the stability objective) is one run
of the engine's ``Trainer`` in its own folder, with fresh noise every epoch.

Costs are reported as oracle ``queries`` (the engine's unit: one loss at one theta) and as
``blackbox_images`` (rows sent to the black box), which compares methods with different thetas.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import (CGE, RGE, Autograd, Callback, LearnerOracle, LocalBlackBox, MaskSchedule, ModuleOracle,
                            Oracle, TensorBatches, Trainer)
from deepzero_oracle.atomic import save_torch, write_json
from deepzero_oracle.blackbox import as_tensor
from deepzero_oracle.estimators.chain import ChainRule
from deepzero_oracle.parallel import InlineExecutor, parallelize
from deepzero_oracle.parallel.payloads import to_bytes
from deepzero_oracle.pruning import (class_balanced_sample, load_ratios, ratios_from_scores, save_ratios,
                                     uniform_ratios, zo_grasp_scores)
from deepzero_oracle.theta import unflatten
from deepzero_oracle.train import check_settings

from deepzero_oracle.adapters.defense.certify_log import CertifyRun, certify_dataset
from deepzero_oracle.adapters.defense.denoiser import Decoder, Denoiser, Encoder, channels_last_runner, default_latent
from deepzero_oracle.adapters.defense.smoothing import Smooth

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "STAGES",
    "DefenseConfig",
    "CountingBlackBox",
    "LatentOracle",
    "ZOAEOracle",
    "build_front",
    "load_front",
    "clean_labels",
    "train_defense",
    "smoothed_pipeline",
    "certify_front",
]

METHODS = ("fo-ds", "zo-ds", "zo-ae-ds")
#: The Trainer runs of a defense run, one folder each under the run folder.
STAGES = ("ae", "mse", "stab")
OBJECTIVES = ("mse", "stab", "mse+stab")


@dataclass
class DefenseConfig:
    """Everything that defines a defense run (saved as ``run.json``).

    Attributes:
        method: one of :data:`METHODS`.
        dataset: the images: "digits", "mnist5k", or the absolute path of an ``.npz`` or an image
            folder (``deepzero_oracle.apps.datasets.load_data``).
        classifier: the ``--classifier`` spec the front is trained against (part of the run's
            settings: resuming against another classifier is refused).
        sigma: noise level of training and certification (0.12, 0.25, 0.5).
        objective: one of :data:`OBJECTIVES`.
        epochs: epochs of the main objective (``stab``; ``mse`` when the objective is ``mse``).
        pretrain_epochs: MSE epochs before ``stab`` for ``mse+stab`` (None: same as ``epochs``).
        ae_epochs: ZO-AE-DS autoencoder pre-training epochs (clean images, FO).
        batch_size, lr: Adam recipe shared by all methods.
        width, depth: denoiser size.
        latent: ZO-AE-DS latent size (None: ``default_latent``).
        sparsity: ZO-DS gradient sparsity (share of denoiser coordinates not queried per step).
        pruner: "zo-grasp" (DeepZero) or "uniform" layer-wise ratios for ZO-DS.
        redraw_every: epochs between ZO-DS mask redraws.
        mu: finite-difference step of CGE (both ZO methods).
        max_train: use only the first ``max_train`` training images (None: all).
        seed: seeds initialisation, noise, masks and shuffling.
    """

    method: str = "zo-ds"
    dataset: str = "digits"
    classifier: str = "local"
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
        **kw: as for ``Oracle`` (e.g. ``ledger=`` to count on another oracle's ledger).
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


class ZOAEOracle(LearnerOracle):
    """ZO-AE-DS: ``theta`` (the white-box front ``x -> z``: denoiser and encoder) ->
    ``mean_i CE(blackbox(decoder(z_i)), y_i)``, with the decoder frozen and the classifier
    only queried.

    Its gradient is found through the latent (the engine's ``ChainRule`` estimator):
    ``latent(theta)`` is a ``LatentOracle`` at ``z = learner(x)`` that counts on this
    oracle's ledger, and ``pullback(g_z)`` is ``(dz/dtheta)^T g_z`` by autograd through the
    learner only.

    Args:
        learner: the front ``[B, C, H, W] -> z [B, latent]``.
        decoder: frozen ``z [N, latent] -> images [N, C, H, W]``.
        blackbox: ``images -> scores [N, classes]``.
        per_sample_loss: ``(scores [N, C], y [N]) -> [N]``; default per-image cross-entropy.
    """

    def __init__(self, learner: nn.Module, decoder: Callable, blackbox: Callable,
                 per_sample_loss: Callable | None = None, **kw):
        super().__init__(learner, **kw)
        self.decoder, self.blackbox = decoder, blackbox
        self.per_sample_loss = per_sample_loss or (lambda s, y: F.cross_entropy(s, y, reduction="none"))
        self.x = self.y = None
        self._latent = None  # (theta, z with its autograd graph, LatentOracle), per theta and batch

    def bind(self, x: torch.Tensor, y: torch.Tensor) -> "ZOAEOracle":
        """Use images ``x [B, C, H, W]`` with targets ``y [B]``."""
        if len(x) != len(y):
            raise ValueError(f"x and y must hold the same number of rows, got {len(x)} and {len(y)}")
        self.x, self.y, self._latent = as_tensor(x), as_tensor(y), None
        return self

    def latent(self, theta: torch.Tensor) -> LatentOracle:
        """The latent oracle at ``z = learner(x; theta)`` (made once per theta and batch; the
        forward runs in the learner's mode and keeps its graph for ``pullback``)."""
        if self.x is None:
            raise RuntimeError("no data bound: call oracle.bind(x, y) before querying")
        if self._latent is None or not torch.equal(self._latent[0], theta):
            self.set_theta(theta)
            with torch.enable_grad():
                z = self.learner(self.x)
            oracle = LatentOracle(self.decoder, self.blackbox, self.per_sample_loss, z, self.y, ledger=self.ledger)
            self._latent = (theta.clone(), z, oracle)
        return self._latent[2]

    def pullback(self, g_z: torch.Tensor) -> torch.Tensor:
        """``(dz/dtheta)^T g_z`` for the last ``latent``: ``g_z [B * latent] -> [dim]``."""
        _, z, _ = self._latent
        grads = torch.autograd.grad(z, self.parameters(), grad_outputs=g_z.reshape(z.shape).to(z.dtype),
                                    retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    def evaluate_losses(self, thetas):
        with torch.no_grad():
            out = []
            for theta in thetas:
                z = torch.func.functional_call(self.learner, unflatten(theta, self.slots), (self.x,))
                scores = as_tensor(self.blackbox(self.decoder(z))).to(z.dtype)
                out.append(self.per_sample_loss(scores, self.y).mean())
            return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Front-ends
# ----------------------------------------------------------------------------------------------


def build_front(config: DefenseConfig, image_shape: tuple[int, ...]) -> nn.Module:
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


class NoisyBatches(TensorBatches):
    """Minibatches ``(x + delta, target)`` of ``x [N, C, H, W]`` and ``targets [N, ...]``, with
    ``delta ~ N(0, sigma^2 I)`` drawn afresh for the whole set every epoch from ``(seed, epoch)``
    (so a resumed run sees the same noise)."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, *, sigma: float, seed: int, batch_size: int):
        super().__init__(x, targets, torch.arange(len(x)), batch_size=batch_size, seed=seed,
                         transform=self._noise)
        self.sigma, self.noise_seed, self._cached = sigma, seed, (None, None)

    def _noise(self, batch, epoch):
        xb, tb, idx = batch
        if self._cached[0] != epoch:
            x = self.tensors[0]
            self._cached = (epoch, _noisy(x, self.sigma, self.noise_seed, epoch) - x)
        return xb + self._cached[1][idx], tb


def train_defense(config: DefenseConfig, blackbox: Callable, out: str | Path, *, data=None,
                  whitebox: nn.Module | None = None, classifier_info: dict | None = None,
                  restart: bool = False, progress: bool | None = None, executor=None,
                  max_queries: int | None = None) -> dict:
    """Train the front for ``config.method`` against ``blackbox`` and save it under ``out``.

    Args:
        config: the run's ``DefenseConfig``.
        blackbox: the classifier, only queried: ``images [N, C, H, W] -> scores [N, classes]``.
        out: run folder: ``front.pt``, ``run.json`` and one Trainer folder per stage (``ae/``,
            ``mse/``, ``stab/``); rerunning resumes every stage from its checkpoint (more epochs
            continue the same run; other settings are refused).
        data: images with ``x_train [N, C, H, W]`` in [0, 1], ``y_train``, ``x_test``, ``y_test``
            and ``classes`` (a ``Dataset`` of ``deepzero_oracle.apps.datasets``); None loads
            ``config.dataset``.
        whitebox: the same classifier as an ``nn.Module``; required by ``fo-ds`` only.
        classifier_info: what is known about the classifier (``Classifier.describe()``), kept
            in ``run.json``.
        restart: start over: once everything is checked, remove what an earlier run wrote in
            ``out`` (the stage folders, ``run.json``, ``front.pt``) and nothing else.
        executor: where zo-ds's stability queries run (``open_executor``; None: here). The front
            is the same on every executor; the black box then answers on the executor's workers,
            so ``blackbox_images`` counts the images of those queries (the bound batch per query)
            rather than the rows the workers actually sent.
        max_queries: the query budget (counted as ``queries`` below, over every run of ``out``):
            the stability stage stops before a step would exceed it, its checkpoint is kept and
            the returned dict's ``stopped_reason`` says so (then no ``front.pt`` / ``run.json`` is
            written: the front is unfinished). A later call with a larger budget continues.
    Returns:
        the ``run.json`` dict: config, ``queries`` (oracle queries of the black-box stage plus
        ZO-GraSP and clean-label queries), ``blackbox_images``, seconds, the accuracy of
        ``f(front(x))`` on the first 500 clean test images (``pipeline_clean_accuracy``), image
        shape, ``data_sha256`` (the data's identity, also part of the settings a resumed run
        must match) and ``classifier``.
    """
    from deepzero_oracle.apps.datasets import data_fingerprint, load_data

    config.check()
    fanned = executor is not None and not isinstance(executor, InlineExecutor)
    if fanned and config.method != "zo-ds":
        raise ValueError(f"an executor fans out zo-ds's queries; {config.method} "
                         + ("back-propagates through the classifier" if config.method == "fo-ds" else
                            "queries its latent in this process") + ": train it without --executor")
    if fanned:
        to_bytes(blackbox, executor)  # the workers query the classifier: refuse one that cannot travel, now
    if config.method == "fo-ds" and whitebox is None:
        raise ValueError("fo-ds is the white-box reference: it back-propagates through the classifier, so it "
                         "needs it as a torch module (--classifier local, or MODULE:ATTR naming an nn.Module)")
    data = load_data(config.dataset) if data is None else data
    data_sha256 = data_fingerprint(data)
    x = data.x_train if config.max_train is None else data.x_train[: config.max_train]
    image_shape = tuple(x.shape[1:])
    front = build_front(config, image_shape)  # refuses what the front cannot take (odd sides for zo-ae-ds)
    denoiser = front.denoiser if config.method == "zo-ae-ds" else front
    # epochs may grow on resume (the recipe has no schedule tied to them); all else must match.
    # The data count by content, not by where the files are.
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("epochs", "pretrain_epochs", "ae_epochs", "dataset")}
    settings["data_sha256"] = data_sha256
    out = Path(out)
    for name in STAGES:  # before anything changes on disk, as the Trainer would refuse them later
        checkpoint = out / name / "checkpoint.pt"
        if restart:
            shutil.rmtree(out / name, ignore_errors=True)
        elif checkpoint.exists():
            check_settings(torch.load(checkpoint, weights_only=True).get("settings"), {"stage": name, **settings},
                           out / name)
    if restart:
        for name in ("run.json", "front.pt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    box = CountingBlackBox(blackbox)
    started = time.perf_counter()

    def stage(name, oracle, estimator, learner, targets, epochs, salt, *, noise=True, masks=None, callbacks=(),
              budget=None):
        trainer = Trainer(oracle, estimator, torch.optim.Adam(learner.parameters(), lr=config.lr),
                          mask_schedule=masks, callbacks=callbacks, out_dir=out / name,
                          settings={"stage": name, **settings}, seed=config.seed, progress=progress,
                          desc=f"{config.method} {name}")
        batches = (NoisyBatches(x, targets, sigma=config.sigma, seed=config.seed + 7919 * salt,
                                batch_size=config.batch_size) if noise
                   else TensorBatches(x, targets, batch_size=config.batch_size, seed=config.seed))
        trainer.fit(batches, epochs=epochs, max_queries=budget)
        return trainer

    if config.method == "zo-ae-ds":
        # Autoencoder pre-training on clean images (white box, FO); the decoder is then frozen.
        ae = nn.Sequential(front.encoder, front.decoder)
        stage("ae", ModuleOracle(ae, F.mse_loss), Autograd(), ae, x, config.ae_epochs, 0, noise=False)
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
        stage("mse", oracle, Autograd(), learner, x, mse_epochs, 1)

    stab_queries, extra_queries, prior_images = 0, 0, 0
    if config.objective in ("stab", "mse+stab") and config.epochs:
        stab_dir = out / "stab"
        # A resumed run reuses the targets, the ratios and the ledger of what was spent before,
        # so totals do not depend on interruptions.
        resuming = (stab_dir / "checkpoint.pt").exists() and (stab_dir / "ledger.json").exists()
        if resuming:
            ledger = json.loads((stab_dir / "ledger.json").read_text())
            extra_queries, prior_images = int(ledger["extra_queries"]), int(ledger["blackbox_images"])
            y = torch.load(stab_dir / "labels.pt", weights_only=True)
        else:
            y = clean_labels(box, x)
            extra_queries += len(x)  # one query per clean image for the targets
            save_torch(y, stab_dir / "labels.pt")
        masks = None
        if config.method == "fo-ds":
            learner = denoiser
            oracle, estimator = ModuleOracle(learner, F.cross_entropy, blackbox=whitebox), Autograd()
        elif config.method == "zo-ds":
            learner = denoiser
            oracle, estimator = ModuleOracle(learner, F.cross_entropy, blackbox=box), CGE(mu=config.mu)
            masks, grasp_queries = _zo_ds_masks(oracle, x, y, config, stab_dir / "ratios.json", reuse=resuming)
            extra_queries += grasp_queries
        else:
            learner = nn.Sequential(front.denoiser, front.encoder)
            oracle = ZOAEOracle(learner, front.decoder, box)
            estimator = ChainRule(CGE(mu=config.mu, difference="central"))
        ledger_cb = _Ledger(stab_dir / "ledger.json", box, extra_queries, prior_images, fanned=fanned)
        budget = None if max_queries is None else max(0, int(max_queries) - extra_queries)
        trainer = stage("stab", parallelize(oracle, executor), estimator, learner, y, config.epochs, 2, masks=masks,
                        callbacks=[ledger_cb], budget=budget)
        if trainer.stopped_reason is not None:
            for name in ("run.json", "front.pt"):  # an unfinished front is never certified by mistake
                (out / name).unlink(missing_ok=True)
            reason = (f"query budget of {max_queries} reached" if "query budget" in trainer.stopped_reason
                      else trainer.stopped_reason)
            return {"method": config.method, "stopped_reason": reason, "step": trainer.step,
                    "queries": int(trainer.oracle.queries + extra_queries)}
        stab_queries, prior_images = trainer.oracle.queries, ledger_cb.prior + ledger_cb.fanned_images

    front.eval()
    save_torch(front.state_dict(), out / "front.pt")
    acc = _clean_accuracy(front, blackbox, data.x_test[:500], data.y_test[:500])
    info = {
        "method": config.method,
        "config": asdict(config),
        "image_shape": list(image_shape),
        "front_parameters": sum(p.numel() for p in front.parameters()),
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "queries": int(stab_queries + extra_queries),
        "blackbox_images": int(prior_images + box.rows),
        "seconds": round(time.perf_counter() - started, 2),
        "pipeline_clean_accuracy": acc,
        "data_sha256": data_sha256,
        "classifier": classifier_info or {"spec": config.classifier},
        "stopped_reason": None,
    }
    write_json(out / "run.json", info)
    return info


class _Ledger(Callback):
    """Writes what the stab stage has spent (besides the checkpointed oracle queries) each epoch.

    With ``fanned`` (queries answered on an executor's workers, out of ``box``'s sight) it counts
    the images of those queries instead: each query runs the bound batch through the black box.
    """

    def __init__(self, path: Path, box: CountingBlackBox, extra_queries: int, prior_images: int, *,
                 fanned: bool = False):
        self.path, self.box, self.extra, self.prior = path, box, extra_queries, prior_images
        self.fanned, self.fanned_images, self._queries = fanned, 0, None

    def on_step_end(self, trainer, metrics):
        if self.fanned:
            # a resumed stage starts from its checkpoint, taken at the last evaluation
            before = self._queries if self._queries is not None else trainer.history[-1]["queries"]
            self.fanned_images += (metrics["queries"] - before) * len(trainer.oracle.x)
        self._queries = metrics["queries"]

    def on_epoch_end(self, trainer, metrics):
        self._queries = metrics["queries"]
        write_json(self.path, {"extra_queries": self.extra,
                               "blackbox_images": self.prior + self.box.rows + self.fanned_images})

    def state_dict(self) -> dict:
        """What was spent up to the checkpoint (a stop between evaluations resumes from there)."""
        return {"queries": self._queries, "blackbox_images": self.prior + self.box.rows + self.fanned_images}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint's totals (they replace ``ledger.json``'s)."""
        self._queries = state["queries"]
        self.prior = int(state["blackbox_images"]) - self.box.rows - self.fanned_images


def _zo_ds_masks(oracle: ModuleOracle, x, y, config: DefenseConfig, path: Path,
                 reuse: bool) -> tuple[MaskSchedule | None, int]:
    """Layer-wise ratios (ZO-GraSP on 25 noisy images per class, or uniform) -> a MaskSchedule,
    and the queries ZO-GraSP spent; ratios are kept in ``path`` and, with ``reuse``, read back
    (their queries are already in the resumed ledger)."""
    if config.sparsity == 0:
        return None, 0
    if reuse and path.exists():
        ratios, spent = load_ratios(path), 0  # spent before, already in the ledger
    elif config.pruner == "uniform":
        ratios, spent = uniform_ratios(oracle.slots, config.sparsity), 0
    else:
        per_class = max(1, min(25, int(torch.bincount(y).min())))
        xs, ys = class_balanced_sample(x, y, per_class, generator=torch.Generator().manual_seed(config.seed))
        before = oracle.queries
        oracle.bind(_noisy(xs, config.sigma, config.seed, -1), ys)
        scores = zo_grasp_scores(oracle, oracle.theta(), RGE(q=192, mu=config.mu),
                                 generator=torch.Generator().manual_seed(config.seed))
        spent = oracle.queries - before
        oracle.queries = before  # reported separately from the training queries
        ratios = ratios_from_scores(oracle.slots, scores, config.sparsity)
    save_ratios(path, ratios, pruner=config.pruner, sparsity=config.sparsity)
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

    ``front`` runs locally (white box, no grad) on a channels-last copy, whose convolutions run
    faster on a CPU (equal values up to float rounding); ``f`` is only queried and
    gets ``front(x)`` in the usual layout. ``None`` = no denoiser.
    """
    run = channels_last_runner(front) if front is not None else None

    def pipeline(x: torch.Tensor):
        with torch.no_grad():
            return blackbox(run(x) if run is not None else x)

    return LocalBlackBox(pipeline)


def certify_front(front: nn.Module | None, blackbox: Callable, data, sigma: float, *, n0: int = 100,
                  n: int = 100_000, alpha: float = 0.001, max_examples: int = 100, batch_size: int = 1000,
                  seed: int = 0, log_path: str | Path | None = None, progress: bool | None = None,
                  resume: bool = False, settings: dict | None = None, executor=None) -> CertifyRun:
    """CERTIFY the first ``max_examples`` test images through ``f(front(x + noise))``.

    ``data``: images with ``x_test [N, C, H, W]``, ``y_test [N]`` and ``classes`` (a ``Dataset``),
    or a ``--data`` value. Returns the ``CertifyRun`` (rows, queries = noisy samples,
    samples/s); the per-example log goes to ``log_path``. ``resume``, ``settings`` and
    ``executor`` (where the images are certified, the same rows anywhere) are
    ``certify_dataset``'s; the data's fingerprint is always among the settings.
    """
    from deepzero_oracle.apps.datasets import data_fingerprint, load_data

    data = load_data(data) if isinstance(data, str) else data
    xs, ys = data.x_test[:max_examples], data.y_test[:max_examples]
    smooth = Smooth(smoothed_pipeline(front, blackbox), data.classes, sigma)
    return certify_dataset(smooth, xs, ys, n0, n, alpha, batch_size, seed=seed, log_path=log_path,
                           progress=progress, resume=resume, executor=executor,
                           settings={"data_sha256": data_fingerprint(data), **(settings or {})})
