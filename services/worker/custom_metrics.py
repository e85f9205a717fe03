"""Metrics added without touching the service: modules named in CUSTOM_METRIC_MODULES or
declared under the ``llm_compare.metrics`` entry-point group (see examples/custom_metrics.py).

Workers load them at start and publish their descriptions to Redis, so the gateway (which does
not import worker code) knows them and refuses names no worker can run.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pandas as pd
import structlog
from mlflow.metrics import MetricValue, make_metric
from mlflow.models import EvaluationMetric

from shared.metrics import METRICS, MetricInfo
from shared.settings import Settings

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

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(
            name=self.name,
            description=self.description,
            greater_is_better=self.greater_is_better,
            needs_reference=self.needs_reference,
            group="custom",
            custom=True,
        )

    def to_mlflow(self, rows: list[dict[str, Any]]) -> EvaluationMetric:
        from services.worker.stats import aggregate

        def eval_fn(predictions: pd.Series, row_index: pd.Series) -> MetricValue:
            scores = []
            for output, index in zip(predictions, row_index, strict=True):
                row = rows[int(index)]
                reference = row.get("reference")
                value = self.fn(str(output), None if reference is None else str(reference), row)
                scores.append(None if value is None else float(value))
            summary = aggregate(scores)
            return MetricValue(
                scores=scores,  # type: ignore[arg-type]
                aggregate_results={k: v for k, v in summary.items() if k != "n"},
            )

        return make_metric(eval_fn=eval_fn, greater_is_better=self.greater_is_better, name=self.name)


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
    redis_client.hset(
        f"{prefix}:metrics:custom",
        mapping={name: json.dumps(m.info.as_dict()) for name, m in metrics.items()},
    )
    log.info("custom_metrics.published", names=sorted(metrics))
