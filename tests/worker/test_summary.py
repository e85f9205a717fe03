"""The summary on the parent run: directions and scales come from the registry the worker has,
custom metrics included."""

from __future__ import annotations

import re

from services.worker.custom_metrics import CustomMetric
from services.worker.pipeline import pairwise_statistics
from services.worker.summary import build_summary, render_html
from shared.metrics import METRICS
from shared.records import CandidateRecord, ComparisonSpec
from shared.schemas import CandidateSpec, CandidateState

CITED = CustomMetric(
    name="cited",
    description="share of sentences with a citation",
    greater_is_better=True,
    fn=lambda output, reference, row: 0.0,
    scale="bounded",
    min_value=0.0,
    max_value=1.0,
)
REGISTRY = {**METRICS, "cited": CITED.info}
SPEC = ComparisonSpec(
    name="cite-or-not",
    experiment="e",
    metrics=("cited", "latency", "exact_match"),
    candidates=(CandidateSpec(label="a", model="m"), CandidateSpec(label="b", model="m")),
)


def _candidate(label: str, metrics: dict[str, float]) -> CandidateRecord:
    return CandidateRecord(label=label, model="m", status=CandidateState.succeeded, metrics=metrics)


def _summary() -> dict[str, object]:
    candidates = [
        _candidate("a", {"cited": 0.8, "latency": 0.5, "exact_match": 0.25, "toxicity": 0.1}),
        _candidate("b", {"cited": 0.2, "latency": 0.3, "exact_match": 0.5, "toxicity": 0.2}),
    ]
    return build_summary(
        comparison_id="c1",
        spec=SPEC,
        rows=[{"input": "q", "reference": "r"}],
        candidates=candidates,
        outputs={"a": [{"output": "x", "scores": {}}], "b": [{"output": "y", "scores": {}}]},
        registry=REGISTRY,
    )


def _header(html: str, metric: str) -> str:
    match = re.search(rf"<th>{metric}( [↑↓])?</th>", html)
    assert match, metric
    return match.group(0)


def _best_cells(html: str) -> list[str]:
    return re.findall(r"<td class='best'>([^<]*)", html)


def test_the_summary_records_each_metrics_direction_and_scale():
    info = _summary()["metric_info"]
    assert info["cited"] == {
        "greater_is_better": True,
        "scale": "bounded",
        "min_value": 0.0,
        "max_value": 1.0,
        "custom": True,
    }
    assert info["latency"]["greater_is_better"] is False
    assert info["exact_match"]["scale"] == "binary"
    assert "toxicity" not in info  # an MLflow built-in outside the registry: direction unknown


def test_a_higher_is_better_custom_metric_is_marked_best_where_it_is_highest():
    html = render_html(_summary())
    assert _header(html, "cited") == "<th>cited ↑</th>"
    assert _header(html, "latency") == "<th>latency ↓</th>"
    assert _header(html, "toxicity") == "<th>toxicity</th>"
    # cited: a (0.8) is best; latency: b (0.3); exact_match: b (0.5); toxicity: nobody.
    assert _best_cells(html) == ["0.8", "0.3", "0.5"]


def test_failed_endpoint_rows_are_counted_under_the_candidates_status():
    summary = _summary()
    candidates = summary["candidates"]
    assert isinstance(candidates, list)
    candidates[0]["rows_failed"], candidates[1]["rows_failed"] = 1, 3
    html = render_html(summary)
    assert "<div class='failed'>1 row failed</div>" in html
    assert "<div class='failed'>3 rows failed</div>" in html


def test_pairwise_statistics_judge_a_binary_metric_won_on_every_row_but_not_a_constant_latency():
    candidates = [_candidate("a", {}), _candidate("b", {})]
    outputs = {
        "a": [{"output": "x", "scores": {"exact_match": 1.0, "latency": 0.03}} for _ in range(8)],
        "b": [{"output": "y", "scores": {"exact_match": 0.0, "latency": 0.05}} for _ in range(8)],
    }
    pairs = {
        p["metric"]: p for p in pairwise_statistics(["exact_match", "latency"], candidates, outputs, REGISTRY)
    }
    assert pairs["exact_match"]["better"] == "a" and pairs["exact_match"]["note"] is None
    assert pairs["latency"]["better"] is None and pairs["latency"]["note"] == "constant_difference"
    assert pairs["latency"]["verdict"].startswith(
        "no verdict on latency: the difference is the same on every row"
    )
