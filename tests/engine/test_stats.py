"""The statistics helpers on cases with known answers."""

import math

import numpy as np
import pytest

from deepzero_oracle.stats import mean_interval, paired_sign_test, paired_wilcoxon, proportion_interval


def test_mean_interval_matches_the_t_formula_and_covers_the_true_mean():
    values = [1.0, 2.0, 3.0, 4.0]
    ci = mean_interval(values)
    # mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446...
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert ci["mean"] == 2.5 and ci["low"] == pytest.approx(2.5 - half) and ci["high"] == pytest.approx(2.5 + half)
    # coverage: 95% intervals over many normal samples contain the true mean about 95% of the time
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        ci = mean_interval(rng.normal(3.0, 2.0, 10))
        covered += ci["low"] <= 3.0 <= ci["high"]
    assert 0.93 < covered / 2000 < 0.97
    assert mean_interval([5.0])["low"] == 5.0 and math.isnan(mean_interval([])["mean"])


def test_proportion_interval_is_clopper_pearson():
    ci = proportion_interval(0, 10)
    assert ci["rate"] == 0 and ci["low"] == 0 and ci["high"] == pytest.approx(1 - 0.025 ** (1 / 10))
    ci = proportion_interval(10, 10)
    assert ci["high"] == 1 and ci["low"] == pytest.approx(0.025 ** (1 / 10))
    with pytest.raises(ValueError, match="successes"):
        proportion_interval(11, 10)


def test_paired_wilcoxon_known_cases():
    a = np.arange(1.0, 11.0)
    b = a + 1.0  # a lower on every item: the exact two-sided p for n = 10 is 2 / 2**10
    res = paired_wilcoxon(a, b)
    assert res["a_lower"] == 10 and res["b_lower"] == 0 and res["p"] == pytest.approx(2 / 2**10)
    assert res["mean_difference"] == -1.0
    same = paired_wilcoxon(a, a)
    assert same["p"] == 1.0 and same["ties"] == 10
    rng = np.random.default_rng(1)
    noise = paired_wilcoxon(rng.normal(size=40), rng.normal(size=40))
    assert noise["p"] > 0.05  # no difference in distribution (this seed)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_wilcoxon([1.0], [1.0, 2.0])


def test_paired_sign_test_counts_discordant_pairs():
    a = [True] * 12 + [False] * 3 + [True] * 5
    b = [False] * 12 + [True] * 3 + [True] * 5
    res = paired_sign_test(a, b)
    assert (res["a_only"], res["b_only"], res["both"], res["neither"]) == (12, 3, 5, 0)
    # two-sided binomial test of 12 successes in 15 at 1/2
    from scipy.stats import binomtest

    assert res["p"] == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert paired_sign_test([True, False], [True, False])["p"] == 1.0
