"""The oracles of the black-box defense: how a loss through the classifier is counted and queried.

- :class:`CountingBlackBox` counts the images (rows) sent to the classifier.
- ZO-AE-DS takes its ZO estimate in an autoencoder's latent: :class:`ZOAEOracle` is the oracle
  the Trainer sees (theta = the white-box front ``x -> z``), and for each theta and batch hands
  the engine's ``ChainRule`` estimator a :class:`LatentOracle` (theta = the latents ``z``, whose
  coordinate losses send one decoded image each), then carries the latent gradient back through
  the front by autograd.
- :class:`StabilityLedger` keeps what the stability stage spent outside the Trainer's
  checkpointed queries.

ZO-DS needs no oracle of its own: it is the engine's ``ModuleOracle`` with the counted black
box (see :mod:`.training`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import Callback, LearnerOracle, Oracle
from deepzero_oracle.blackbox import as_tensor
from deepzero_oracle.runs import write_json
from deepzero_oracle.theta import unflatten

__all__ = ["CountingBlackBox", "LatentOracle", "StabilityLedger", "ZOAEOracle"]


class CountingBlackBox:
    """Wraps a black box and counts the images (rows) and calls sent to it; only forwards calls.

    ``box(x [N, ...]) -> [N, ...]`` exactly as the wrapped black box answers. Its ``counters()``
    make copies on an executor's workers count too: ``ParallelOracle`` adds their counts here.
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

    def counters(self) -> dict[str, int]:
        """``{"blackbox_images": rows sent, "blackbox_calls": calls}`` so far."""
        return {"blackbox_images": self.rows, "blackbox_calls": self.calls}

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add what copies of this box counted on an executor's workers."""
        self.rows += int(counts.get("blackbox_images", 0))
        self.calls += int(counts.get("blackbox_calls", 0))


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


class StabilityLedger(Callback):
    """Writes what the stab stage has spent (besides the checkpointed oracle queries) each epoch.

    ``box`` counts every image, those sent by an executor's workers included (its ``counters()``),
    so the images spent are ``prior`` (earlier runs) plus ``box.rows``.
    """

    def __init__(self, path: Path, box: CountingBlackBox, extra_queries: int, prior_images: int):
        self.path, self.box, self.extra, self.prior = path, box, extra_queries, prior_images
        self._queries = None

    def on_step_end(self, trainer, metrics):
        self._queries = metrics["queries"]

    def on_epoch_end(self, trainer, metrics):
        self._queries = metrics["queries"]
        write_json(self.path, {"extra_queries": self.extra, "blackbox_images": self.prior + self.box.rows})

    def state_dict(self) -> dict:
        """What was spent up to the checkpoint (a stop between evaluations resumes from there)."""
        return {"queries": self._queries, "blackbox_images": self.prior + self.box.rows}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint's totals (they replace ``ledger.json``'s)."""
        self._queries = state["queries"]
        self.prior = int(state["blackbox_images"]) - self.box.rows
