"""Aggregates and paired statistics, checked by hand and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from services.worker.stats import aggregate, paired_bootstrap_ci, paired_compare, paired_permutation_p


def test_aggregate_by_hand():
    agg = aggregate([1.0, 2.0, 3.0, 4.0, None])
    assert agg["n"] == 4 and agg["mean"] == 2.5
    assert agg["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std of 1..4
    assert agg["stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
    half = 3.182446305 * math.sqrt(5 / 3) / 2  # t(0.975, df=3)
    assert (agg["ci_low"], agg["ci_high"]) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert aggregate([]) == {"n": 0}
    assert aggregate([7.0]) == {"n": 1, "mean": 7.0, "std": 0.0, "stderr": 0.0, "ci_low": 7.0, "ci_high": 7.0}


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
        scores_b=[0.5, 0.6, 0.4, None],
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
