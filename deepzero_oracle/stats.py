"""How sure a comparison is: intervals over test items and paired tests between methods.

Every report that compares methods uses these (``scipy.stats`` underneath):

- ``mean_interval(values)``: the mean over test items (simulations, images) with a t interval;
- ``proportion_interval(k, n)``: a rate (certified accuracy) with an exact Clopper-Pearson interval;
- ``paired_wilcoxon(a, b)``: Wilcoxon signed-rank test on per-item paired values (SOL's
  per-simulation MAE), with wins / losses / ties;
- ``paired_sign_test(a, b)``: exact McNemar test on per-item binary outcomes (an image certified
  at radius r by one method and not the other), i.e. a binomial test on the discordant pairs.

All return plain dicts of floats and ints, ready for JSON.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of ``values [n]`` with a two-sided Student-t interval.

    Returns ``{"mean", "low", "high", "n", "sd"}``; with one value the interval is the point
    (``sd`` 0), with none every field but ``n`` is NaN.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "sd": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1, "sd": 0.0}
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> dict:
    """A rate ``successes / n`` with its exact (Clopper-Pearson) two-sided interval.

    Returns ``{"rate", "low", "high", "k", "n"}``.
    """
    k, n = int(successes), int(n)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {k} of {n}")
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return {"rate": k / n, "low": float(ci.low), "high": float(ci.high), "k": k, "n": n}


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of ``a - b`` over paired items (two-sided).

    Returns ``{"p", "statistic", "mean_difference", "a_lower", "b_lower", "ties", "n"}``:
    ``a_lower`` counts items where ``a < b`` (for errors: where a wins). With every difference
    zero the test is undefined and ``p`` is 1.
    """
    a, b = _paired(a, b)
    d = a - b
    out = {"mean_difference": float(d.mean()) if d.size else math.nan, "a_lower": int((d < 0).sum()),
           "b_lower": int((d > 0).sum()), "ties": int((d == 0).sum()), "n": int(d.size)}
    if not (d != 0).any():
        return {"p": 1.0, "statistic": 0.0, **out}
    res = sps.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return {"p": float(res.pvalue), "statistic": float(res.statistic), **out}


def paired_sign_test(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired binary outcomes: a two-sided binomial test of the
    discordant pairs (items where exactly one of ``a``, ``b`` holds) against 1/2.

    Returns ``{"p", "a_only", "b_only", "both", "neither", "n"}``.
    """
    a, b = (np.asarray(v, dtype=bool).reshape(-1) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {a.size} and {b.size}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(sps.binomtest(a_only, discordant, 0.5).pvalue)
    return {"p": p, "a_only": a_only, "b_only": b_only, "both": int((a & b).sum()),
            "neither": int((~a & ~b).sum()), "n": int(a.size)}


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    return a, b


__all__ = ["mean_interval", "paired_sign_test", "paired_wilcoxon", "proportion_interval"]
