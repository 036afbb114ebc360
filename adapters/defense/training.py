"""Train a denoiser in front of a black-box classifier: FO-DS, ZO-DS, ZO-AE-DS.

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
  (the engine's ``ChainRule`` estimator on a ``ZOAEOracle``, :mod:`.oracles`).

:func:`train_defense` reads as the run goes: ``_start`` checks everything before anything on
disk changes, ``_pretrain`` runs the white-box stages (autoencoder, MSE), ``_train_stability``
the stability objective through the black box, and ``_finish`` saves the front and ``run.json``.
Every stage is one run of the engine's ``Trainer`` in its own folder (``ae/``, ``mse/``,
``stab/``), with fresh noise every epoch. :func:`train_folder` is ``defense train``: it opens
the data, the classifier and the executor from their specs first.

Costs are reported as oracle ``queries`` (the engine's unit: one loss at one theta) and as
``blackbox_images`` (rows sent to the black box), which compares methods with different thetas.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, RGE, Autograd, MaskSchedule, ModuleOracle, TensorBatches, Trainer
from deepzero_oracle.blackbox import as_tensor
from deepzero_oracle.common.datasets import DATASETS, data_fingerprint, load_data
from deepzero_oracle.estimators import ChainRule
from deepzero_oracle.parallel import InlineExecutor, check_shippable, open_executor, parallelize
from deepzero_oracle.pruning import (class_balanced_sample, load_ratios, ratios_from_scores, save_ratios,
                                     uniform_ratios, zo_grasp_scores)
from deepzero_oracle.runs import RunFolder, save_torch

from deepzero_oracle.adapters.defense.classifier import open_classifier
from deepzero_oracle.adapters.defense.fronts import build_front, save_front
from deepzero_oracle.adapters.defense.oracles import CountingBlackBox, StabilityLedger, ZOAEOracle

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "STAGES",
    "DefenseConfig",
    "NoisyBatches",
    "clean_labels",
    "open_images",
    "train_defense",
    "train_folder",
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
            folder (``deepzero_oracle.common.datasets.load_data``).
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


def open_images(value: str):
    """``(Dataset, name)`` for a ``--data`` value (``load_data``): ``name`` is the value for an
    example dataset, else the data's absolute path, so a later command finds the files again."""
    data = load_data(value)
    return data, value if value in DATASETS else data.name


def train_folder(config: DefenseConfig, out: str | Path, *, classifier_path: str | None = None,
                 timeout: float = 60.0, executor: str = "inline", restart: bool = False,
                 progress: bool | None = None, max_queries: int | None = None) -> dict:
    """``defense train``: open ``config.dataset`` (a ``--data`` value), ``config.classifier`` (a
    ``--classifier`` spec, checked against the images) and ``executor`` (an ``open_executor``
    spec), then :func:`train_defense` into ``out``. Everything is checked before anything on disk
    changes. ``classifier_path`` and ``timeout`` are ``open_classifier``'s.

    Returns:
        ``train_defense``'s dict (``run.json``, or the ``stopped_reason`` of a budget stop).
    """
    data, dataset = open_images(config.dataset)
    config = dataclasses.replace(config, dataset=dataset).check()
    with open_executor(executor) as pool, \
            open_classifier(config.classifier, data, path=classifier_path, timeout=timeout,
                            progress=progress) as classifier:
        if config.method == "fo-ds" and classifier.whitebox is None:
            raise ValueError(f"fo-ds back-propagates through the classifier, but {config.classifier} can only be "
                             "queried; fo-ds needs --classifier local or MODULE:ATTR naming a torch nn.Module "
                             "(zo-ds and zo-ae-ds work on any classifier)")
        return train_defense(config, classifier, out, data=data, whitebox=classifier.whitebox,
                             classifier_info=classifier.describe(), restart=restart, progress=progress,
                             executor=pool, max_queries=max_queries)


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
            and ``classes`` (a ``Dataset`` of ``deepzero_oracle.common.datasets``); None loads
            ``config.dataset``.
        whitebox: the same classifier as an ``nn.Module``; required by ``fo-ds`` only.
        classifier_info: what is known about the classifier (``Classifier.describe()``), kept
            in ``run.json``.
        restart: start over: once everything is checked, remove what an earlier run wrote in
            ``out`` (the stage folders, ``run.json``, ``front.pt``) and nothing else.
        executor: where zo-ds's stability queries run (``open_executor``; None: here). The front
            is the same on every executor; the black box then answers on the executor's workers,
            whose copies count the images they send (``blackbox_images`` as inline).
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
    run = _start(config, blackbox, out, data=data, whitebox=whitebox, restart=restart, progress=progress,
                 executor=executor)
    _pretrain(run)
    stopped = _train_stability(run, whitebox, executor, max_queries)
    return stopped if stopped is not None else _finish(run, classifier_info)


