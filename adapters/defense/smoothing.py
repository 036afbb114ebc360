"""Randomized smoothing against a black-box classifier (Cohen, Rosenfeld & Kolter, 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``, is
estimated by Monte Carlo. ``f`` is a *black box*: it is only ever queried with noisy inputs, one
noisy sample = one query, and its outputs are reduced to labels (argmax of scores, or labels
as returned). ``Smooth`` follows the paper's pseudo-code:

- ``CERTIFY``: ``n0`` samples pick the top class ``cA``; ``n`` fresh samples count ``nA``; the
  one-sided Clopper-Pearson bound ``pA_lower = Beta.ppf(alpha; nA, n - nA + 1)``; abstain if
  ``pA_lower < 0.5``, else the certified L2 radius is ``sigma * Phi^-1(pA_lower)``.
- ``PREDICT``: ``n`` samples, top two counts ``c1, c2``; abstain unless the two-sided binomial test
  of ``c1`` out of ``c1 + c2`` against ``p = 0.5`` has p-value ``<= alpha``.

With probability at least ``1 - alpha`` over the noise, a returned class equals ``g(x)`` (and for
CERTIFY, ``g`` is constant on the L2 ball of the returned radius).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm

from deepzero_oracle.blackbox import BlackBoxError, LocalBlackBox, as_tensor

__all__ = [
    "ABSTAIN",
    "Certificate",
    "Smooth",
    "clopper_pearson_lower",
    "max_certified_radius",
    "min_certify_n",
    "min_predict_n",
    "make_generator",
]

#: Returned as the class when the smoothed classifier abstains (radius 0.0 for CERTIFY).
ABSTAIN = -1


class Certificate(NamedTuple):
    """CERTIFY's answer; unpacks like Cohen's ``(prediction, radius)`` tuple.

    ``prediction`` is a class index or :data:`ABSTAIN`; ``radius`` is the certified L2 radius
    (``0.0`` when abstaining).
    """

    prediction: int
    radius: float


# ----------------------------------------------------------------------------------------------
# Statistics (pure functions, also used by the CLI to validate arguments before any query)
# ----------------------------------------------------------------------------------------------


def clopper_pearson_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion.

    Args:
        n_a: successes, ``0 <= n_a <= n``.
        n: trials, ``n >= 1``.
        alpha: failure probability in ``(0, 1)``.
    Returns:
        ``Beta.ppf(alpha; n_a, n - n_a + 1)`` as a float; ``0.0`` when ``n_a == 0`` (the Beta
        distribution is undefined there and the bound is trivially 0).
    """
    if not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n, got n_a={n_a}, n={n}")
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def max_certified_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can return with ``n`` samples: all ``n`` agree.

    Returns ``sigma * Phi^-1(alpha ** (1 / n))`` (e.g. 1.50 sigma at n = 100, 3.81 sigma at
    n = 100,000 for alpha = 0.001), or ``0.0`` if even that bound is below 0.5 (CERTIFY can only
    abstain).
    """
    p = clopper_pearson_lower(n, n, alpha)
    return float(sigma * norm.ppf(p)) if p >= 0.5 else 0.0


def min_certify_n(alpha: float) -> int:
    """Smallest ``n`` for which CERTIFY can certify at all (all ``n`` samples agreeing).

    CERTIFY abstains iff ``pA_lower < 0.5``, and the best case ``nA = n`` gives
    ``pA_lower = alpha ** (1/n)``, so ``n >= log(alpha) / log(0.5)``: 10 for alpha = 0.001.
    Returns the exact integer as judged by the same ``beta.ppf`` CERTIFY uses.
    """
    check_alpha(alpha)
    m = max(1, math.ceil(math.log(alpha) / math.log(0.5)))
    # The closed form can be off by one at float boundaries; settle it with the real test.
    while m > 1 and clopper_pearson_lower(m - 1, m - 1, alpha) >= 0.5:
        m -= 1
    while clopper_pearson_lower(m, m, alpha) < 0.5:
        m += 1
    return m


def min_predict_n(alpha: float) -> int:
    """Smallest ``n`` for which PREDICT can return a class (``c1 = n``, ``c2 = 0``).

    The two-sided binomial test then has p-value ``2 * 0.5 ** n``, so ``n >= 1 + log2(1/alpha)``:
    11 for alpha = 0.001. Returns the exact integer as judged by ``scipy.stats.binomtest``.
    """
    check_alpha(alpha)
    m = max(1, math.ceil(1 + math.log2(1 / alpha)))
    while m > 1 and binomtest(m - 1, m - 1, 0.5).pvalue <= alpha:
        m -= 1
    while binomtest(m, m, 0.5).pvalue > alpha:
        m += 1
    return m


def make_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """Normalise a seed argument: an ``int`` becomes a fresh seeded CPU ``torch.Generator``.

    A ``torch.Generator`` is returned as is (its state advances with use); ``None`` means torch's
    global RNG (not reproducible unless the caller seeds it).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Argument checks: raise early, say what to do
