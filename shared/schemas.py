"""Request and response models of the public HTTP contract, named by role."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
ModelType = Literal["text", "question-answering", "text-summarization"]

# Hard ceilings of a request, whatever the settings say: they let a hostile body be refused by
# its shape before thousands of items are validated one by one.
MAX_CANDIDATES_CEILING = 64
MAX_METRICS = 64
MAX_TAGS = 50

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored and passed on, or None. JSON's \\u0000 and unpaired
    \\ud800-\\udfff escapes decode to Python strings that Redis cannot encode as UTF-8 and that
    PostgreSQL (the MLflow backend) refuses."""
    if "\x00" in value:
        return "must not contain NUL characters (\\u0000)"
    if _SURROGATE.search(value):
        return "must be valid Unicode: it holds an unpaired surrogate (\\ud800-\\udfff)"
    return None


def _clean_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# Every free-text field of a request: no NUL, no unpaired surrogate.
Text = Annotated[str, AfterValidator(_clean_text)]


class ComparisonStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    partially_failed = "partially_failed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_COMPARISON_STATUSES


FINAL_COMPARISON_STATUSES = frozenset(
    {
        ComparisonStatus.succeeded,
        ComparisonStatus.partially_failed,
        ComparisonStatus.failed,
        ComparisonStatus.cancelled,
    }
)