@dataclass
class _Run:
    """What the stages of one defense run share, and what they have spent so far."""

    config: DefenseConfig
    out: Path
    data: object  # the Dataset
    x: torch.Tensor  # the training images [N, C, H, W]
    settings: dict  # what a resumed stage must match
    box: CountingBlackBox  # the classifier, counting what it is sent
    front: nn.Module
    progress: bool | None
    started: float
    queries: int = 0  # the stability stage's oracle queries plus ZO-GraSP's and the clean labels'
    images: int = 0  # black-box images spent outside ``box``'s sight (earlier runs)

    @property
    def denoiser(self) -> nn.Module:
        """The denoiser inside the front (the front itself but for zo-ae-ds)."""
        return self.front.denoiser if self.config.method == "zo-ae-ds" else self.front

    def fit(self, name: str, oracle, estimator, learner: nn.Module, targets, epochs: int, salt: int, *,
            noise: bool = True, masks=None, callbacks=(), budget: int | None = None) -> Trainer:
        """One stage: a Trainer in ``out/name`` over the (noisy, unless not ``noise``) images."""
        config = self.config
        trainer = Trainer(oracle, estimator, torch.optim.Adam(learner.parameters(), lr=config.lr),
                          mask_schedule=masks, callbacks=callbacks, out_dir=self.out / name,
                          settings={"stage": name, **self.settings}, seed=config.seed, progress=self.progress,
                          desc=f"{config.method} {name}")
        batches = (NoisyBatches(self.x, targets, sigma=config.sigma, seed=config.seed + 7919 * salt,
                                batch_size=config.batch_size) if noise
                   else TensorBatches(self.x, targets, batch_size=config.batch_size, seed=config.seed))
        trainer.fit(batches, epochs=epochs, max_queries=budget)
        return trainer


def _start(config: DefenseConfig, blackbox: Callable, out, *, data, whitebox, restart: bool, progress,
           executor) -> _Run:
    """Check the config, the executor, the classifier and every stage's checkpoint against this
    run's settings, then (with ``restart``) remove what an earlier run wrote in ``out``."""
    config.check()
    fanned = executor is not None and not isinstance(executor, InlineExecutor)
    if fanned and config.method != "zo-ds":
        raise ValueError(f"an executor fans out zo-ds's queries; {config.method} "
                         + ("back-propagates through the classifier" if config.method == "fo-ds" else
                            "queries its latent in this process") + ": train it without --executor")
    if fanned:
        check_shippable(blackbox, executor)  # the workers query the classifier: refuse one that cannot travel, now
    if config.method == "fo-ds" and whitebox is None:
        raise ValueError("fo-ds is the white-box reference: it back-propagates through the classifier, so it "
                         "needs it as a torch module (--classifier local, or MODULE:ATTR naming an nn.Module)")
    data = load_data(config.dataset) if data is None else data
    x = data.x_train if config.max_train is None else data.x_train[: config.max_train]
    front = build_front(config, tuple(x.shape[1:]))  # refuses what the front cannot take (odd sides for zo-ae-ds)
    # epochs may grow on resume (the recipe has no schedule tied to them); all else must match.
    # The data count by content, not by where the files are.
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("epochs", "pretrain_epochs", "ae_epochs", "dataset")}
    settings["data_sha256"] = data_fingerprint(data)
    out = Path(out)
    if restart:  # the stages' folders and the run's results; nothing else in out
        RunFolder(out, files=(*STAGES, "run.json", "front.pt")).restart()
    for name in STAGES:  # before anything changes on disk, as the Trainer would refuse them later
        RunFolder(out / name, {"stage": name, **settings}).check_checkpoint()
    out.mkdir(parents=True, exist_ok=True)
    return _Run(config, out, data, x, settings, CountingBlackBox(blackbox), front, progress,
                started=time.perf_counter())


def _pretrain(run: _Run) -> None:
    """The white-box stages, by autograd: ZO-AE-DS's autoencoder on clean images (its decoder is
    then frozen), and the MSE objective on noisy images (it needs no classifier, so every method
    pre-trains the same way)."""
    config, front = run.config, run.front
    if config.method == "zo-ae-ds":
        ae = nn.Sequential(front.encoder, front.decoder)
        run.fit("ae", ModuleOracle(ae, F.mse_loss), Autograd(), ae, run.x, config.ae_epochs, 0, noise=False)
        for p in front.decoder.parameters():
            p.requires_grad_(False)
        front.decoder.eval()
    mse_epochs = config.epochs if config.objective == "mse" else (
        (config.pretrain_epochs if config.pretrain_epochs is not None else config.epochs)
        if config.objective == "mse+stab" else 0)
    if not mse_epochs:
        return
    if config.method == "zo-ae-ds":
        learner = nn.Sequential(front.denoiser, front.encoder)
        oracle = ModuleOracle(learner, F.mse_loss, blackbox=front.decoder)
    else:
        learner = run.denoiser
        oracle = ModuleOracle(learner, F.mse_loss)
    run.fit("mse", oracle, Autograd(), learner, run.x, mse_epochs, 1)


