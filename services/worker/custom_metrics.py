"""Metrics added without touching the service: modules named in CUSTOM_METRIC_MODULES or
declared under the ``llm_compare.metrics`` entry-point group (see examples/custom_metrics.py).

Workers load them at start and publish their descriptions to Redis, so the gateway (which does
not import worker code) knows them and refuses names no worker can run.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pandas as pd
import structlog
from mlflow.metrics import MetricValue, make_metric
from mlflow.models import EvaluationMetric

from shared.metrics import METRICS, MetricInfo, Scale
from shared.settings import Settings
from shared.store import ComparisonStore

log = structlog.get_logger()
ENTRY_POINT_GROUP = "llm_compare.metrics"

RowFn = Callable[[str, "str | None", dict[str, Any]], "float | None"]


@dataclass(frozen=True)
class CustomMetric:
    name: str
    description: str
    greater_is_better: bool
    fn: RowFn
    needs_reference: bool = False
    # "binary" (fn returns 0 or 1), "bounded" (within [min_value, max_value]) or "unbounded";
    # see shared.metrics.MetricInfo. Aggregate intervals follow it.
    scale: Scale = "unbounded"
    min_value: float | None = None
    max_value: float | None = None

    def __post_init__(self) -> None:
        # Building the registry entry checks the scale: an inconsistent one fails when the
        # module is imported at worker start, not in the middle of a comparison.
        _ = self.info

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(
            name=self.name,
            description=self.description,
            greater_is_better=self.greater_is_better,
            needs_reference=self.needs_reference,
            group="custom",
            custom=True,
            scale=self.scale,
            min_value=self.min_value,
            max_value=self.max_value,
        )

    def to_mlflow(self, rows: list[dict[str, Any]]) -> EvaluationMetric:
        from services.worker.stats import aggregate, aggregate_numbers

        info = self.info

        def eval_fn(predictions: pd.Series, row_index: pd.Series) -> MetricValue:
            scores = []
            for output, index in zip(predictions, row_index, strict=True):
                row = rows[int(index)]
                reference = row.get("reference")
                value = self.fn(str(output), None if reference is None else str(reference), row)
                scores.append(None if value is None else self._checked(float(value), int(index), info))
            summary = aggregate(scores, info)
            return MetricValue(
                scores=scores,  # type: ignore[arg-type]
                aggregate_results=aggregate_numbers(summary),
            )

        return make_metric(eval_fn=eval_fn, greater_is_better=self.greater_is_better, name=self.name)

    def _checked(self, value: float, row: int, info: MetricInfo) -> float:
        """A score outside the declared scale would make the interval, clipped to that scale, a lie."""
        if math.isnan(value):  # left unscored downstream
            return value
        if info.binary and value not in (0.0, 1.0):
            raise ValueError(
                f"custom metric {self.name!r} is binary but scored row {row} {value!r}, not 0 or 1"
            )
        if (info.min_value is not None and value < info.min_value) or (
            info.max_value is not None and value > info.max_value
        ):
            raise ValueError(
                f"custom metric {self.name!r} scored row {row} {value!r}, outside its declared range "
                f"[{info.min_value}, {info.max_value}]"
            )
        return value


def _from_module(path: str) -> list[CustomMetric]:
    module = importlib.import_module(path)
    found = getattr(module, "METRICS", None)
    if not isinstance(found, list) or not all(isinstance(m, CustomMetric) for m in found):
        raise TypeError(f"{path}.METRICS must be a list of CustomMetric")
    return found


def load_custom_metrics(settings: Settings) -> dict[str, CustomMetric]:
    modules = list(settings.custom_metric_modules)
    modules += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    loaded: dict[str, CustomMetric] = {}
    for path in modules:
        for metric in _from_module(path):
            if metric.name in METRICS:
                raise ValueError(f"custom metric {metric.name!r} from {path} clashes with a built-in metric")
            loaded[metric.name] = metric
    return loaded


def publish(redis_client: Any, prefix: str, metrics: dict[str, CustomMetric]) -> None:
    """Tell the gateway which custom metrics workers can run."""
    if not metrics:
        return
    ComparisonStore(redis_client, prefix=prefix).publish_custom_metrics(
        {name: json.dumps(m.info.as_dict()) for name, m in metrics.items()}
    )
    log.info("custom_metrics.published", names=sorted(metrics))
