"""Human evaluation endpoints: thin adapters from HTTP to ``services.api.feedback``."""

from __future__ import annotations

from fastapi import APIRouter

from services.api import feedback
from services.api.auth import AUTH_RESPONSES, ReaderDep, SubmitterDep
from services.api.deps import PublisherDep, StoreDep
from services.api.errors import refusing_route
from shared.schemas import (
    ErrorRead,
    MatchupCreate,
    MatchupRead,
    RatingCreate,
    RatingRead,
    RatingsRead,
    VoteCreate,
    VoteRead,
    VotesRead,
)

router = APIRouter(
    prefix="/v1/comparisons",
    tags=["human evaluation"],
    route_class=refusing_route(feedback.InvalidFeedback),
    responses={
        **AUTH_RESPONSES,
        404: {"model": ErrorRead, "description": "No such comparison"},
        409: {
            "model": ErrorRead,
            "description": "The comparison has not ended with outputs, the candidate did not succeed, "
            "or the matchup already has its vote",
        },
        422: {"model": ErrorRead, "description": "Invalid request: every offending field, with the fix"},
        503: {"model": ErrorRead, "description": "Redis is unavailable; nothing was recorded"},
    },
)


@router.post(
    "/{comparison_id}/votes",
    status_code=201,
    response_model=VoteRead,
    summary="Vote on two outputs of one row: by row and labels, or on a blind matchup",
)
def create_vote(
    comparison_id: str, vote: VoteCreate, store: StoreDep, publisher: PublisherDep, principal: SubmitterDep
) -> VoteRead:
    return feedback.create_vote(
        comparison_id=comparison_id, vote=vote, store=store, publisher=publisher, principal=principal
    )


@router.get(
    "/{comparison_id}/votes",
    response_model=VotesRead,
    summary="Every vote, the arena ranking with intervals, and agreement with the judge and metrics",
)
def read_votes(comparison_id: str, store: StoreDep, principal: ReaderDep) -> VotesRead:
    return feedback.read_votes(comparison_id=comparison_id, store=store, principal=principal)


@router.post(
    "/{comparison_id}/arena/matchups",
    status_code=201,
    response_model=MatchupRead,
    summary="Two candidates' outputs for one row, labels hidden, to vote on once",
)
def create_matchup(
    comparison_id: str, store: StoreDep, principal: SubmitterDep, request: MatchupCreate | None = None
) -> MatchupRead:
    return feedback.create_matchup(
        comparison_id=comparison_id, request=request or MatchupCreate(), store=store, principal=principal
    )


@router.post(
    "/{comparison_id}/ratings",
    status_code=201,
    response_model=RatingRead,
    summary="Rate one output cell up or down, with a comment; null with no comment removes it",
)
def set_rating(
    comparison_id: str,
    rating: RatingCreate,
    store: StoreDep,
    publisher: PublisherDep,
    principal: SubmitterDep,
) -> RatingRead:
    return feedback.set_rating(
        comparison_id=comparison_id, rating=rating, store=store, publisher=publisher, principal=principal
    )


@router.get("/{comparison_id}/ratings", response_model=RatingsRead, summary="Every rating, by row then label")
def read_ratings(comparison_id: str, store: StoreDep, principal: ReaderDep) -> RatingsRead:
    return feedback.read_ratings(comparison_id=comparison_id, store=store, principal=principal)
