"""What each metric is, as the gateway needs to know it to validate a request.

The worker's implementations live in ``services/worker/metrics.py`` and are keyed by the same
names; a test checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    greater_is_better: bool
    needs_reference: bool = False
    default: bool = False


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            "exact_match",
            "1 when the output equals the reference after lower-casing and removing "
            "punctuation, articles and extra whitespace (SQuAD normalisation), else 0.",
            greater_is_better=True,
            needs_reference=True,
            default=True,
        ),
        MetricInfo(
            "contains_reference",
            "1 when the normalised reference appears inside the normalised output, else 0.",
            greater_is_better=True,
            needs_reference=True,
            default=True,
        ),
        MetricInfo(
            "output_tokens",
            "Number of generated tokens, counted with the candidate's own tokenizer.",
            greater_is_better=False,
            default=True,
        ),
        MetricInfo(
            "output_words",
            "Number of whitespace-separated words in the output.",
            greater_is_better=False,
            default=True,
        ),
        MetricInfo(
            "latency",
            "Seconds of generation time per row (its share of the batch it ran in).",
            greater_is_better=False,
            default=True,
        ),
        MetricInfo(
            "ari_grade_level",
            "Automated Readability Index of the output (MLflow built-in; lower reads easier).",
            greater_is_better=False,
            default=True,
        ),
    )
}

DEFAULT_METRICS: list[str] = [name for name, info in METRICS.items() if info.default]