def _train_stability(run: _Run, whitebox: nn.Module | None, executor, max_queries: int | None) -> dict | None:
    """The stability objective against the black box's clean labels, by the method's estimator;
    adds what it spent to ``run``. Returns None, or when the query budget stopped it the dict
    ``train_defense`` returns (and no front is left in ``out``)."""
    config = run.config
    if config.objective not in ("stab", "mse+stab") or not config.epochs:
        return None
    stab_dir = run.out / "stab"
    # A resumed run reuses the targets, the ratios and the ledger of what was spent before,
    # so totals do not depend on interruptions.
    resuming = (stab_dir / "checkpoint.pt").exists() and (stab_dir / "ledger.json").exists()
    if resuming:
        ledger = json.loads((stab_dir / "ledger.json").read_text())
        extra_queries, prior_images = int(ledger["extra_queries"]), int(ledger["blackbox_images"])
        y = torch.load(stab_dir / "labels.pt", weights_only=True)
    else:
        y = clean_labels(run.box, run.x)
        extra_queries, prior_images = len(run.x), 0  # one query per clean image for the targets
        save_torch(y, stab_dir / "labels.pt")
    learner, oracle, estimator, masks, grasp_queries = _stability_oracle(run, y, whitebox, resuming)
    extra_queries += grasp_queries
    ledger_cb = StabilityLedger(stab_dir / "ledger.json", run.box, extra_queries, prior_images)
    budget = None if max_queries is None else max(0, int(max_queries) - extra_queries)
    trainer = run.fit("stab", parallelize(oracle, executor), estimator, learner, y, config.epochs, 2, masks=masks,
                      callbacks=[ledger_cb], budget=budget)
    if trainer.stopped_reason is not None:
        for name in ("run.json", "front.pt"):  # an unfinished front is never certified by mistake
            (run.out / name).unlink(missing_ok=True)
        reason = (f"query budget of {max_queries} reached" if "query budget" in trainer.stopped_reason
                  else trainer.stopped_reason)
        return {"method": config.method, "stopped_reason": reason, "step": trainer.step,
                "queries": int(trainer.oracle.queries + extra_queries)}
    run.queries = trainer.oracle.queries + extra_queries
    run.images = ledger_cb.prior
    return None


def _stability_oracle(run: _Run, y: torch.Tensor, whitebox: nn.Module | None, resuming: bool):
    """``(learner, oracle, estimator, mask schedule or None, ZO-GraSP queries)`` of the
    stability stage for the run's method."""
    config, masks, grasp_queries = run.config, None, 0
    if config.method == "fo-ds":
        learner = run.denoiser
        oracle, estimator = ModuleOracle(learner, F.cross_entropy, blackbox=whitebox), Autograd()
    elif config.method == "zo-ds":
        learner = run.denoiser
        oracle, estimator = ModuleOracle(learner, F.cross_entropy, blackbox=run.box), CGE(mu=config.mu)
        masks, grasp_queries = _zo_ds_masks(oracle, run.x, y, config, run.out / "stab" / "ratios.json",
                                            reuse=resuming)
    else:
        learner = nn.Sequential(run.front.denoiser, run.front.encoder)
        oracle = ZOAEOracle(learner, run.front.decoder, run.box)
        estimator = ChainRule(CGE(mu=config.mu, difference="central"))
    return learner, oracle, estimator, masks, grasp_queries


def _finish(run: _Run, classifier_info: dict | None) -> dict:
    """Save the trained front and ``run.json`` (what was spent, the clean accuracy through the
    front); returns what ``run.json`` holds."""
    config, front = run.config, run.front
    front.eval()
    acc = _clean_accuracy(front, run.box.blackbox, run.data.x_test[:500], run.data.y_test[:500])
    info = {
        "method": config.method,
        "config": asdict(config),
        "image_shape": list(run.x.shape[1:]),
        "front_parameters": sum(p.numel() for p in front.parameters()),
        "denoiser_parameters": sum(p.numel() for p in run.denoiser.parameters()),
        "queries": int(run.queries),
        "blackbox_images": int(run.images + run.box.rows),
        "seconds": round(time.perf_counter() - run.started, 2),
        "pipeline_clean_accuracy": acc,
        "data_sha256": run.settings["data_sha256"],
        "classifier": classifier_info or {"spec": config.classifier},
        "stopped_reason": None,
    }
    save_front(front, run.out, info)
    return info


def clean_labels(blackbox: Callable, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """``argmax f(x)`` for ``x [N, ...]`` in batches: the stability objective's targets ``[N]``."""
    out = [as_tensor(blackbox(x[i : i + batch])).argmax(1) for i in range(0, len(x), batch)]
    return torch.cat(out).long()


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