class CandidateState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL_CANDIDATE_STATES = frozenset(
    {CandidateState.succeeded, CandidateState.failed, CandidateState.cancelled}
)


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        64,
        ge=1,
        description="Upper bound on generated tokens per row (at most the service's MAX_NEW_TOKENS).",
    )
    do_sample: bool = False
    temperature: float = Field(
        1.0,
        gt=0,
        le=10,
        description="Sampling temperature, 0.01 to 10. Logits are divided by it: below 0.01 they "
        "overflow (set do_sample to false for greedy decoding instead), and above 10 sampling is "
        "close to uniform noise over the top_k tokens.",
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the fewest tokens whose probability reaches top_p.",
    )
    top_k: int = Field(
        50,
        ge=0,
        le=1000,
        description="Sample among the k most likely tokens, at most 1000 (0 samples the whole "
        "vocabulary). Past a few hundred the extra tokens carry next to no probability, while the "
        "per-step top-k selection grows with k.",
    )
    repetition_penalty: float = Field(
        1.0,
        ge=0.5,
        le=5,
        description="1.0 is off; above 1 discourages repeating tokens (1.1-1.3 is usual), below 1 "
        "encourages it. Outside 0.5-5 it swamps the model's own preferences.",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="Seed of the sampler, 0 to 2**32 - 1: the range the worker's random generators "
        "(torch, NumPy) all accept.",
    )
    stop: list[Annotated[Text, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        max_length=8,
        description="Strings that end a row's output; the output is cut before the first one.",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_not_vanishing(cls, value: float) -> float:
        if value < 0.01:
            raise ValueError(
                "temperature must be at least 0.01 (smaller ones overflow the logits); "
                "for greedy decoding set do_sample to false"
            )
        return value


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(pattern=LABEL_PATTERN, description="Unique name of this candidate.")
    model: Text = Field(
        min_length=1,
        max_length=1000,
        description="Catalog name, Hugging Face hub id, local directory, .gguf file path, "
        "models:/<name>/<version> (or /latest, @<alias>) for a registered MLflow model on the "
        "operator's MLFLOW_MODEL_ALLOWLIST, or endpoint:<endpoint-name>/<model-id> for a model on a "
        "remote endpoint the operator configured (GET /v1/models).",
    )
    revision: Text | None = Field(None, min_length=1, max_length=256)
    prompt_template: Text = Field(
        "{input}", description="Must contain {input}; at most the service's MAX_PROMPT_CHARS characters."
    )
    system_prompt: Text | None = Field(None, description="At most the service's MAX_PROMPT_CHARS characters.")
    use_chat_template: Literal["auto"] | bool = "auto"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise ValueError(
                "prompt_template must contain the placeholder {input}, where each row's input goes"
            )
        return value


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] = Field(
        description="One object per row: 'input', optional 'reference', other columns for the template. "
        "Cells are text, numbers, booleans or null; at most the service's MAX_ROWS rows, "
        "MAX_COLUMNS columns and MAX_CELL_CHARS characters a cell.",
        json_schema_extra={"minItems": 1},
    )


# ------------------------------------------------------------------------------------ webhooks
# What a callback can subscribe to; README "Webhooks" describes each body.
WebhookEvent = Literal["comparison.started", "candidate.finished", "comparison.finished"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
# A comparison calls back a few receivers at most; each event costs one delivery per callback.
MAX_CALLBACKS = 5
MAX_CALLBACK_URL_CHARS = 2000
DeliveryState = Literal["pending", "delivered", "failed"]


class CallbackCreate(BaseModel):
    """A receiver to call back, signed the Standard Webhooks way, when the listed events happen."""

    model_config = ConfigDict(extra="forbid")

    url: Text = Field(
        min_length=1,
        max_length=MAX_CALLBACK_URL_CHARS,
        description="http or https URL without credentials, on a host the operator lists in "
        "WEBHOOK_ALLOWED_HOSTS; private, loopback and link-local addresses only when the host is "
        "listed by name. Checked at submit time (after DNS resolution) and at every delivery.",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="comparison.started, candidate.finished (once per candidate) and/or "
        "comparison.finished; all three when left out.",
    )

    @field_validator("events")
    @classmethod
    def _each_event_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class ComparisonCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field("comparison", min_length=1, max_length=200)
    experiment: Text | None = Field(None, min_length=1, max_length=200)
    model_type: ModelType | None = None
    candidates: list[CandidateSpec] = Field(
        max_length=MAX_CANDIDATES_CEILING,
        description="At least 2; at most the service's MAX_CANDIDATES.",
        # Documented for clients; the service's own check refuses fewer with a clearer message.
        json_schema_extra={"minItems": 2},
    )
    dataset: DatasetSpec
    metrics: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, max_length=MAX_METRICS
    )
    regex: Text | None = Field(
        None, max_length=2000, description="Pattern for the regex_match metric (Python re.search)."
    )
    judge_rubric: Text | None = Field(
        None, min_length=10, max_length=4000, description="Rubric for the judge_rubric metric (1-5 scale)."
    )
    cache: bool = Field(
        True, description="Reuse outputs already generated for the same model, settings and prompt."
    )
    pairwise_judge: bool = Field(
        False,
        description="Have the judge compare every two candidates row by row (asked twice, order swapped) "
        "and rank them with Bradley-Terry.",
    )
    tags: dict[Text, Text] = Field(
        default_factory=dict,
        max_length=MAX_TAGS,
        description="Set on the MLflow runs. Keys: up to 250 letters, digits, '_', '-', '.', ' ', ':' "
        "or '/', not starting with 'mlflow.' or 'llm_compare.' (reserved); values up to 8000 "
        "characters.",
    )
    callbacks: list[CallbackCreate] = Field(
        default_factory=list,
        max_length=MAX_CALLBACKS,
        description=f"Up to {MAX_CALLBACKS} receivers to call back (signed webhooks) when the "
        "comparison starts, a candidate ends or the verdict is in; see GET .../deliveries.",
    )


class Progress(BaseModel):
    done: int = 0
    total: int = 0
    tokens_per_second: float | None = Field(None, description="Generation speed so far, updated per batch")
    eta_s: float | None = Field(None, description="Seconds of generation left, estimated per batch")
    cache_hits: int = Field(0, description="Rows answered from the response cache instead of generated")


class CandidateStatus(BaseModel):
    label: str
    model: str
    status: CandidateState
    progress: Progress
    # Null for a metric that could not be scored (see metrics_unavailable).
    metrics: dict[str, float | None] = Field(default_factory=dict)
    metrics_unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="Metrics left unscored, with why (e.g. the LLM judge stayed unavailable); the "
        "candidate still succeeded and its other metrics stand",
    )
    # Per metric: n (rows scored), mean (for a binary 0/1 metric, the share of rows scoring 1),
    # std (sample), stderr, and a 95% interval of the mean, ci_low..ci_high, made as ci_method
    # says: "wilson" (Wilson score interval, binary metrics) or "bootstrap" (seeded percentile
    # bootstrap of the mean, 2,000 resamples, every other metric). Either stays within the
    # metric's min_value..max_value (GET /v1/metrics).
    aggregates: dict[str, dict[str, float | str]] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None
    error: str | None = None
    rows_failed: int = Field(
        0,
        description="Rows whose request to the remote endpoint still failed after its retries: their "
        "output and scores are null, the reason is in /results. The candidate fails only when more "
        "than ENDPOINT_MAX_ERROR_RATE of its rows did",
    )
    totals: dict[str, float | None] = Field(
        default_factory=dict,
        description="Endpoint candidates: input_tokens and output_tokens (from the server's usage), "
        "cost (by the endpoint's price table; null without prices), generation_seconds, "
        "tokens_per_second (output tokens over generation_seconds), requests and retries",
    )
    # host:pid of the worker process that ran it, for operators tracing a slow or failed run.
    worker: str | None = None
    started_at: datetime | None = None
    # When the first batch went to the model (after loading it and reading the response cache);
    # absent when every row came from the cache.
    generation_started_at: datetime | None = None
    finished_at: datetime | None = None


class MlflowLinks(BaseModel):
    experiment_id: str | None = None
    parent_run_id: str | None = None
    url: str | None = None


