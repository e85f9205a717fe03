"""Per-metric bar charts with 95 % interval whiskers, as numbers a template turns into HTML.

The bars are plain HTML elements positioned in percent of the axis, so their labels stay real,
readable text at any width (no canvas, no chart library to vendor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from shared.display import readable_number
from shared.metrics import MetricInfo


@dataclass
class Bar:
    label: str
    mean: float
    n: int
    ci_low: float | None
    ci_high: float | None
    ci_method: str | None
    # Positions on the axis, in percent of its width.
    start_pct: float = 0.0
    width_pct: float = 0.0
    whisker_low_pct: float | None = None
    whisker_high_pct: float | None = None
    best: bool = False


@dataclass
class MetricChart:
    name: str
    description: str
    greater_is_better: bool
    axis_low: float
    axis_high: float
    zero_pct: float
    bars: list[Bar] = field(default_factory=list)

    @property
    def direction(self) -> str:
        return "higher is better" if self.greater_is_better else "lower is better"


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_chart(name: str, info: MetricInfo | None, candidates: list[dict[str, Any]]) -> MetricChart | None:
    """One chart: a bar per candidate that has this metric's aggregate (mean and interval).

    The axis spans the metric's declared range when it has one (0..1 for a proportion), else
    the data with zero included, so bars of different charts are never stretched to look apart.
    """
    bars = []
    for candidate in candidates:
        agg = (candidate.get("aggregates") or {}).get(name) or {}
        mean = _finite(agg.get("mean"))
        if mean is None:
            continue
        low, high = _finite(agg.get("ci_low")), _finite(agg.get("ci_high"))
        bars.append(
            Bar(
                label=candidate["label"],
                mean=mean,
                n=int(agg.get("n") or 0),
                ci_low=low if agg.get("n", 0) > 1 else None,
                ci_high=high if agg.get("n", 0) > 1 else None,
                ci_method=agg.get("ci_method"),
            )
        )
    if not bars:
        return None
    greater = info.greater_is_better if info else True
    values = [b.mean for b in bars] + [v for b in bars for v in (b.ci_low, b.ci_high) if v is not None]
    declared_low = getattr(info, "min_value", None)
    declared_high = getattr(info, "max_value", None)
    low = declared_low if declared_low is not None else min(0.0, *values)
    high = declared_high if declared_high is not None else max(0.0, *values)
    if high <= low:
        high = low + 1.0
    span = high - low
    baseline = 0.0 if low <= 0.0 <= high else low

    def pct(value: float) -> float:
        return round(100.0 * (min(max(value, low), high) - low) / span, 2)

    zero = pct(baseline)
    for bar in bars:
        end = pct(bar.mean)
        bar.start_pct, bar.width_pct = min(zero, end), abs(end - zero)
        if bar.ci_low is not None and bar.ci_high is not None:
            bar.whisker_low_pct, bar.whisker_high_pct = pct(bar.ci_low), pct(bar.ci_high)
    distinct = {b.mean for b in bars}
    if len(bars) > 1 and len(distinct) > 1:
        target = max(distinct) if greater else min(distinct)
        for bar in bars:
            bar.best = bar.mean == target
    return MetricChart(
        name=name,
        description=info.description if info else "",
        greater_is_better=greater,
        axis_low=low,
        axis_high=high,
        zero_pct=zero,
        bars=bars,
    )


def fmt(value: float | None) -> str:
    return readable_number(value)
