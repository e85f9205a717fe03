"""The metric registry's implementations, as MLflow metrics for ``mlflow.evaluate(extra_metrics=...)``.

Each entry is keyed by the names in ``shared.metrics.METRICS``. Columns that the worker adds to
the evaluation frame (``output_token_count``, ``latency_s``) reach the metric functions by
parameter name, which is how ``mlflow.evaluate`` passes extra columns.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.metrics import MetricValue, make_metric
from mlflow.models import EvaluationMetric

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _aggregate(scores: Sequence[float | None]) -> dict[str, float]:
    values = np.array([s for s in scores if s is not None], dtype=float)
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "std": float(values.std()), "p90": float(np.percentile(values, 90))}


def _result(scores: Sequence[float | None]) -> MetricValue:
    return MetricValue(scores=list(scores), aggregate_results=_aggregate(scores))  # type: ignore[arg-type]


def _exact_match(predictions: pd.Series, targets: pd.Series) -> MetricValue:
    return _result(
        [float(normalize_answer(p) == normalize_answer(t)) for p, t in zip(predictions, targets, strict=True)]
    )


def _contains_reference(predictions: pd.Series, targets: pd.Series) -> MetricValue:
    scores = []
    for prediction, target in zip(predictions, targets, strict=True):
        reference = normalize_answer(target)
        scores.append(float(bool(reference) and f" {reference} " in f" {normalize_answer(prediction)} "))
    return _result(scores)


def _output_tokens(predictions: pd.Series, output_token_count: pd.Series) -> MetricValue:
    return _result([float(n) for n in output_token_count])


def _output_words(predictions: pd.Series) -> MetricValue:
    return _result([float(len(str(p).split())) for p in predictions])


def _latency(predictions: pd.Series, latency_s: pd.Series) -> MetricValue:
    return _result([float(s) for s in latency_s])


def _custom(fn: Callable[..., MetricValue], *, name: str, greater_is_better: bool) -> EvaluationMetric:
    return make_metric(eval_fn=fn, greater_is_better=greater_is_better, name=name)


def _ari() -> EvaluationMetric:
    from mlflow.metrics import ari_grade_level

    return ari_grade_level()


# MLflow treats a metric named "latency" specially (it times the model itself, or logs zeros
# when only predictions are given), so ours is logged as "latency_seconds".
METRIC_FACTORIES: dict[str, Callable[[], EvaluationMetric]] = {
    "exact_match": lambda: _custom(_exact_match, name="exact_match", greater_is_better=True),
    "contains_reference": lambda: _custom(
        _contains_reference, name="contains_reference", greater_is_better=True
    ),
    "output_tokens": lambda: _custom(_output_tokens, name="output_tokens", greater_is_better=False),
    "output_words": lambda: _custom(_output_words, name="output_words", greater_is_better=False),
    "latency": lambda: _custom(_latency, name="latency_seconds", greater_is_better=False),
    "ari_grade_level": _ari,
}


def build_metrics(names: list[str]) -> list[EvaluationMetric]:
    unknown = [n for n in names if n not in METRIC_FACTORIES]
    if unknown:
        raise KeyError(f"no implementation for metrics {unknown}")
    return [METRIC_FACTORIES[n]() for n in names]


# Defaults MLflow adds for each model_type, and whether each can run without the internet is
# only known by trying: token_count downloads a tiktoken file, flesch_kincaid an nltk corpus,
# toxicity and rouge fetch modules from the hub.
_MODEL_TYPE_BUILTINS: dict[str, list[str]] = {
    "text": ["toxicity", "flesch_kincaid_grade_level", "ari_grade_level", "token_count"],
    "question-answering": [
        "exact_match",
        "toxicity",
        "flesch_kincaid_grade_level",
        "ari_grade_level",
        "token_count",
    ],
    "text-summarization": [
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "toxicity",
        "flesch_kincaid_grade_level",
        "ari_grade_level",
        "token_count",
    ],
}
# Built-ins the registry already covers under its own name.
_COVERED = {"exact_match", "ari_grade_level"}
_probe_cache: dict[str, bool] = {}


def _probe(name: str) -> EvaluationMetric | None:
    """Build MLflow built-in ``name`` and run it on one row; None when it cannot run here."""
    import mlflow.metrics as builtins

    if _probe_cache.get(name) is False:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the legacy metrics announce deprecation
            metric = getattr(builtins, name)()
        params = list(_parameters(metric.eval_fn))
        args: list[Any] = [pd.Series(["Paris is the capital of France."])]
        if "targets" in params:
            args.append(pd.Series(["Paris"]))
        if "metrics" in params:
            args.append({})
        value = metric.eval_fn(*args)
        ok = value is not None and value.scores is not None and any(s is not None for s in value.scores)
    except Exception:  # noqa: BLE001 - any failure (network, missing corpus) means "cannot run here"
        ok = False
    _probe_cache[name] = ok
    return metric if ok else None


def _parameters(fn: Callable[..., Any]) -> list[str]:
    import inspect

    return list(inspect.signature(fn).parameters)


def model_type_builtins(
    model_type: str | None, already: list[str]
) -> tuple[list[EvaluationMetric], list[str]]:
    """MLflow's default metrics for ``model_type`` that can run here, and those skipped."""
    if model_type is None:
        return [], []
    runnable, skipped = [], []
    for name in _MODEL_TYPE_BUILTINS[model_type]:
        if name in _COVERED:
            continue
        metric = _probe(name)
        if metric is None:
            skipped.append(name)
        else:
            runnable.append(metric)
    return runnable, skipped
