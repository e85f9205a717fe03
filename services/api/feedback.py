"""Human evaluation: pairwise votes (blind, Chatbot Arena style, or on a chosen row and pair)
and ratings of single output cells, as plain functions the routes call and tests call directly.

Votes and ratings are stored with the comparison in Redis. After each one a task is queued that
mirrors them to the comparison's MLflow parent run; a Redis flag collapses a burst of votes into
one queued task, which clears the flag before it reads.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from services.api.auth import Principal
from services.api.errors import Conflict, FieldProblem, InvalidRequest
from services.api.queue import Publisher, QueueUnavailable
from services.api.service import load_owned
from shared.arena import draw_matchup, encode_votes, judge_agreement, metric_agreement
from shared.metrics import metric_registry
from shared.ranking import ARENA_METHOD, arena_ranking
from shared.records import ComparisonRecord
from shared.schemas import (
    CandidateState,
    ComparisonStatus,
    MatchupCreate,
    MatchupRead,
    RatingCreate,
    RatingRead,
    RatingsRead,
    VoteCreate,
    VoteRead,
    VotesRead,
)
from shared.store import ComparisonStore, utcnow

log = structlog.get_logger()

# Votes and ratings need every output in place: only a comparison that ended with some.
OPEN_STATUSES = frozenset({ComparisonStatus.succeeded, ComparisonStatus.partially_failed})


class InvalidFeedback(InvalidRequest):
    outcome = "Nothing was recorded."


@dataclass(frozen=True)
class _Open:
    """A comparison that takes votes and ratings."""

    record: ComparisonRecord
    succeeded: list[str]

    @property
    def rows(self) -> int:
        return self.record.rows

    @property
    def labels(self) -> list[str]:
        return self.record.labels


def _succeeded(store: ComparisonStore, comparison_id: str, labels: list[str]) -> list[str]:
    return [c.label for c in store.candidates(comparison_id, labels) if c.status is CandidateState.succeeded]


def _open(store: ComparisonStore, comparison_id: str, principal: Principal) -> _Open:
    record = load_owned(store, comparison_id, principal)
    status = record.status
    if status not in OPEN_STATUSES:
        message = (
            f"comparison {comparison_id} is {status.value}; votes and ratings are taken once it has "
            "ended with outputs (succeeded or partially_failed)"
        )
        raise Conflict(message, fields=[FieldProblem("status", message)])
    return _Open(record=record, succeeded=_succeeded(store, comparison_id, record.labels))


def _person(name: str | None) -> str | None:
    return (name or "").strip() or None


def _row_problem(row: int | None, rows: int, *, required: str) -> FieldProblem | None:
    if row is None:
        return FieldProblem("row", f"this field is required {required}: a 0-based dataset row")
    if not 0 <= row < rows:
        return FieldProblem(
            "row", f"row {row} is out of range: use 0 to {rows - 1} (this comparison has {rows} rows)"
        )
    return None


def _label_problem(field: str, label: str | None, ended: _Open, *, required: str) -> FieldProblem | None:
    valid = ", ".join(ended.succeeded) or "none"
    if label is None:
        return FieldProblem(field, f"this field is required {required}: one of the labels {valid}")
    if label not in ended.labels:
        return FieldProblem(field, f"unknown candidate {label!r}; use one of the labels {valid}")
    return None


def _require_succeeded(ended: _Open, comparison_id: str, labels: Sequence[str]) -> None:
    """A known candidate that did not succeed has no outputs to judge: a conflict, not a typo."""
    for label in labels:
        if label not in ended.succeeded:
            message = (
                f"candidate {label!r} of comparison {comparison_id} did not succeed, so it has no "
                f"outputs to judge; use one of {', '.join(ended.succeeded) or 'none'}"
            )
            raise Conflict(message, fields=[FieldProblem("status", message)])


def _queue_log(store: ComparisonStore, publisher: Publisher, comparison_id: str) -> None:
    if not store.claim_feedback_log(comparison_id):
        return  # a queued task has not started yet and will read this one too
    try:
        publisher.log_feedback(comparison_id)
    except QueueUnavailable as exc:
        # The vote is stored; MLflow catches up with the next vote that gets queued.
        store.release_feedback_log(comparison_id)
        log.warning("feedback.log_not_queued", comparison_id=comparison_id, error=str(exc))


# ---------------------------------------------------------------------------------------- votes
def create_vote(
    *,
    comparison_id: str,
    vote: VoteCreate,
    store: ComparisonStore,
    publisher: Publisher,
    principal: Principal,
) -> VoteRead:
    ended = _open(store, comparison_id, principal)
    voter = _person(vote.voter)
    if vote.matchup is not None:
        given = [name for name in ("row", "a", "b") if getattr(vote, name) is not None]
        if given:
            raise InvalidFeedback(
                [
                    FieldProblem(
                        name, "leave it out when voting on a matchup: the server fills in row, a and b"
                    )
                    for name in given
                ]
            )
        taken = store.take_matchup(comparison_id, vote.matchup)
        if taken is None:
            raise InvalidFeedback(
                [
                    FieldProblem(
                        "matchup",
                        f"no matchup {vote.matchup!r} for this comparison (unknown, or expired after a "
                        f"day); ask for one with POST /v1/comparisons/{comparison_id}/arena/matchups",
                    )
                ]
            )
        drawn, first = taken
        if not first:
            message = "this matchup already has its vote; ask for a new matchup"
            raise Conflict(
                f"Matchup {vote.matchup} was already voted on", fields=[FieldProblem("matchup", message)]
            )
        row, a, b = int(drawn["row"]), str(drawn["a"]), str(drawn["b"])
        voter = voter or drawn.get("voter")
    else:
        required = "unless voting on a matchup"
        problems = [
            problem
            for problem in (
                _row_problem(vote.row, ended.rows, required=required),
                _label_problem("a", vote.a, ended, required=required),
                _label_problem("b", vote.b, ended, required=required),
            )
            if problem is not None
        ]
        if vote.a is not None and vote.a == vote.b and vote.a in ended.labels:
            problems.append(FieldProblem("b", "must differ from a: a vote compares two candidates"))
        if problems:
            raise InvalidFeedback(problems)
        # Guaranteed by the checks above; tells the type checker so.
        assert vote.row is not None and vote.a is not None and vote.b is not None
        _require_succeeded(ended, comparison_id, [vote.a, vote.b])
        row, a, b = vote.row, vote.a, vote.b
    entry = {
        "id": uuid.uuid4().hex,
        "row": row,
        "a": a,
        "b": b,
        "winner": vote.winner,
        "voter": voter,
        "matchup": vote.matchup,
        "created_at": utcnow(),
    }
    count = store.add_vote(comparison_id, entry)
    store.audit(
        comparison_id,
        actor=principal.name,
        action="voted",
        key_id=principal.key_id,
        vote=entry["id"],
        voter=voter,
    )
    _queue_log(store, publisher, comparison_id)
    log.info("feedback.vote", comparison_id=comparison_id, row=row, a=a, b=b, winner=vote.winner, votes=count)
    return VoteRead.model_validate(entry)


def create_matchup(
    *,
    comparison_id: str,
    request: MatchupCreate,
    store: ComparisonStore,
    principal: Principal,
    rng: random.Random | None = None,
) -> MatchupRead:
    """Two candidates' outputs for one row, labels hidden and order random; the server keeps
    which label is which for a day, for the one vote the matchup can take."""
    ended = _open(store, comparison_id, principal)
    voter = _person(request.voter)
    outputs: dict[str, list[str | None]] = {}
    for label in ended.succeeded:
        produced = store.outputs(comparison_id, label)
        if produced is not None:
            outputs[label] = [entry.get("output") for entry in produced]
    drawn = draw_matchup(
        outputs=outputs,
        rows=ended.rows,
        votes=store.votes(comparison_id),
        voter=voter,
        rng=rng or random.Random(),
    )
    if drawn is None:
        message = (
            f"comparison {comparison_id} has {len(outputs)} succeeded candidate(s) with outputs; "
            "a matchup needs two"
        )
        raise Conflict(message, fields=[FieldProblem("status", message)])
    matchup_id = uuid.uuid4().hex
    store.save_matchup(
        comparison_id,
        matchup_id,
        {"row": drawn.row, "a": drawn.a, "b": drawn.b, "voter": voter, "created_at": utcnow()},
    )
    row = store.rows(comparison_id)[drawn.row]
    reference = row.get("reference")
    return MatchupRead(
        matchup=matchup_id,
        row=drawn.row,
        input=str(row.get("input", "")),
        reference=None if reference is None else str(reference),
        outputs={"a": _output(outputs[drawn.a], drawn.row), "b": _output(outputs[drawn.b], drawn.row)},
    )


def _output(produced: list[str | None], row: int) -> str:
    return (produced[row] if row < len(produced) else None) or ""


def read_votes(*, comparison_id: str, store: ComparisonStore, principal: Principal) -> VotesRead:
    """Every vote, the candidates ranked by them, and how they agree with the judge and metrics."""
    record = load_owned(store, comparison_id, principal)
    succeeded = _succeeded(store, comparison_id, record.labels)
    votes = store.votes(comparison_id)
    ranking = arena_ranking(succeeded, [(v["a"], v["b"], v["winner"]) for v in votes])

    encoded = encode_votes(votes, succeeded, record.rows)
    judge_ranking = record.judge_ranking
    registry = metric_registry(store)
    metrics = [m for m in record.spec.metrics if m in registry]
    scores: dict[str, dict[str, list[Any]]] = {metric: {} for metric in metrics}
    if metrics and votes:
        for label in succeeded:
            produced = store.outputs(comparison_id, label) or []
            for metric in metrics:
                scores[metric][label] = [(entry.get("scores") or {}).get(metric) for entry in produced]
    # One validation pass over the whole answer, thousands of votes included.
    return VotesRead.model_validate(
        {
            "votes": votes,
            "ranking": ranking,
            "agreement": {
                "judge": judge_agreement(encoded, judge_ranking.get("rows") or []) if judge_ranking else None,
                "metrics": {
                    metric: metric_agreement(
                        encoded, scores[metric], greater_is_better=registry[metric].greater_is_better
                    )
                    for metric in metrics
                },
            },
            "method": ARENA_METHOD,
        }
    )


# -------------------------------------------------------------------------------------- ratings
def set_rating(
    *,
    comparison_id: str,
    rating: RatingCreate,
    store: ComparisonStore,
    publisher: Publisher,
    principal: Principal,
) -> RatingRead:
    """Rate one output cell (row, label); one rating per rater, a later one replacing it. A null
    rating with no comment removes it (the cleared entry is returned)."""
    ended = _open(store, comparison_id, principal)
    required = "to rate a cell"
    problems = [
        problem
        for problem in (
            _row_problem(rating.row, ended.rows, required=required),
            _label_problem("label", rating.label, ended, required=required),
        )
        if problem is not None
    ]
    if problems:
        raise InvalidFeedback(problems)
    _require_succeeded(ended, comparison_id, [rating.label])
    comment = rating.comment if rating.comment and rating.comment.strip() else None
    entry = {
        "row": rating.row,
        "label": rating.label,
        "rating": rating.rating,
        "comment": comment,
        "rater": _person(rating.rater),
        "updated_at": utcnow(),
    }
    store.set_rating(comparison_id, entry)
    store.audit(
        comparison_id,
        actor=principal.name,
        action="rated",
        key_id=principal.key_id,
        row=rating.row,
        label=rating.label,
        rating=rating.rating or "cleared",
        rater=entry["rater"],
    )
    _queue_log(store, publisher, comparison_id)
    log.info("feedback.rating", comparison_id=comparison_id, row=rating.row, label=rating.label)
    return RatingRead.model_validate(entry)


def read_ratings(*, comparison_id: str, store: ComparisonStore, principal: Principal) -> RatingsRead:
    load_owned(store, comparison_id, principal)
    return RatingsRead(ratings=[RatingRead.model_validate(r) for r in store.ratings(comparison_id)])