# ----------------------------------------------------------------------------------------------


def check_alpha(alpha) -> float:
    """``alpha`` as a float in (0, 1), else a ValueError saying what it is for."""
    if not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha is a failure probability and must be in (0, 1), e.g. 0.001; got {alpha!r}")
    return float(alpha)


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a float like 1e5 is refused), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} (write 100000, not 1e5)")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_certify_n(n: int, alpha: float) -> None:
    """Refuse an ``n`` with which CERTIFY could only abstain at this ``alpha``."""
    need = min_certify_n(alpha)
    if n < need:
        best = clopper_pearson_lower(n, n, alpha)
        raise ValueError(
            f"n={n} is too small for alpha={alpha}: even if all {n} noisy samples agree, the "
            f"Clopper-Pearson lower bound on pA is {best:.4f} < 0.5, so CERTIFY could only abstain. "
            f"Use n >= {need} for alpha={alpha} (Cohen et al. use n=100000), or a larger alpha."
        )


def check_predict_n(n: int, alpha: float) -> None:
    """Refuse an ``n`` with which PREDICT could only abstain at this ``alpha``."""
    need = min_predict_n(alpha)
    if n < need:
        best = binomtest(n, n, 0.5).pvalue
        raise ValueError(
            f"n={n} is too small for alpha={alpha}: even if all {n} noisy samples agree, the "
            f"binomial test p-value is {best:.4g} > alpha, so PREDICT could only abstain. "
            f"Use n >= {need} for alpha={alpha}, or a larger alpha."
        )


# ----------------------------------------------------------------------------------------------
# The smoothed classifier
# ----------------------------------------------------------------------------------------------


