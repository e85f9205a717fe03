"""Limits per API key and per comparison, checked before anything is queued.

A flood of submissions is refused before its body is read (429 with Retry-After); a key may
have only so many comparisons queued or running at once; and one comparison may ask for only
so much generation and judging, since both are paid in worker hours.
"""

from __future__ import annotations

import math

from services.api.auth import Principal
from services.api.errors import ApiError, FieldProblem, InvalidComparison
from shared.metrics import MetricInfo
from shared.schemas import ComparisonCreate
from shared.settings import Settings
from shared.store import ComparisonStore


class TooManyRequests(ApiError):
    status_code = 429
    code = "rate_limited"


def check_rate(principal: Principal, *, store: ComparisonStore, settings: Settings) -> None:
    if settings.auth_disabled:
        return  # one person's local stack: no keys to count against
    per_minute = principal.quotas.submissions_per_minute or settings.rate_limit_submissions_per_minute
    wait = store.take_rate_token(f"submit:{principal.key_id}", per_minute=per_minute)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise TooManyRequests(
            f"This key may submit {per_minute} comparisons a minute; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def check_running(principal: Principal, *, store: ComparisonStore, settings: Settings) -> None:
    if settings.auth_disabled:
        return
    limit = principal.quotas.max_running or settings.max_running_comparisons
    running = store.running_count(principal.key_id, limit=limit)
    if running >= limit:
        raise TooManyRequests(
            f"This key already has {running} comparisons queued or running (the limit is {limit}); "
            "wait for one to end or cancel one",
            headers={"Retry-After": "30"},
        )


def generated_tokens(spec: ComparisonCreate) -> int:
    """The most tokens a comparison can make its workers generate: rows × max_new_tokens, summed
    over candidates."""
    rows = len(spec.dataset.rows)
    return sum(rows * candidate.generation.max_new_tokens for candidate in spec.candidates)


def judge_calls(spec: ComparisonCreate, *, metrics: list[str], registry: dict[str, MetricInfo]) -> int:
    """Requests the comparison would send the LLM judge: one per row, candidate and judge metric,
    plus two per row and pair of candidates for pairwise judging (asked in both orders)."""
    rows = len(spec.dataset.rows)
    count = len(spec.candidates)
    judged = sum(1 for name in metrics if name in registry and registry[name].needs_judge)
    pairs = count * (count - 1) // 2 if spec.pairwise_judge else 0
    return rows * count * judged + 2 * rows * pairs


def check_size(
    spec: ComparisonCreate, *, metrics: list[str], registry: dict[str, MetricInfo], settings: Settings
) -> None:
    problems = []
    tokens = generated_tokens(spec)
    if tokens > settings.max_generated_tokens:
        problems.append(
            FieldProblem(
                "candidates",
                f"rows × max_new_tokens over all candidates is {tokens:,}, above the limit of "
                f"{settings.max_generated_tokens:,} (setting MAX_GENERATED_TOKENS); use fewer rows, "
                "candidates or new tokens",
            )
        )
    calls = judge_calls(spec, metrics=metrics, registry=registry)
    if calls > settings.max_judge_calls:
        problems.append(
            FieldProblem(
                "pairwise_judge" if spec.pairwise_judge else "metrics",
                f"this comparison would make {calls:,} judge calls, above the limit of "
                f"{settings.max_judge_calls:,} (setting MAX_JUDGE_CALLS); use fewer rows or judge metrics",
            )
        )
    if problems:
        raise InvalidComparison(problems)
