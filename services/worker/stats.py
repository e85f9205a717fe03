"""Aggregates per candidate and paired statistics between candidates, on per-row scores.

Pure numpy/scipy: no MLflow, no Redis, so every number here can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from shared.metrics import MetricInfo

BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 10000
EXACT_PERMUTATION_MAX_ROWS = 14  # 2**14 sign patterns: enumerate them instead of sampling
# The numeric part of an aggregate, as logged to MLflow (``<metric>/ci_low``...).
AGGREGATE_NUMBERS = ("mean", "std", "stderr", "ci_low", "ci_high")
# pairwise note: every row differs by the same amount, so the metric does not vary by row.
CONSTANT_DIFFERENCE = "constant_difference"


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def wilson_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: stays inside [0, 1] and keeps its coverage at
    0/n and n/n, where the normal (or t) interval around the mean collapses or spills over."""
    z = float(scipy_stats.norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0/n and n/n the bound is exactly 0 (or 1); computed, it can come out as 2.8e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_mean_ci(
    x: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling rows. Each resampled mean lies
    between the smallest and largest value, so the interval never leaves the observed range."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def aggregate(
    values: Sequence[float | None],
    info: MetricInfo | None,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, float | str]:
    """n, mean, sample standard deviation, standard error and a 95% interval of the mean over
    the scored rows, with ``ci_method`` naming how the interval was made: "wilson" for a binary
    metric (every score 0 or 1), else "bootstrap" (seeded percentile bootstrap). The interval is
    clipped to the metric's declared [min_value, max_value]; ``info`` None (an MLflow built-in
    outside the registry) declares nothing."""
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    stderr = std / math.sqrt(n)
    if info is not None and info.binary and bool(np.all((x == 0) | (x == 1))):
        method = "wilson"
        low, high = wilson_interval(int(x.sum()), n)
    else:
        # A binary metric whose scores are not all 0/1 (a custom one that breaks its own
        # declaration) is still summarised, by the method that assumes nothing.
        method = "bootstrap"
        low, high = bootstrap_mean_ci(x, resamples=resamples, seed=seed)
        # Resampled means may round one ulp past the mean of identical values.
        low, high = min(low, mean), max(high, mean)
    if info is not None and info.min_value is not None:
        low, high = max(low, info.min_value), max(high, info.min_value)
    if info is not None and info.max_value is not None:
        low, high = min(low, info.max_value), min(high, info.max_value)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "stderr": stderr,
        "ci_low": low,
        "ci_high": high,
        "ci_method": method,
    }


def aggregate_numbers(summary: dict[str, float | str]) -> dict[str, float]:
    """What of an aggregate MLflow can log as metrics (n is the row count, ci_method a word)."""
    return {k: float(v) for k, v in summary.items() if k in AGGREGATE_NUMBERS}


@dataclass(frozen=True)
class PairedResult:
    metric: str
    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean of (a - b) over rows both scored
    ci_low: float
    ci_high: float
    p_value: float
    wins: int  # rows where a is better, by the metric's direction
    ties: int
    losses: int
    better: str | None  # the label whose advantage is significant at 5%, else None
    verdict: str
    # Why no verdict could be given at all (CONSTANT_DIFFERENCE), as opposed to a judged
    # "no clear difference"; None when the test judged.
    note: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_bootstrap_ci(
    diffs: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference, resampling rows."""
    return bootstrap_mean_ci(diffs, resamples=resamples, seed=seed, level=level)


def paired_permutation_p(diffs: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean(diff) == 0 (exact for few rows)."""
    n = diffs.size
    observed = abs(diffs.mean())
    if n == 0 or np.all(diffs == 0):
        return 1.0
    if n <= EXACT_PERMUTATION_MAX_ROWS:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice(np.array([-1, 1]), size=(permutations, n))
    null = np.abs((signs * diffs).mean(axis=1))
    # Counting the observed arrangement keeps the p-value valid (never 0) when sampling.
    extreme = int(np.sum(null >= observed - 1e-12))
    if n <= EXACT_PERMUTATION_MAX_ROWS:
        return extreme / signs.shape[0]
    return (extreme + 1) / (signs.shape[0] + 1)


def paired_compare(
    *,
    metric: str,
    a: str,
    b: str,
    scores_a: Sequence[float | None],
    scores_b: Sequence[float | None],
    greater_is_better: bool,
    binary: bool = False,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> PairedResult | None:
    """Paired difference of a and b on the rows both were scored on.

    When every row differs by exactly the same non-zero amount, the metric carries no row-level signal
    (a per-batch or per-run number copied onto each row: a test would call any such offset
    significant), so no candidate is called better. A binary metric is the exception: a
    difference of 1 on every row means one candidate won every row.
    """
    pairs = [
        (x, y)
        for x, y in zip(scores_a, scores_b, strict=True)
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))
    ]
    if not pairs:
        return None
    xa = np.array([p[0] for p in pairs], dtype=float)
    xb = np.array([p[1] for p in pairs], dtype=float)
    diffs = xa - xb
    ci_low, ci_high = paired_bootstrap_ci(diffs, resamples=resamples, seed=seed)
    p_value = paired_permutation_p(diffs, seed=seed)
    sign = 1 if greater_is_better else -1
    wins = int(np.sum(sign * diffs > 0))
    losses = int(np.sum(sign * diffs < 0))
    ties = int(diffs.size - wins - losses)
    mean_diff = float(diffs.mean())
    better = None
    note = None
    constant = diffs.size > 1 and float(np.ptp(diffs)) <= 1e-12 * max(1.0, float(np.abs(diffs).max()))
    # Equal scores on every row (a zero difference) are a tie the test reports as such.
    if constant and mean_diff != 0 and not (binary and abs(mean_diff) == 1.0):
        note = CONSTANT_DIFFERENCE
    elif p_value < 0.05 and not (ci_low <= 0 <= ci_high):
        better = a if sign * mean_diff > 0 else b
    return PairedResult(
        metric=metric,
        a=a,
        b=b,
        n=int(diffs.size),
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        mean_diff=mean_diff,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=float(p_value),
        wins=wins,
        ties=ties,
        losses=losses,
        better=better,
        verdict=_verdict(metric, a, b, mean_diff, ci_low, ci_high, p_value, better, int(diffs.size), note),
        note=note,
    )


def _verdict(
    metric: str,
    a: str,
    b: str,
    diff: float,
    low: float,
    high: float,
    p: float,
    better: str | None,
    n: int,
    note: str | None = None,
) -> str:
    if note == CONSTANT_DIFFERENCE:
        return (
            f"no verdict on {metric}: the difference is the same on every row "
            f"({diff:+.3g}, {a} − {b}, n={n}), so the metric does not vary by row"
        )
    interval = f"{diff:+.3g} [{low:+.3g}, {high:+.3g}] ({a} − {b}, p={p:.3g}, n={n})"
    if better is None:
        return f"no clear difference on {metric}: {interval}"
    return f"{better} better on {metric}: {interval}"