class Smooth:
    """A smoothed classifier ``g`` around a black-box base classifier ``f``.

    Args:
        classifier: the black box ``f(inputs [N, *x.shape]) -> [N, num_classes]`` scores or
            logits (argmax taken) or ``[N]`` integer labels; torch tensors or NumPy arrays.
            A ``LocalBlackBox`` (or anything following the
            black-box contract and returning one row per input) is used as is; any other
            callable is wrapped in one.
        num_classes: number of classes, ``>= 2``.
        sigma: standard deviation of the Gaussian noise, ``> 0`` (in input units).
        numpy: when wrapping a plain callable, pass it ``numpy.ndarray`` inputs instead of
            ``torch.Tensor`` (ignored for an existing ``LocalBlackBox``, which has its own flag).

    Attributes:
        queries: noisy samples sent to the black box so far (one sample = one query).
        calls: batched calls made to the black box so far.
    """

    #: Alias of the module constant, for code written against Cohen's ``Smooth.ABSTAIN``.
    ABSTAIN = ABSTAIN

    def __init__(self, classifier: Callable, num_classes: int, sigma: float, *, numpy: bool = False):
        if not callable(classifier):
            raise TypeError(f"classifier must be callable (a black box), got {type(classifier).__name__}")
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(
                f"sigma is the noise standard deviation and must be a finite number > 0 "
                f"(usual values 0.12, 0.25, 0.5, 1.0), got {sigma!r}"
            )
        self.sigma = float(sigma)
        # Wrap once so that numpy/torch conversion and the one-row-per-input check live in one place.
        self.blackbox = classifier if isinstance(classifier, LocalBlackBox) else LocalBlackBox(classifier, numpy=numpy)
        self.queries = 0
        self.calls = 0

    def reset_queries(self) -> int:
        """Zero the query and call counters; returns the query count before the reset."""
        spent, self.queries, self.calls = self.queries, 0, 0
        return spent

    # -- Cohen et al.'s pseudo-code ----------------------------------------------------------

    def certify(
        self,
        x,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        generator: torch.Generator | int | None = None,
    ) -> Certificate:
        """CERTIFY: the smoothed prediction at ``x`` and an L2 radius it is certified within.

        Args:
            x: one input shaped like a single row of the black box's input, e.g. ``[C, H, W]``
                (no batch dimension); tensor or ndarray. Noise is drawn in ``x``'s floating dtype
                (integer inputs become float32), so pass float32 to a float32 model.
            n0: noisy samples used to select the candidate class ``cA``.
            n: fresh noisy samples used to lower-bound ``pA``; must be ``>= min_certify_n(alpha)``.
            alpha: failure probability (0.001 in the paper).
            batch_size: noisy samples per black-box call.
            generator: ``torch.Generator``, an int seed, or ``None`` (global RNG). The result is
                deterministic for a given seed, ``batch_size`` and black box.
        Returns:
            ``Certificate`` ``(prediction, radius)``; ``(ABSTAIN, 0.0)`` when abstaining.
            Exactly ``n0 + n`` queries are spent.
        """
        n0 = check_count("n0", n0)
        n = check_count("n", n)
        alpha = check_alpha(alpha)
        batch_size = check_count("batch_size", batch_size)
        check_certify_n(n, alpha)
        gen = make_generator(generator)
        x = self._as_input(x)

        # Selection and estimation use independent samples, so the bound on cA is not biased by
        # the choice of cA.
        counts0 = self._sample_counts(x, n0, batch_size, gen)
        c_a = int(np.argmax(counts0))  # ties -> lowest class index
        counts = self._sample_counts(x, n, batch_size, gen)
        n_a = int(counts[c_a])
        p_a_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_a_lower < 0.5:
            return Certificate(ABSTAIN, 0.0)
        return Certificate(c_a, float(self.sigma * norm.ppf(p_a_lower)))

    def predict(
        self,
        x,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        generator: torch.Generator | int | None = None,
    ) -> int:
        """PREDICT: the smoothed classifier's class at ``x``, or :data:`ABSTAIN`.

        Args:
            x: one input without batch dimension, e.g. ``[C, H, W]``.
            n: noisy samples; must be ``>= min_predict_n(alpha)``.
            alpha: failure probability; a returned class is wrong w.p. at most ``alpha``.
            batch_size: noisy samples per black-box call.
            generator: ``torch.Generator``, an int seed, or ``None`` (global RNG).
        Returns:
            the class index (int), or ``ABSTAIN``. Exactly ``n`` queries are spent.
        """
        n = check_count("n", n)
        alpha = check_alpha(alpha)
        batch_size = check_count("batch_size", batch_size)
        check_predict_n(n, alpha)
        gen = make_generator(generator)
        x = self._as_input(x)

        counts = self._sample_counts(x, n, batch_size, gen)
        order = np.argsort(-counts, kind="stable")  # stable: ties broken by lower class index
        c1, c2 = int(counts[order[0]]), int(counts[order[1]])
        if binomtest(c1, c1 + c2, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])

    # -- sampling ------------------------------------------------------------------------------

    def _as_input(self, x) -> torch.Tensor:
        x = as_tensor(x).detach()
        if not x.is_floating_point():
            x = x.to(torch.float32)  # noise is continuous; integer pixels would truncate it
        return x

    def _sample_counts(self, x: torch.Tensor, num: int, batch_size: int, gen) -> np.ndarray:
        """Query ``f`` on ``num`` noisy copies of ``x`` in batches; returns class counts ``[num_classes]``."""
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            # Noise drawn straight into the batch buffer, then shifted by x: one allocation per batch.
            batch = torch.randn((b, *x.shape), generator=gen, dtype=x.dtype, device=x.device)
            batch.mul_(self.sigma).add_(x)
            labels = self._labels(self.blackbox(batch), b)
            self.queries += b
            self.calls += 1
            counts += torch.bincount(labels, minlength=self.num_classes)
            remaining -= b
        return counts.numpy()

    def _labels(self, out, rows: int) -> torch.Tensor:
        """Reduce a black-box answer to ``[rows]`` int64 labels in ``[0, num_classes)``."""
        out = as_tensor(out).cpu()
        if out.ndim == 2:
            if out.shape[1] != self.num_classes:
                raise BlackBoxError(
                    f"black box returned scores shaped {tuple(out.shape)} but num_classes={self.num_classes}; "
                    f"pass the classifier's real number of classes"
                )
            if out.is_floating_point() and torch.isnan(out).any():
                raise BlackBoxError("black box returned NaN scores; argmax over them is meaningless")
            labels = out.argmax(1)
        elif out.ndim == 1:
            if out.is_floating_point():
                if not torch.equal(out, out.round()):
                    raise BlackBoxError(
                        "black box returned a 1-D float array that is not integer labels; return "
                        "[N] integer labels or [N, num_classes] scores"
                    )
            elif out.dtype == torch.bool:
                raise BlackBoxError("black box returned booleans; return integer labels or scores")
            labels = out.long()
        else:
            raise BlackBoxError(
                f"black box returned shape {tuple(out.shape)}; expected [N, num_classes] scores or [N] labels"
            )
        if labels.shape[0] != rows:
            raise BlackBoxError(f"black box returned {labels.shape[0]} rows for {rows} inputs")
        if rows and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise BlackBoxError(
                f"black box returned labels outside [0, {self.num_classes}): "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        return labels
