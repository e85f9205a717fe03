"""Aggregates per candidate and paired statistics between candidates, on per-row scores.

Pure numpy/scipy: no MLflow, no Redis, so every number here can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 10000
EXACT_PERMUTATION_MAX_ROWS = 14  # 2**14 sign patterns: enumerate them instead of sampling


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def aggregate(values: Sequence[float | None]) -> dict[str, float]:
    """Mean, standard deviation, standard error and a 95% t-interval over the scored rows."""
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "stderr": 0.0, "ci_low": mean, "ci_high": mean}
    std = float(x.std(ddof=1))
    stderr = std / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.975, df=n - 1)) * stderr
    return {"n": n, "mean": mean, "std": std, "stderr": stderr, "ci_low": mean - half, "ci_high": mean + half}


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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_bootstrap_ci(
    diffs: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference, resampling rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diffs.size, size=(resamples, diffs.size))
    means = diffs[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


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
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> PairedResult | None:
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
    if p_value < 0.05 and not (ci_low <= 0 <= ci_high):
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
        verdict=_verdict(metric, a, b, mean_diff, ci_low, ci_high, p_value, better, int(diffs.size)),
    )


def _verdict(
    metric: str, a: str, b: str, diff: float, low: float, high: float, p: float, better: str | None, n: int
) -> str:
    interval = f"{diff:+.3g} [{low:+.3g}, {high:+.3g}] ({a} − {b}, p={p:.3g}, n={n})"
    if better is None:
        return f"no clear difference on {metric}: {interval}"
    return f"{better} better on {metric}: {interval}"
