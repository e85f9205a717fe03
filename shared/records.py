"""What ComparisonStore reads back from Redis: a comparison, what was asked of it, its candidates.

The store decodes the hashes into these once (shared/store.py); the gateway and the workers
read attributes, never the stored strings. Records are snapshots: a write goes through the
store's methods, and a fresh read shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.schemas import (
    FINAL_CANDIDATE_STATES,
    CandidateSpec,
    CandidateState,
    ComparisonStatus,
    ModelType,
)


class ComparisonSpec(BaseModel):
    """What was asked for, as stored: the ComparisonCreate without its rows (kept apart), with the
    experiment and metrics the gateway settled on. Fields of the request added since a record
    was stored read as the request's defaults."""

    model_config = ConfigDict(frozen=True)

    name: str = "comparison"
    experiment: str
    model_type: ModelType | None = None
    candidates: tuple[CandidateSpec, ...]
    metrics: tuple[str, ...]
    regex: str | None = None
    judge_rubric: str | None = None
    cache: bool = True
    pairwise_judge: bool = False
    tags: dict[str, str] = {}

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.candidates]

    def candidate(self, label: str) -> CandidateSpec:
        return next(c for c in self.candidates if c.label == label)


@dataclass(frozen=True)
class ComparisonRecord:
    id: str
    spec: ComparisonSpec
    status: ComparisonStatus
    created_at: datetime
    # Who submitted it: its API key's name (LOCAL_OWNER with auth off, or stored before owners).
    owner: str
    rows: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # When the summary step ran to its end (the MLflow parent run is no longer RUNNING).
    finalized_at: datetime | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    error: str | None = None
    # JSON as the summary step wrote it; the gateway validates it into its response models.
    pairwise: tuple[Mapping[str, Any], ...] = ()
    judge_ranking: Mapping[str, Any] | None = None
    judge_ranking_unavailable: str | None = None

    @property
    def labels(self) -> list[str]:
        return self.spec.labels


@dataclass(frozen=True)
class CandidateRecord:
    label: str
    model: str
    status: CandidateState
    done: int = 0
    total: int = 0
    tokens_per_second: float | None = None
    eta_s: float | None = None
    cache_hits: int = 0
    # Null for a metric that could not be scored (see metrics_unavailable).
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    aggregates: Mapping[str, Mapping[str, float | str]] = field(default_factory=dict)
    metrics_unavailable: Mapping[str, str] = field(default_factory=dict)
    run_id: str | None = None
    # host:pid of the worker process that ran it.
    worker: str | None = None
    # Endpoint candidates: rows that failed after their retries, and usage, cost and speed totals.
    rows_failed: int = 0
    totals: Mapping[str, float | None] = field(default_factory=dict)
    error: str | None = None
    started_at: datetime | None = None
    generation_started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_CANDIDATE_STATES


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at calling a receiver back: its status code, or why it failed."""

    at: datetime
    duration_ms: float
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class DeliveryRecord:
    """One event for one callback: the body as it was when the event happened, signed afresh on
    every attempt with the secrets of the key that submitted the comparison."""

    webhook_id: str
    comparison_id: str
    event: str
    callback: int
    url: str
    key_id: str
    body: str
    created_at: datetime
    state: str = "pending"
    label: str | None = None
    attempts: tuple[DeliveryAttempt, ...] = ()
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class WebhookSecretRecord:
    """An API key's signing secret, and the one it replaced while that one is still in use."""

    secret: str
    created_at: datetime
    previous: str | None = None
    previous_expires_at: datetime | None = None

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets a delivery is signed with now: the current one, then the previous one
        during its grace period."""
        keep_previous = self.previous and self.previous_expires_at and self.previous_expires_at > now
        return [self.secret, self.previous] if keep_previous and self.previous else [self.secret]
