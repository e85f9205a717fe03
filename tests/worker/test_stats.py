"""Aggregates and paired statistics, checked by hand and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from services.worker.stats import (
    CONSTANT_DIFFERENCE,
    aggregate,
    paired_bootstrap_ci,
    paired_compare,
    paired_permutation_p,
    wilson_interval,
)
from shared.metrics import METRICS, MetricInfo

UNBOUNDED = MetricInfo("m", "an unbounded metric", greater_is_better=True)


class TestAggregate:
    def test_mean_spread_and_a_bootstrap_interval_by_hand(self):
        agg = aggregate([1.0, 2.0, 3.0, 4.0, None], UNBOUNDED)
        assert agg["n"] == 4 and agg["mean"] == 2.5
        assert agg["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std of 1..4
        assert agg["stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
        assert agg["ci_method"] == "bootstrap"
        # Percentile bootstrap of the mean, the same seeded resamples as paired_bootstrap_ci.
        low, high = paired_bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]))
        assert (agg["ci_low"], agg["ci_high"]) == (low, high)
        assert 1.0 <= low < 2.5 < high <= 4.0
        assert aggregate([1.0, 2.0, 3.0, 4.0], UNBOUNDED) == aggregate([1.0, 2.0, 3.0, 4.0], UNBOUNDED)

    def test_no_rows_and_one_row(self):
        assert aggregate([], UNBOUNDED) == {"n": 0}
        assert aggregate([None], METRICS["exact_match"]) == {"n": 0}
        one = aggregate([7.0], UNBOUNDED)
        assert one == {
            "n": 1,
            "mean": 7.0,
            "std": 0.0,
            "stderr": 0.0,
            "ci_low": 7.0,
            "ci_high": 7.0,
            "ci_method": "bootstrap",
        }

    def test_wilson_interval_by_hand(self):
        # 14 of 16: p = 0.875, z = 1.959964; centre (p + z²/2n) / (1 + z²/n) = 0.802398,
        # half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.162626.
        low, high = wilson_interval(14, 16)
        assert low == pytest.approx(0.639772, abs=1e-6)
        assert high == pytest.approx(0.965023, abs=1e-6)
        # 0 of 16: [0, z² / (n + z²)], where a t-interval would be [0, 0].
        assert wilson_interval(0, 16) == (0.0, pytest.approx(3.841459 / (16 + 3.841459)))
        assert wilson_interval(16, 16) == (pytest.approx(1 - 3.841459 / (16 + 3.841459)), 1.0)
        # Exactly 0 and 1 at the ends, whatever rounding the closed form meets (0/12 gave 2.8e-17).
        for n in range(1, 301):
            assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0

    def test_binary_metric_gets_the_wilson_interval_inside_0_1(self):
        # contains_reference 14/16: the t-interval was [0.693, 1.06].
        agg = aggregate([1.0] * 14 + [0.0] * 2, METRICS["contains_reference"])
        assert agg["ci_method"] == "wilson"
        assert agg["mean"] == 0.875
        assert (agg["ci_low"], agg["ci_high"]) == (
            pytest.approx(0.639772, abs=1e-6),
            pytest.approx(0.965023, abs=1e-6),
        )
        assert agg["std"] == pytest.approx(math.sqrt(14 * 2 / 16 / 15))  # sample std of the 0/1 scores

    def test_bootstrap_stays_inside_0_1_for_a_metric_that_is_mostly_zero(self):
        # repetition on 16 rows, one of them 0.06: the t-interval was [-0.0042, 0.0115].
        scores = [0.0] * 15 + [0.06]
        agg = aggregate(scores, METRICS["repetition"])
        assert agg["ci_method"] == "bootstrap"
        assert agg["mean"] == pytest.approx(0.00375)
        assert agg["ci_low"] == 0.0  # at least 2.5% of the resamples miss the one non-zero row
        assert agg["mean"] < agg["ci_high"] <= 0.06
        assert agg["ci_high"] == pytest.approx(3 * 0.06 / 16)  # 97.5th percentile: that row drawn 3 times

    def test_interval_is_clipped_to_the_declared_range(self):
        # Each resampled mean lies within the observed values, but a declared bound still holds
        # where the data cannot reach it on their own, e.g. a one-sided floor of 0 for latency.
        bounded = MetricInfo(
            "b", "in [0, 1]", greater_is_better=True, scale="bounded", min_value=0.0, max_value=1.0
        )
        agg = aggregate([0.9, 1.0, 1.0, 1.0, 0.95], bounded)
        assert 0.9 <= agg["ci_low"] <= agg["mean"] <= agg["ci_high"] <= 1.0
        # A score past the declared range (a custom metric breaking its own declaration) cannot
        # drag the interval with it.
        agg = aggregate([0.5, 1.5, 1.5], bounded)
        assert agg["ci_high"] == 1.0 and agg["ci_low"] <= 1.0

    def test_binary_metric_with_other_values_falls_back_to_the_bootstrap(self):
        agg = aggregate([1.0, 0.5, 0.0, 1.0], METRICS["exact_match"])
        assert agg["ci_method"] == "bootstrap"
        assert 0.0 <= agg["ci_low"] <= agg["ci_high"] <= 1.0

    def test_constant_scores_give_a_point_interval(self):
        agg = aggregate([0.1] * 16, UNBOUNDED)
        assert agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
        assert agg["ci_high"] - agg["ci_low"] < 1e-15

    def test_every_metric_of_the_registry_keeps_its_interval_inside_its_range(self):
        rng = np.random.default_rng(0)
        for name, info in METRICS.items():
            low = info.min_value if info.min_value is not None else -10.0
            high = info.max_value if info.max_value is not None else 10.0
            if info.binary:
                scores = [float(v) for v in rng.integers(0, 2, size=30)]
            else:
                scores = [
                    float(v) for v in np.clip(rng.exponential(0.05, size=30) * (high - low) + low, low, high)
                ]
            agg = aggregate(scores, info)
            assert low <= agg["ci_low"] <= agg["mean"] <= agg["ci_high"] <= high, name


def test_exact_permutation_p_by_hand():
    # diffs (1, 1, 1): of the 8 sign patterns only +++ and --- reach |mean| = 1.
    assert paired_permutation_p(np.array([1.0, 1.0, 1.0])) == pytest.approx(2 / 8)
    assert paired_permutation_p(np.array([0.0, 0.0])) == 1.0
    # diffs (2, -1): |mean| 0.5 observed; patterns give |mean| 0.5, 1.5, 1.5, 0.5 -> 4 of 4 >= 0.5? no:
    # (+2,-1)=0.5, (-2,-1)=1.5, (+2,+1)=1.5, (-2,+1)=0.5 -> all four are >= 0.5.
    assert paired_permutation_p(np.array([2.0, -1.0])) == 1.0


def test_sampled_permutation_p_agrees_with_a_t_test_on_normal_data():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.3, 1.0, size=200)
    p_perm = paired_permutation_p(diffs, seed=0)
    p_t = scipy_stats.ttest_1samp(diffs, 0.0).pvalue
    assert p_perm == pytest.approx(p_t, abs=0.01)


def test_bootstrap_is_seeded():
    diffs = np.array([0.1, -0.2, 0.5, 0.3, 0.0, 0.4])
    assert paired_bootstrap_ci(diffs, seed=3) == paired_bootstrap_ci(diffs, seed=3)


def test_bootstrap_ci_covers_the_true_difference_near_the_nominal_rate():
    """Synthetic paired scores with a known mean difference of 0.2: the 95% interval should
    contain it in about 95% of repeated experiments (percentile bootstrap runs a bit narrow
    at n=40, so accept 90-98%)."""
    rng = np.random.default_rng(2024)
    true_diff, trials, covered = 0.2, 400, 0
    for trial in range(trials):
        base = rng.normal(0.0, 1.0, size=40)  # row difficulty, shared by both candidates
        a = base + true_diff + rng.normal(0.0, 0.5, size=40)
        b = base + rng.normal(0.0, 0.5, size=40)
        low, high = paired_bootstrap_ci(a - b, resamples=1000, seed=trial)
        covered += low <= true_diff <= high
    assert 0.90 <= covered / trials <= 0.98


def test_paired_compare_counts_and_verdict():
    a = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    b = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    result = paired_compare(
        metric="exact_match", a="A", b="B", scores_a=a, scores_b=b, greater_is_better=True
    )
    assert (result.wins, result.ties, result.losses) == (9, 3, 0)
    assert result.mean_diff == pytest.approx(0.75)
    assert result.p_value == pytest.approx(2 / 2**9)  # only the nine non-zero diffs can flip
    assert result.ci_low > 0 and result.better == "A"
    assert result.verdict.startswith("A better on exact_match: +0.75 [")


def test_paired_compare_respects_lower_is_better_and_skips_unscored_rows():
    result = paired_compare(
        metric="latency",
        a="fast",
        b="slow",
        scores_a=[0.1, 0.2, None, 0.1],
        scores_b=[0.5, 0.7, 0.4, None],
        greater_is_better=False,
    )
    assert result.n == 2
    assert (result.wins, result.losses) == (2, 0)  # lower latency wins
    assert result.better is None  # two rows cannot reach p < 0.05 (exact p = 0.5)
    assert result.verdict.startswith("no clear difference on latency")
    assert (
        paired_compare(metric="m", a="x", b="y", scores_a=[None], scores_b=[1.0], greater_is_better=True)
        is None
    )


class TestConstantDifference:
    def test_a_difference_that_is_the_same_on_every_row_gets_no_verdict(self):
        # Every row carried its batch's average latency: a constant offset the permutation test
        # calls significant (only the observed signs reach it among 10,000 sampled patterns).
        result = paired_compare(
            metric="latency",
            a="greedy",
            b="sampled",
            scores_a=[0.0312] * 16,
            scores_b=[0.046] * 16,
            greater_is_better=False,
        )
        assert result.p_value == pytest.approx(1 / 10001, abs=1e-4) and result.ci_low == result.ci_high
        assert result.better is None
        assert result.note == CONSTANT_DIFFERENCE
        assert result.verdict == (
            "no verdict on latency: the difference is the same on every row "
            "(-0.0148, greedy − sampled, n=16), so the metric does not vary by row"
        )
        assert (result.wins, result.ties, result.losses) == (16, 0, 0)

    def test_a_binary_metric_won_on_every_row_is_a_verdict(self):
        result = paired_compare(
            metric="exact_match",
            a="A",
            b="B",
            scores_a=[1.0] * 8,
            scores_b=[0.0] * 8,
            greater_is_better=True,
            binary=True,
        )
        assert result.note is None
        assert result.better == "A"
        assert result.p_value == pytest.approx(2 / 2**8)
        assert result.verdict.startswith("A better on exact_match: +1 [+1, +1]")

    def test_the_same_binary_rows_without_the_binary_flag_get_no_verdict(self):
        result = paired_compare(
            metric="m", a="A", b="B", scores_a=[1.0] * 8, scores_b=[0.0] * 8, greater_is_better=True
        )
        assert result.better is None and result.note == CONSTANT_DIFFERENCE

    def test_equal_scores_on_every_row_are_a_judged_tie(self):
        result = paired_compare(
            metric="output_tokens",
            a="A",
            b="B",
            scores_a=[32.0] * 10,
            scores_b=[32.0] * 10,
            greater_is_better=False,
        )
        assert result.note is None and result.better is None
        assert result.p_value == 1.0 and result.ties == 10
        assert result.verdict.startswith("no clear difference on output_tokens")

    def test_differences_that_vary_by_row_are_judged(self):
        result = paired_compare(
            metric="latency",
            a="A",
            b="B",
            scores_a=[0.10, 0.12, 0.11, 0.13, 0.10, 0.12, 0.11, 0.10],
            scores_b=[0.20, 0.25, 0.22, 0.21, 0.24, 0.20, 0.23, 0.22],
            greater_is_better=False,
        )
        assert result.note is None and result.better == "A"
