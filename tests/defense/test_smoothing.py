"""Randomized-smoothing certification against known cases (Cohen et al.'s CERTIFY and PREDICT)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm

from deepzero_oracle.adapters.defense.certification import certified_accuracy, certify_dataset, read_log
from deepzero_oracle.adapters.defense.report import certified_accuracy_markdown, plot_certified_curve
from deepzero_oracle.adapters.defense.smoothing import (
    ABSTAIN,
    Smooth,
    clopper_pearson_lower,
    max_certified_radius,
    min_certify_n,
    min_predict_n,
)
from deepzero_oracle.blackbox import BlackBoxError, LocalBlackBox
from deepzero_oracle.errors import SettingsMismatch

ALPHA = 0.001
SIGMA = 0.25
SHAPE = (1, 4, 4)  # [C, H, W]; tiny so that thousands of samples cost nothing


class Recorder:
    """A black box that keeps every label it answered and every input row it saw (count only)."""

    def __init__(self, label_fn, num_classes, scores=True):
        self.label_fn, self.num_classes, self.scores = label_fn, num_classes, scores
        self.labels: list[torch.Tensor] = []
        self.rows = 0
        self.first_batch = None

    def __call__(self, inputs: torch.Tensor):
        assert isinstance(inputs, torch.Tensor) and inputs.shape[1:] == SHAPE
        if self.first_batch is None:
            self.first_batch = inputs.clone()
        self.rows += inputs.shape[0]
        labels = self.label_fn(inputs)
        self.labels.append(labels)
        if not self.scores:
            return labels
        return torch.nn.functional.one_hot(labels, self.num_classes).float() * 3.0 - 1.0

    def all_labels(self) -> torch.Tensor:
        return torch.cat(self.labels)


def constant(k):
    return lambda inp: torch.full((inp.shape[0],), k, dtype=torch.long)


def sign_of_pixel0(inp):
    """Class 1 iff the first pixel is positive: on x with pixel0 = m, P(class 1) = Phi(m / sigma)."""
    return (inp[:, 0, 0, 0] > 0).long()


def x_with_pixel0(m):
    x = torch.zeros(SHAPE)
    x[0, 0, 0] = m
    return x


# ---------------------------------------------------------------------------------------------
# Known cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 1000, 100_000])
def test_constant_classifier_certifies_exact_radius(n):
    box = Recorder(constant(3), num_classes=5)
    smooth = Smooth(box, num_classes=5, sigma=SIGMA)
    pred, radius = smooth.certify(torch.randn(SHAPE), n0=100, n=n, alpha=ALPHA, batch_size=4096, generator=0)
    p_lower = beta.ppf(ALPHA, n, 1)
    assert p_lower == pytest.approx(ALPHA ** (1 / n), rel=1e-12)
    assert pred == 3
    assert radius == pytest.approx(SIGMA * norm.ppf(p_lower), rel=1e-12, abs=0)
    assert radius == pytest.approx(max_certified_radius(SIGMA, n, ALPHA), rel=1e-12)
    if n == 100:  # Cohen et al.'s bound: 1.50 sigma at n = 100
        assert radius / SIGMA == pytest.approx(1.50, abs=0.005)
    if n == 100_000:  # ... and 3.81 sigma at 100k
        assert radius / SIGMA == pytest.approx(3.81, abs=0.005)


def test_radius_follows_clopper_pearson_on_the_black_boxs_own_counts():
    # pA = Phi(2) ~ 0.977 on this x; the true smoothed radius of this linear classifier is exactly 2 sigma.
    m = 2 * SIGMA
    box = Recorder(sign_of_pixel0, num_classes=2)
    smooth = Smooth(box, num_classes=2, sigma=SIGMA)
    n0, n = 50, 2000
    pred, radius = smooth.certify(x_with_pixel0(m), n0, n, ALPHA, batch_size=300, generator=11)
    labels = box.all_labels()
    assert labels.shape[0] == n0 + n
    n_a = int((labels[n0:] == 1).sum())  # estimation samples are the last n the box answered
    assert pred == 1
    assert radius == pytest.approx(SIGMA * norm.ppf(beta.ppf(ALPHA, n_a, n - n_a + 1)), rel=1e-12)
    # Conservative (lower bound holds w.p. 1 - alpha) but not wildly so at n = 2000.
    assert 0.85 * m < radius <= m


@pytest.mark.parametrize("seed", range(5))
def test_half_right_classifier_abstains(seed):
    # x has pixel0 = 0, so the noise's sign at pixel0 is a fair coin: right (label 1) half the time.
    box = Recorder(sign_of_pixel0, num_classes=3)
    smooth = Smooth(box, num_classes=3, sigma=SIGMA)
    assert smooth.certify(x_with_pixel0(0.0), 100, 2000, ALPHA, 500, generator=seed) == (ABSTAIN, 0.0)
    counts = torch.bincount(box.all_labels()[100:], minlength=3)
    assert 800 < counts[1] < 1200  # the coin really was fair, so abstaining is the right answer


@pytest.mark.parametrize("seed", range(5))
def test_predict_abstains_on_fifty_fifty_and_returns_constant_class(seed):
    coin = Smooth(Recorder(sign_of_pixel0, 2), num_classes=2, sigma=SIGMA)
    assert coin.predict(x_with_pixel0(0.0), n=1000, alpha=ALPHA, batch_size=256, generator=seed) == ABSTAIN
    const = Smooth(Recorder(constant(4), 6), num_classes=6, sigma=SIGMA)
    assert const.predict(torch.rand(SHAPE), n=100, alpha=ALPHA, batch_size=256, generator=seed) == 4
    # A clear but not unanimous majority is also returned.
    clear = Smooth(Recorder(sign_of_pixel0, 2), num_classes=2, sigma=SIGMA)
    assert clear.predict(x_with_pixel0(-SIGMA), n=1000, alpha=ALPHA, generator=seed) == 0


# ---------------------------------------------------------------------------------------------
# n against alpha, and argument validation
# ---------------------------------------------------------------------------------------------


def test_minimum_n_for_alpha():
    assert min_certify_n(0.001) == 10  # 0.001 ** (1/10) = 0.501 >= 0.5; 0.001 ** (1/9) = 0.464
    assert min_predict_n(0.001) == 11  # binomtest(10, 10).pvalue = 0.00195 > 0.001
    for alpha in [0.5, 0.25, 0.1, 0.05, 0.01, 0.001, 1e-6]:
        m = min_certify_n(alpha)
        assert clopper_pearson_lower(m, m, alpha) >= 0.5
        assert m == 1 or clopper_pearson_lower(m - 1, m - 1, alpha) < 0.5


def test_n_too_small_for_alpha_raises_and_says_the_minimum():
    smooth = Smooth(Recorder(constant(0), 2), num_classes=2, sigma=SIGMA)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"n >= 10 for alpha=0.001"):
        smooth.certify(x, n0=100, n=9, alpha=ALPHA, generator=0)
    with pytest.raises(ValueError, match=r"n >= 11 for alpha=0.001"):
        smooth.predict(x, n=10, alpha=ALPHA, generator=0)
    assert smooth.queries == 0  # refused before spending anything
    pred, radius = smooth.certify(x, n0=100, n=10, alpha=ALPHA, generator=0)  # the minimum works
    assert pred == 0 and 0 < radius < 0.01 * SIGMA
    assert smooth.predict(x, n=11, alpha=ALPHA, generator=0) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-0.25), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(num_classes=1), "num_classes"),
    ],
)
def test_constructor_validation(kwargs, match):
    args = dict(classifier=Recorder(constant(0), 2), num_classes=2, sigma=SIGMA) | kwargs
    with pytest.raises(ValueError, match=match):
        Smooth(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n0=0), "n0"),
        (dict(n=1e5), "not 1e5"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_certify_validation(kwargs, match):
    smooth = Smooth(Recorder(constant(0), 2), num_classes=2, sigma=SIGMA)
    args = dict(x=torch.zeros(SHAPE), n0=10, n=100, alpha=ALPHA, batch_size=10) | kwargs
    with pytest.raises(ValueError, match=match):
        smooth.certify(**args)


def test_bad_black_box_answers_are_reported():
    x = torch.zeros(SHAPE)
    wrong_width = Smooth(lambda inp: torch.zeros(inp.shape[0], 7), num_classes=10, sigma=SIGMA)
    with pytest.raises(BlackBoxError, match="num_classes=10"):
        wrong_width.certify(x, 10, 100, ALPHA, generator=0)
    out_of_range = Smooth(lambda inp: torch.full((inp.shape[0],), 5), num_classes=3, sigma=SIGMA)
    with pytest.raises(BlackBoxError, match="outside"):
        out_of_range.certify(x, 10, 100, ALPHA, generator=0)
    too_few_rows = Smooth(lambda inp: torch.zeros(1, 3), num_classes=3, sigma=SIGMA)
    with pytest.raises(BlackBoxError, match="one row per input"):
        too_few_rows.certify(x, 10, 100, ALPHA, generator=0)


# ---------------------------------------------------------------------------------------------
# Seeds, query counting, numpy black boxes
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_different_seed_different_noise():
    def run(generator):
        box = Recorder(sign_of_pixel0, 2)
        out = Smooth(box, 2, SIGMA).certify(x_with_pixel0(0.7 * SIGMA), 100, 3000, ALPHA, 256, generator)
        return out, box

    (a, box_a), (b, box_b) = run(123), run(123)
    c, box_c = run(torch.Generator().manual_seed(123))
    d, box_d = run(124)
    assert a == b == c
    assert a.prediction == 1 and a.radius > 0
    assert torch.equal(box_a.all_labels(), box_b.all_labels())
    assert torch.equal(box_a.first_batch, box_c.first_batch)
    assert not torch.equal(box_a.first_batch, box_d.first_batch)


def test_query_count_is_exact():
    box = Recorder(sign_of_pixel0, 2)
    smooth = Smooth(box, 2, SIGMA)
    smooth.certify(x_with_pixel0(SIGMA), n0=7, n=1003, alpha=ALPHA, batch_size=100, generator=0)
    assert smooth.queries == box.rows == 7 + 1003
    assert smooth.calls == 1 + 11  # ceil(7/100) + ceil(1003/100): the last batch is partial
    smooth.predict(x_with_pixel0(SIGMA), n=555, alpha=ALPHA, batch_size=100, generator=0)
    assert smooth.queries == box.rows == 7 + 1003 + 555
    assert smooth.reset_queries() == 1565 and smooth.queries == 0


@pytest.mark.parametrize("labels_only", [True, False])
def test_numpy_black_box_matches_torch_black_box(labels_only):
    seen = []

    def numpy_box(arr):
        assert isinstance(arr, np.ndarray)
        seen.append(arr.shape[0])
        lab = (arr[:, 0, 0, 0] > 0).astype(np.int64)
        return lab if labels_only else np.eye(2, dtype=np.float32)[lab]

    x = x_with_pixel0(0.5 * SIGMA)
    np_smooth = Smooth(numpy_box, 2, SIGMA, numpy=True)
    t_smooth = Smooth(Recorder(sign_of_pixel0, 2, scores=not labels_only), 2, SIGMA)
    got = np_smooth.certify(x.numpy(), 100, 2000, ALPHA, 512, generator=5)  # numpy x too
    want = t_smooth.certify(x, 100, 2000, ALPHA, 512, generator=5)
    assert got == want and got.prediction == 1
    assert sum(seen) == np_smooth.queries == 2100
    assert np_smooth.predict(x, 2000, ALPHA, 512, 6) == t_smooth.predict(x, 2000, ALPHA, 512, 6) == 1
    # An existing LocalBlackBox is used as is, with its own numpy flag.
    wrapped = LocalBlackBox(numpy_box, numpy=True)
    assert Smooth(wrapped, 2, SIGMA).certify(x, 100, 2000, ALPHA, 512, generator=5) == want


# ---------------------------------------------------------------------------------------------
# The per-example log and what is computed from it
# ---------------------------------------------------------------------------------------------


def test_hand_written_log_gives_the_expected_table(tmp_path):
    log = tmp_path / "hand.tsv"
    log.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "0\t1\t1\t0.3\t1\t0.5\n"
        "1\t2\t2\t0.5\t1\t0:00:01.250000\n"  # Cohen's own time format reads too
        "2\t0\t-1\t0.0\t0\t0.5\n"  # abstained
        "3\t0\t1\t0.9\t0\t0.5\n"  # wrong, however robust
    )
    rows = read_log(log)
    assert rows[1]["time"] == 1.25 and rows[2]["predict"] == ABSTAIN
    # r = 0.5 counts the row with radius exactly 0.5 (radius >= r).
    assert certified_accuracy(log, [0, 0.25, 0.5, 0.75]) == {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 0.75: 0.0}
    table = certified_accuracy_markdown({"hand": log}, [0, 0.25, 0.5, 0.75], queries={"hand": 1234})
    assert "| hand | 4 | 50.00 | 50.00 | 25.00 | 0.00 | 1,234 |" in table


def test_log_round_trips_into_the_certified_accuracy_table(tmp_path):
    # Examples with pixel0 = m: smoothed class is 1 if m > 0, 0 if m < 0; radius ~ |m|; m = 0 abstains.
    ms = [2 * SIGMA, SIGMA, 0.3 * SIGMA, 0.0, -SIGMA, -2 * SIGMA]
    labels = [1, 1, 0, 1, 0, 1]  # the third and last are certified but wrong
    xs = torch.stack([x_with_pixel0(m) for m in ms])
    smooth = Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA)
    path = tmp_path / "runs" / "zero.tsv"
    run = certify_dataset(smooth, xs, labels, n0=50, n=2000, alpha=ALPHA, batch_size=1000,
                          seed=3, log_path=path, progress=False)

    assert run.queries == smooth.queries == len(ms) * 2050
    assert run.samples_per_second > 0
    assert [r["predict"] for r in run.rows] == [1, 1, 1, ABSTAIN, 0, 0]
    assert [r["correct"] for r in run.rows] == [1, 1, 0, 0, 1, 0]
    assert path.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"

    back = read_log(path)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(back) == strip(run.rows)  # radii round-trip exactly
    assert [r["time"] for r in back] == pytest.approx([r["time"] for r in run.rows], abs=1e-4)

    radii = [0.0, 0.1, 0.25, 0.4, 0.5, 0.75]
    from_file = certified_accuracy(path, radii)
    assert from_file == certified_accuracy(run.rows, radii) == run.certified_accuracy(radii)
    # Recompute by hand from the rows: mean(correct and radius >= r).
    for r in radii:
        expect = sum(1 for row in run.rows if row["correct"] and row["radius"] >= r) / len(ms)
        assert from_file[r] == expect
    # Exactly at the largest correct radius that row still counts; just past it, none does.
    r0 = run.rows[0]["radius"]
    past = math.nextafter(r0, math.inf)
    assert certified_accuracy(path, [r0, past]) == certified_accuracy(run.rows, [r0, past]) == {r0: 1 / 6, past: 0.0}

    table = certified_accuracy_markdown({"none": path, "same": run}, radii)
    lines = table.strip().splitlines()
    assert lines[2].split("|")[3:-1] == lines[3].split("|")[3:-1]
    assert f"{100 * from_file[0.0]:.2f}" in lines[2]

    png = plot_certified_curve({"none": path, "same": run.rows}, tmp_path / "curve.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = run.summary(radii)
    assert summary["queries"] == run.queries and summary["certified_accuracy"]["0.25"] == from_file[0.25]


def test_certify_dataset_is_reproducible_per_example_and_validates_first(tmp_path):
    xs = torch.stack([x_with_pixel0(m) for m in [0.6 * SIGMA, -0.4 * SIGMA, 0.2 * SIGMA]])
    labels = [1, 0, 1]
    kw = dict(n0=20, n=500, alpha=0.01, batch_size=128, seed=9, progress=False)
    full = certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, **kw)
    again = certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, **kw)
    # Only the last example, certified on its own under its dataset index, gives the same row.
    alone = certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs[2:], labels[2:],
                            indices=[2], **kw)
    key = lambda r: (r["idx"], r["predict"], r["radius"], r["correct"])  # noqa: E731
    assert [key(r) for r in full.rows] == [key(r) for r in again.rows]
    assert key(alone.rows[0]) == key(full.rows[2])

    bad = tmp_path / "never.tsv"
    with pytest.raises(ValueError, match="n >= 10"):
        certify_dataset(Smooth(Recorder(constant(0), 2), 2, SIGMA), xs, labels, 100, 5, ALPHA, log_path=bad)
    assert not bad.exists()
    with pytest.raises(ValueError, match="rows"):
        certify_dataset(Smooth(Recorder(constant(0), 2), 2, SIGMA), xs, labels[:2], 10, 100, ALPHA)


def test_resumed_certification_equals_an_uninterrupted_one(tmp_path):
    xs = torch.stack([x_with_pixel0(m) for m in [0.6 * SIGMA, -0.4 * SIGMA, 0.2 * SIGMA, -0.9 * SIGMA]])
    labels = [1, 0, 1, 0]
    kw = dict(n0=20, n=500, alpha=0.01, batch_size=128, seed=3, progress=False)
    key = lambda r: (r["idx"], r["predict"], r["radius"], r["correct"])  # noqa: E731
    full = certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels,
                           log_path=tmp_path / "full.tsv", **kw)
    log = tmp_path / "cut.tsv"
    certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, log_path=log, **kw)
    # Interrupt after two rows, in the middle of writing the third.
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][:4])

    box = Recorder(sign_of_pixel0, 2)
    resumed = certify_dataset(Smooth(box, 2, SIGMA), xs, labels, log_path=log, resume=True, **kw)
    assert [key(r) for r in resumed.rows] == [key(r) for r in full.rows]
    assert [key(r) for r in read_log(log)] == [key(r) for r in full.rows]
    assert box.rows == 2 * (20 + 500)  # only the two missing examples were queried
    assert resumed.queries == full.queries == 4 * 520
    assert resumed.certified_accuracy() == full.certified_accuracy()

    with pytest.raises(SettingsMismatch, match="n: 500 in the run, 600 now"):
        certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, log_path=log, resume=True,
                        **dict(kw, n=600))
    certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs[:1], labels[:1], log_path=tmp_path / "m.tsv",
                    settings={"model": "a"}, **kw)
    with pytest.raises(SettingsMismatch, match="model: 'a' in the run, 'b' now"):
        certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, log_path=tmp_path / "m.tsv",
                        settings={"model": "b"}, resume=True, **kw)
    with pytest.raises(ValueError, match="not the first"):
        certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs[1:], labels[1:], indices=[1, 2, 3],
                        log_path=log, resume=True, **kw)
    (tmp_path / "full.settings.json").unlink()
    with pytest.raises(ValueError, match="settings are unknown"):
        certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, log_path=tmp_path / "full.tsv",
                        resume=True, **kw)
    # Without a log there is nothing to resume; with a missing log, resume starts afresh.
    with pytest.raises(ValueError, match="needs the log_path"):
        certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels, resume=True, **kw)
    fresh = certify_dataset(Smooth(Recorder(sign_of_pixel0, 2), 2, SIGMA), xs, labels,
                            log_path=tmp_path / "new.tsv", resume=True, **kw)
    assert [key(r) for r in fresh.rows] == [key(r) for r in full.rows]


def test_read_log_rejects_other_files(tmp_path):
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_log(other)
    assert math.isclose(certified_accuracy([{"correct": 1, "radius": 0.2}], 0.2)[0.2], 1.0)
