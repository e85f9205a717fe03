"""An example of metrics added without touching the service's code.

Point the workers at this module and the metrics become selectable by name:

    CUSTOM_METRIC_MODULES=examples.custom_metrics        # a setting, ':'-separated for several

or declare it as an entry point of your own package (pyproject.toml):

    [project.entry-points."llm_compare.metrics"]
    my_metrics = "my_package.metrics"

A module exposes METRICS, a list of CustomMetric. Each function receives one row at a time:
the output, the row's reference (None when the row has none) and the whole dataset row, and
returns a number, or None to leave the row unscored.

Declare what a score can be, so that aggregates get an interval that fits it: scale="binary"
for 0/1 scores (a Wilson interval), scale="bounded" with min_value and max_value for scores in a
fixed range, or the default "unbounded" (optionally with a one-sided min_value or max_value). A
score outside the declared scale fails the candidate with a message naming the row.
"""

from __future__ import annotations

from typing import Any

from services.worker.custom_metrics import CustomMetric


def _answer_length_ratio(output: str, reference: str | None, row: dict[str, Any]) -> float | None:
    if not reference:
        return None
    return len(output.split()) / max(1, len(reference.split()))


def _starts_with_capital(output: str, reference: str | None, row: dict[str, Any]) -> float:
    stripped = output.lstrip()
    return float(bool(stripped) and stripped[0].isupper())


METRICS = [
    CustomMetric(
        name="answer_length_ratio",
        description="Words in the output per word of the reference (1 = as long as the reference).",
        greater_is_better=False,
        needs_reference=True,
        fn=_answer_length_ratio,
        min_value=0.0,  # a ratio of word counts: never negative, no upper limit
    ),
    CustomMetric(
        name="starts_with_capital",
        description="1 when the output starts with an upper-case letter, else 0.",
        greater_is_better=True,
        fn=_starts_with_capital,
        scale="binary",
    ),
]