class PairwiseComparison(BaseModel):
    metric: str
    a: str
    b: str
    n: int = Field(description="Rows both candidates were scored on")
    mean_a: float
    mean_b: float
    mean_diff: float = Field(description="Mean of (a - b) over those rows")
    ci_low: float = Field(description="Paired-bootstrap 95% interval of mean_diff (2,000 seeded resamples)")
    ci_high: float
    p_value: float = Field(description="Two-sided paired sign-flip permutation test")
    wins: int = Field(description="Rows where a is better, by the metric's direction")
    ties: int
    losses: int
    better: str | None = Field(description="The significantly better candidate at 5%, else null")
    verdict: str
    note: Literal["constant_difference"] | None = Field(
        None,
        description="Why no verdict could be given: constant_difference when a and b differ by the "
        "same amount on every row, so the metric does not vary by row (a binary metric won on every "
        "row is judged). Null when the test judged; better null then means no clear difference.",
    )


class RankedCandidate(BaseModel):
    label: str
    rank: int
    strength: float = Field(description="Bradley-Terry strength; 1.0 is average")
    wins: int
    ties: int
    losses: int


class JudgeRanking(BaseModel):
    judge: str
    verdicts: int = Field(description="Row-level pairwise verdicts the ranking rests on")
    ranking: list[RankedCandidate]


class ComparisonRead(BaseModel):
    id: str
    name: str
    status: ComparisonStatus
    experiment: str
    model_type: ModelType | None
    metrics: list[str]
    tags: dict[str, str]
    rows: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    mlflow: MlflowLinks
    candidates: list[CandidateStatus]
    pairwise: list[PairwiseComparison] = Field(default_factory=list)
    judge_ranking: JudgeRanking | None = None
    judge_ranking_unavailable: str | None = Field(
        None,
        description="Why judge_ranking is null although pairwise_judge was asked for (e.g. the judge "
        "stayed unavailable); the comparison itself is not failed by it",
    )
    error: str | None = None
    owner: str = Field("local", description="Who submitted it: the name of its API key (usually a team)")


class DeliveryAttemptRead(BaseModel):
    at: datetime = Field(description="When the attempt started")
    status_code: int | None = Field(None, description="The receiver's HTTP status, when it answered")
    error: str | None = Field(
        None, description="Why the attempt failed: a refused address, a timeout, a non-2xx status..."
    )
    duration_ms: float = Field(description="Milliseconds from the start of the attempt to its end")


class DeliveryRead(BaseModel):
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt of this delivery")
    event: WebhookEvent
    label: str | None = Field(None, description="The candidate, for candidate.finished")
    callback: int = Field(description="Index of the callback in the comparison's callbacks")
    url: str
    state: DeliveryState = Field(
        description="pending (retries left), delivered (a 2xx came back) or failed (every retry used)"
    )
    created_at: datetime
    attempts: list[DeliveryAttemptRead]
    next_attempt_at: datetime | None = Field(None, description="When the next attempt is due, while pending")


class DeliveriesRead(BaseModel):
    deliveries: list[DeliveryRead] = Field(description="Oldest first")


class WebhookSecretRead(BaseModel):
    key_id: str = Field(description="The API key whose comparisons' deliveries this secret signs")
    secret: str = Field(description="whsec_ + base64: the HMAC-SHA256 key of webhook-signature")
    created_at: datetime
    previous_expires_at: datetime | None = Field(
        None,
        description="After a rotation, deliveries carry a second signature with the previous secret "
        "until then (WEBHOOK_SECRET_GRACE_S), so receivers can switch without missing any",
    )


class AuditRead(BaseModel):
    events: list[dict[str, str]] = Field(
        description="Oldest first: at, actor (the key's name), action (submitted, cancelled, voted, "
        "rated), key_id and details"
    )


class ComparisonPage(BaseModel):
    items: list[ComparisonRead]
    total: int
    limit: int
    offset: int


class FieldErrorRead(BaseModel):
    field: str = Field(description="Where the problem is, e.g. candidates[1].label")
    message: str = Field(description="What is wrong and how to fix it")


class ErrorRead(BaseModel):
    error: str = Field(description="invalid_request, not_found, conflict, payload_too_large, unavailable")
    message: str
    fields: list[FieldErrorRead] = Field(default_factory=list)


class CellComment(BaseModel):
    rater: str | None = None
    rating: Literal["up", "down"] | None = None
    comment: str


class CellRatings(BaseModel):
    up: int = Field(0, description="Thumbs up given to this output")
    down: int = Field(0, description="Thumbs down given to this output")
    comments: list[CellComment] = Field(default_factory=list)


class CandidateOutput(BaseModel):
    output: str | None
    scores: dict[str, float | None] = Field(default_factory=dict)
    error: str | None = Field(
        None, description="Why this row has no output (its request to the endpoint failed); else null"
    )
    ratings: CellRatings = Field(default_factory=CellRatings, description="People's ratings of this output")


class ResultRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    input: str
    reference: str | None = None
    outputs: dict[str, CandidateOutput]


class ComparisonResults(BaseModel):
    id: str
    status: ComparisonStatus
    candidates: list[str]
    rows: list[ResultRow]


class ModelRead(BaseModel):
    name: str
    description: str
    source: str
    hub_id: str | None = None
    available_offline: bool
    # Remote endpoints (source "endpoint") only; never their address or key.
    model_format: str | None = Field(
        None, description="How a candidate names a model here, e.g. endpoint:vllm-prod/<model-id>"
    )
    api: Literal["chat", "completions"] | None = None
    max_concurrency: int | None = Field(None, description="Requests in flight at once, across all workers")
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None


class MetricRead(BaseModel):
    name: str
    description: str
    group: str
    greater_is_better: bool
    needs_reference: bool
    needs_tokenizer: bool
    needs_option: str | None
    needs_judge: bool
    offline: bool
    default: bool
    custom: bool
    scale: Literal["binary", "bounded", "unbounded"] = Field(
        description="binary: every row scores 0 or 1; bounded: within min_value..max_value; "
        "unbounded: no fixed range (min_value or max_value may bound one side)"
    )
    min_value: float | None = Field(description="Lowest score a row can get, when there is one")
    max_value: float | None = Field(description="Highest score a row can get, when there is one")


def template_fields(template: str) -> set[str]:
    """Placeholders named in a prompt template (``{input}``, ``{context}``...)."""
    return set(re.findall(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})", template))


# ------------------------------------------------------------------------- human evaluation
VoteWinner = Literal["a", "b", "tie", "both_bad"]
PersonName = Annotated[str, Field(max_length=100)]


class VoteCreate(BaseModel):
    """A pairwise vote: either on a row and two labels, or on a blind matchup the server issued."""

    model_config = ConfigDict(extra="forbid")

    row: int | None = Field(
        None, strict=True, description="0-based dataset row; leave out when voting on a matchup"
    )
    a: str | None = Field(None, description="Label of one candidate; leave out when voting on a matchup")
    b: str | None = Field(None, description="Label of the other candidate; leave out with a matchup")
    matchup: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Id from POST .../arena/matchups; the server fills in row, a and b",
    )
    winner: VoteWinner = Field(description="a, b, tie, or both_bad (counted as a tie)")
    voter: PersonName | None = None


class VoteRead(BaseModel):
    id: str
    row: int
    a: str
    b: str
    winner: VoteWinner
    voter: str | None = None
    matchup: str | None = Field(None, description="The matchup voted on, if the vote was blind")
    created_at: datetime


class ArenaRank(BaseModel):
    label: str
    rank: int = Field(description="1 is best; equal scores share a rank")
    score: float = Field(description="Elo-like: 1000 + 400*log10(strength / geometric mean of strengths)")
    ci_low: float | None = Field(description="95% percentile-bootstrap interval of score; null without votes")
    ci_high: float | None
    wins: int
    losses: int
    ties: int = Field(description="Votes of tie or both_bad")
    votes: int


class AgreementRate(BaseModel):
    agree: int
    compared: int = Field(description="Votes compared (a verdict or both scores present for that row)")
    rate: float | None = Field(description="agree / compared; null when nothing was compared")


class Agreement(BaseModel):
    judge: AgreementRate | None = Field(
        description="With the judge's row-by-row verdicts; null when the comparison has none"
    )
    metrics: dict[str, AgreementRate] = Field(
        default_factory=dict, description="With each metric's per-row winner, by its direction"
    )


class VotesRead(BaseModel):
    votes: list[VoteRead]
    ranking: list[ArenaRank]
    agreement: Agreement
    method: str = Field(description="How the ranking and its intervals were computed")


class MatchupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voter: PersonName | None = None


class MatchupRead(BaseModel):
    matchup: str = Field(description="Vote on it once with POST .../votes {'matchup': ..., 'winner': ...}")
    row: int
    input: str
    reference: str | None = None
    outputs: dict[str, str] = Field(description="'a' and 'b': two candidates' outputs, labels hidden")


class RatingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    row: int = Field(strict=True, description="0-based dataset row")
    label: str
    rating: Literal["up", "down"] | None = Field(
        None, description="Null with no comment removes this rater's rating of the cell"
    )
    comment: str | None = Field(None, max_length=2000)
    rater: PersonName | None = None


class RatingRead(BaseModel):
    row: int
    label: str
    rating: Literal["up", "down"] | None
    comment: str | None = None
    rater: str | None = None
    updated_at: datetime


class RatingsRead(BaseModel):
    ratings: list[RatingRead]
