"""Metric implementations on hand-worked examples."""

from __future__ import annotations

import pandas as pd
import pytest

from services.worker.metrics import METRIC_FACTORIES, build_metrics, model_type_builtins, normalize_answer
from shared.metrics import DEFAULT_METRICS, METRICS


def test_registry_and_implementations_agree():
    assert set(METRIC_FACTORIES) == set(METRICS)
    assert set(DEFAULT_METRICS) <= set(METRICS)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a day ", "apple day"),
        ("Paris.", "paris"),
        ("THEATRE", "theatre"),  # "the" inside a word stays
        ("", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def _scores(name: str, **columns):
    metric = build_metrics([name])[0]
    return metric.eval_fn(**columns)


def test_exact_match():
    value = _scores(
        "exact_match",
        predictions=pd.Series(["Paris.", "the paris", "Lyon", "paris france"]),
        targets=pd.Series(["Paris", "Paris", "Paris", "Paris"]),
    )
    assert value.scores == [1.0, 1.0, 0.0, 0.0]
    assert value.aggregate_results["mean"] == 0.5


def test_contains_reference():
    value = _scores(
        "contains_reference",
        predictions=pd.Series(["The capital is Paris.", "Parisian food", "No idea"]),
        targets=pd.Series(["Paris", "Paris", "Paris"]),
    )
    assert value.scores == [1.0, 0.0, 0.0]


def test_output_words_tokens_and_latency():
    words = _scores("output_words", predictions=pd.Series(["one two three", "", "a"]))
    assert words.scores == [3.0, 0.0, 1.0]
    tokens = _scores("output_tokens", predictions=pd.Series(["x", "y"]), output_token_count=pd.Series([7, 3]))
    assert tokens.scores == [7.0, 3.0] and tokens.aggregate_results["mean"] == 5.0
    latency = _scores("latency", predictions=pd.Series(["x", "y"]), latency_s=pd.Series([0.5, 1.5]))
    assert latency.aggregate_results == {"mean": 1.0, "std": 0.5, "p90": 1.4}


def test_latency_is_not_logged_under_mlflows_reserved_name():
    # mlflow.evaluate drops a metric named "latency" when no model is passed.
    assert build_metrics(["latency"])[0].name == "latency_seconds"


def test_model_type_builtins_offline_are_skipped_not_fatal(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runnable, skipped = model_type_builtins("question-answering", ["exact_match"])
    names = [m.name for m in runnable]
    # Offline, the hub-backed and download-backed built-ins cannot run; none of them may leak in.
    assert "toxicity" in skipped and "toxicity" not in names
    assert set(names) | set(skipped) == {"toxicity", "flesch_kincaid_grade_level", "token_count"}
    assert model_type_builtins(None, []) == ([], [])
