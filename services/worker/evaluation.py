"""Scoring generated outputs with ``mlflow.evaluate()`` inside the candidate's MLflow run."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import mlflow
import pandas as pd
from mlflow.metrics import MetricValue, make_metric

from services.worker.custom_metrics import CustomMetric
from services.worker.generation import Generated
from services.worker.metrics import build_metrics, model_type_builtins
from services.worker.stats import aggregate, aggregate_numbers
from shared.metrics import METRICS, MetricInfo
from shared.results import has_reference

_ROW_COLUMNS_RESERVED = {
    "inputs",
    "prompt",
    "outputs",
    "reference",
    "output_token_count",
    "latency_s",
    "row_index",
    "input_token_count",
    "time_to_first_token_s",
    "row_cost",
    "generation_error",
}
# A failed endpoint row's justification, where a metric gives one.
FAILED_ROW = "not scored: the request to the endpoint failed"


def _metric_key(metric: Any) -> str:
    """The name MLflow logs a metric under: ``name`` or ``name/version``."""
    return f"{metric.name}/{metric.version}" if getattr(metric, "version", None) else metric.name


def build_frame(rows: list[dict[str, Any]], prompts: list[str], generated: list[Generated]) -> pd.DataFrame:
    # "inputs" is the dataset's own input, identical across candidates, so tables of several runs
    # join on it; "prompt" is what this candidate's model actually saw.
    frame: dict[str, list[Any]] = {
        "row_index": list(range(len(rows))),
        "inputs": [row["input"] for row in rows],
        "prompt": prompts,
        # MLflow names the predictions column "outputs" in its table when there are no targets;
        # using that name always keeps every run's table alike for mlflow.load_table.
        "outputs": [g.output for g in generated],
        "output_token_count": [g.output_tokens for g in generated],
        "latency_s": [g.latency_s for g in generated],
        "input_token_count": [g.input_tokens for g in generated],
        "time_to_first_token_s": [g.ttft_s for g in generated],
        "row_cost": [g.cost for g in generated],
    }
    if any(g.error for g in generated):
        # Failed endpoint rows: an empty output here, null scores, and the reason beside them.
        frame["generation_error"] = [g.error for g in generated]
    if any(has_reference(row) for row in rows):
        frame["reference"] = [None if row.get("reference") is None else str(row["reference"]) for row in rows]
    extra = [k for k in rows[0] if k not in ("input", "reference") and k not in _ROW_COLUMNS_RESERVED]
    for key in extra:
        frame[key] = [row.get(key) for row in rows]
    return pd.DataFrame(frame)


def evaluate_outputs(
    *,
    run_id: str,
    experiment_id: str,
    rows: list[dict[str, Any]],
    prompts: list[str],
    generated: list[Generated],
    metric_names: list[str],
    model_type: str | None,
    options: dict[str, Any] | None = None,
    custom: dict[str, CustomMetric] | None = None,
) -> dict[str, Any]:
    """Run mlflow.evaluate on the outputs; return aggregates and per-row scores by metric name."""
    data = build_frame(rows, prompts, generated)
    custom = custom or {}
    builtin_names = [n for n in metric_names if n not in custom]
    registry_metrics = dict(zip(builtin_names, build_metrics(builtin_names, options), strict=True))
    registry_metrics.update({n: custom[n].to_mlflow(rows) for n in metric_names if n in custom})
    builtins, skipped = model_type_builtins(model_type, metric_names)
    named = {**registry_metrics, **{m.name: m for m in builtins}}
    failed = {i for i, g in enumerate(generated) if g.error}
    if failed:
        info_of: dict[str, MetricInfo] = {**METRICS, **{n: m.info for n, m in custom.items()}}
        named = {name: _skipping_rows(metric, failed, info_of.get(name)) for name, metric in named.items()}
    with_targets = all(has_reference(row) for row in rows)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # model_type stays None: its default metrics would be added and, offline, fail the whole
        # call. The ones that can run here were probed and are passed explicitly instead.
        mlflow.evaluate(
            data=data,
            predictions="outputs",
            targets="reference" if with_targets else None,
            model_type=None,
            extra_metrics=list(named.values()),
            evaluators="default",
        )
    # result.tables looks the run up in the *active* experiment, which a worker never sets;
    # reading the logged table by experiment and run id is exact.
    table = mlflow.MlflowClient().load_table(experiment_id, "eval_results_table.json", run_ids=[run_id])
    if "row_index" in table.columns:
        table = table.sort_values("row_index").reset_index(drop=True)
    row_scores: list[dict[str, float | None]] = [{} for _ in rows]
    for name, metric in named.items():
        column = f"{_metric_key(metric)}/score"
        if column not in table.columns:
            continue
        for i, value in enumerate(table[column].tolist()):
            row_scores[i][name] = _clean(value)
    # One definition of mean, spread and interval for every metric, MLflow built-ins included;
    # the interval follows the metric's scale (built-ins outside the registry declare none).
    info: dict[str, MetricInfo] = {**METRICS, **{name: metric.info for name, metric in custom.items()}}
    aggregates = {name: aggregate([row.get(name) for row in row_scores], info.get(name)) for name in named}
    means = {name: agg["mean"] for name, agg in aggregates.items() if "mean" in agg}
    return {"metrics": means, "aggregates": aggregates, "row_scores": row_scores, "skipped_builtins": skipped}


def _skipping_rows(metric: Any, failed: set[int], info: MetricInfo | None) -> Any:
    """The same metric, leaving the rows in ``failed`` unscored (their request to the endpoint
    failed, so there is no output to score) in its per-row scores and in its aggregates."""
    original = metric.eval_fn

    def eval_fn(*args: Any) -> Any:
        value = original(*args)
        if value is None or value.scores is None:
            return value
        scores = [None if i in failed else score for i, score in enumerate(value.scores)]
        justifications = value.justifications and [
            FAILED_ROW if i in failed else text for i, text in enumerate(value.justifications)
        ]
        return MetricValue(
            scores=scores,  # type: ignore[arg-type]  # None: not scored, as in the judge metrics
            justifications=justifications,
            aggregate_results=aggregate_numbers(aggregate(scores, info)),
        )

    # MLflow passes each column by the name of the parameter: keep the original's.
    eval_fn.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    return make_metric(
        eval_fn=eval_fn,
        greater_is_better=metric.greater_is_better,
        name=metric.name,
        version=getattr(metric, "version", None),
    )


def _clean(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or math.isinf(number) else number
