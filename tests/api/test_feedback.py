"""Human evaluation service functions against the real Redis, without HTTP."""

from __future__ import annotations

import math
import random

import pytest
from structlog.testing import capture_logs

from services.api import feedback
from services.api.auth import LOCAL
from services.api.errors import Conflict, NotFound
from shared.schemas import ComparisonStatus, MatchupCreate, RatingCreate, VoteCreate
from shared.store import ComparisonStore
from tests.fixtures.arena import AGREEMENT_VOTES, OUTPUTS, ROWS, RecordingPublisher, write_comparison


@pytest.fixture
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)


@pytest.fixture
def publisher():
    return RecordingPublisher()


@pytest.fixture
def cid(store):
    return write_comparison(store)


def vote(store, publisher, comparison_id, **body):
    return feedback.create_vote(
        principal=LOCAL,
        comparison_id=comparison_id,
        vote=VoteCreate(**body),
        store=store,
        publisher=publisher,
    )


def fields(exc_info) -> dict[str, str]:
    return {f.field: f.message for f in exc_info.value.fields}


class TestVote:
    def test_stored_with_id_time_and_voter(self, store, publisher, cid):
        created = vote(store, publisher, cid, row=1, a="beta", b="alpha", winner="a", voter="  ann ")
        assert (created.row, created.a, created.b, created.winner) == (1, "beta", "alpha", "a")
        assert created.voter == "ann" and created.matchup is None and len(created.id) == 32
        assert [v["id"] for v in store.votes(cid)] == [created.id]
        assert store.votes(cid)[0]["created_at"] == created.created_at.isoformat()

    def test_unknown_labels_list_the_valid_ones(self, store, publisher, cid):
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, row=0, a="zeta", b="omega", winner="a")
        assert fields(exc) == {
            "a": "unknown candidate 'zeta'; use one of the labels alpha, beta",
            "b": "unknown candidate 'omega'; use one of the labels alpha, beta",
        }
        assert exc.value.status_code == 422 and store.votes(cid) == []

    def test_same_label_twice_and_row_out_of_range(self, store, publisher, cid):
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, row=4, a="alpha", b="alpha", winner="tie")
        assert fields(exc) == {
            "row": "row 4 is out of range: use 0 to 3 (this comparison has 4 rows)",
            "b": "must differ from a: a vote compares two candidates",
        }
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, row=-1, a="alpha", b="beta", winner="tie")
        assert set(fields(exc)) == {"row"}

    def test_row_and_labels_are_needed_without_a_matchup(self, store, publisher, cid):
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, winner="a")
        assert set(fields(exc)) == {"row", "a", "b"}
        assert "unless voting on a matchup" in fields(exc)["a"]

    def test_a_failed_candidate_is_a_conflict(self, store, publisher, cid):
        with pytest.raises(Conflict) as exc:
            vote(store, publisher, cid, row=0, a="alpha", b="gamma", winner="a")
        assert set(fields(exc)) == {"status"} and "'gamma'" in fields(exc)["status"]

    @pytest.mark.parametrize(
        "status", [ComparisonStatus.running, ComparisonStatus.failed, ComparisonStatus.cancelled]
    )
    def test_only_once_the_comparison_has_ended_with_outputs(self, store, publisher, status):
        comparison_id = write_comparison(store, status=status)
        with pytest.raises(Conflict) as exc:
            vote(store, publisher, comparison_id, row=0, a="alpha", b="beta", winner="a")
        assert f"is {status.value}" in fields(exc)["status"]

    def test_unknown_comparison(self, store, publisher):
        with pytest.raises(NotFound):
            vote(store, publisher, "nope", row=0, a="alpha", b="beta", winner="a")
        with pytest.raises(NotFound):
            feedback.read_votes(principal=LOCAL, comparison_id="nope", store=store)


class TestQueueing:
    def test_a_burst_of_votes_queues_one_log_task(self, store, publisher, cid):
        for winner in ("a", "b", "tie"):
            vote(store, publisher, cid, row=0, a="alpha", b="beta", winner=winner)
        assert publisher.logged == [cid]
        # The task clears the flag first thing; the next vote queues another.
        store.release_feedback_log(cid)
        vote(store, publisher, cid, row=1, a="alpha", b="beta", winner="a")
        assert publisher.logged == [cid, cid]

    def test_a_broker_failure_keeps_the_vote_and_logs_a_warning(self, store, cid):
        with capture_logs() as logs:
            created = vote(store, RecordingPublisher(fail=True), cid, row=0, a="alpha", b="beta", winner="a")
        assert [v["id"] for v in store.votes(cid)] == [created.id]
        assert {"event": "feedback.log_not_queued", "log_level": "warning"}.items() <= logs[0].items()
        # The flag was let go, so the next vote (with the broker back) queues the logging.
        working = RecordingPublisher()
        vote(store, working, cid, row=1, a="alpha", b="beta", winner="b")
        assert working.logged == [cid]


class TestMatchups:
    def test_blind_vote_fills_in_row_and_labels(self, store, publisher, cid):
        drawn = feedback.create_matchup(
            principal=LOCAL,
            comparison_id=cid,
            request=MatchupCreate(voter="ann"),
            store=store,
            rng=random.Random(2),
        )
        assert drawn.row in (0, 1, 2)  # row 3's outputs are the same
        assert drawn.input == ROWS[drawn.row]["input"] and drawn.reference == ROWS[drawn.row]["reference"]
        shown = {drawn.outputs["a"], drawn.outputs["b"]}
        assert shown == {OUTPUTS["alpha"][drawn.row], OUTPUTS["beta"][drawn.row]}
        created = vote(store, publisher, cid, matchup=drawn.matchup, winner="b")
        # The response reveals which label was shown where.
        assert OUTPUTS[created.a][drawn.row] == drawn.outputs["a"]
        assert OUTPUTS[created.b][drawn.row] == drawn.outputs["b"]
        assert (created.row, created.matchup, created.voter) == (drawn.row, drawn.matchup, "ann")

    def test_a_matchup_takes_one_vote(self, store, publisher, cid):
        drawn = feedback.create_matchup(
            principal=LOCAL, comparison_id=cid, request=MatchupCreate(), store=store
        )
        vote(store, publisher, cid, matchup=drawn.matchup, winner="tie")
        with pytest.raises(Conflict) as exc:
            vote(store, publisher, cid, matchup=drawn.matchup, winner="a")
        assert set(fields(exc)) == {"matchup"}
        assert len(store.votes(cid)) == 1

    def test_unknown_matchup_and_row_or_labels_alongside_one(self, store, publisher, cid):
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, matchup="not-issued", winner="a")
        assert set(fields(exc)) == {"matchup"} and "POST /v1/comparisons/" in fields(exc)["matchup"]
        drawn = feedback.create_matchup(
            principal=LOCAL, comparison_id=cid, request=MatchupCreate(), store=store
        )
        with pytest.raises(feedback.InvalidFeedback) as exc:
            vote(store, publisher, cid, matchup=drawn.matchup, row=0, a="alpha", winner="a")
        assert set(fields(exc)) == {"row", "a"}
        # The refused request did not use the matchup up.
        assert vote(store, publisher, cid, matchup=drawn.matchup, winner="a").matchup == drawn.matchup

    def test_the_voters_judged_rows_come_last(self, store, publisher, cid):
        for row in (0, 1):
            vote(store, publisher, cid, row=row, a="alpha", b="beta", winner="a", voter="ann")
        for seed in range(5):
            drawn = feedback.create_matchup(
                principal=LOCAL,
                comparison_id=cid,
                request=MatchupCreate(voter="ann"),
                store=store,
                rng=random.Random(seed),
            )
            assert drawn.row == 2

    def test_needs_two_succeeded_candidates(self, store):
        comparison_id = write_comparison(store)
        store.r.delete(store._key(comparison_id, "out", "beta"))
        with pytest.raises(Conflict) as exc:
            feedback.create_matchup(
                principal=LOCAL, comparison_id=comparison_id, request=MatchupCreate(), store=store
            )
        assert "needs two" in fields(exc)["status"]


class TestReadVotes:
    def test_ranking_and_agreement_by_hand(self, store, publisher, cid):
        for body in AGREEMENT_VOTES:
            vote(store, publisher, cid, **body)
        read = feedback.read_votes(principal=LOCAL, comparison_id=cid, store=store)
        assert [v.winner for v in read.votes] == ["a", "a", "b", "both_bad", "tie"]
        # alpha: 1 win, 2 losses, 2 ties; beta the reverse. With the prior, strengths 2.5 : 3.5.
        assert [(r.label, r.rank, r.wins, r.losses, r.ties, r.votes) for r in read.ranking] == [
            ("beta", 1, 2, 1, 2, 5),
            ("alpha", 2, 1, 2, 2, 5),
        ]
        assert read.ranking[0].score == pytest.approx(1000 + 200 * math.log10(3.5 / 2.5))
        for rank in read.ranking:
            assert rank.ci_low is not None and rank.ci_high is not None
            assert rank.ci_low <= rank.score <= rank.ci_high
        assert read.agreement.judge is not None
        assert read.agreement.judge.model_dump() == {"agree": 4, "compared": 5, "rate": 0.8}
        assert {k: v.model_dump() for k, v in read.agreement.metrics.items()} == {
            "exact_match": {"agree": 2, "compared": 4, "rate": 0.5},
            "output_words": {"agree": 1, "compared": 5, "rate": 0.2},
        }
        assert "Bradley-Terry" in read.method and "bootstrap" in read.method

    def test_no_votes_and_no_judge(self, store):
        comparison_id = write_comparison(store, judge=False)
        read = feedback.read_votes(principal=LOCAL, comparison_id=comparison_id, store=store)
        assert read.votes == [] and read.agreement.judge is None
        assert [(r.label, r.score, r.ci_low, r.ci_high) for r in read.ranking] == [
            ("alpha", 1000.0, None, None),
            ("beta", 1000.0, None, None),
        ]
        assert {k: v.rate for k, v in read.agreement.metrics.items()} == {
            "exact_match": None,
            "output_words": None,
        }


class TestRatings:
    def rate(self, store, publisher, comparison_id, **body):
        return feedback.set_rating(
            principal=LOCAL,
            comparison_id=comparison_id,
            rating=RatingCreate(**body),
            store=store,
            publisher=publisher,
        )

    def test_replace_clear_and_order(self, store, publisher, cid):
        self.rate(store, publisher, cid, row=2, label="alpha", rating="up")
        self.rate(
            store, publisher, cid, row=0, label="beta", rating="down", comment="wrong city", rater="ann"
        )
        self.rate(store, publisher, cid, row=0, label="alpha", rating="up", rater="ann")
        self.rate(store, publisher, cid, row=0, label="beta", rating="up", rater="ann")  # replaces
        cleared = self.rate(store, publisher, cid, row=2, label="alpha", rating=None, comment="   ")
        assert (cleared.rating, cleared.comment, cleared.rater) == (None, None, None)
        ratings = feedback.read_ratings(principal=LOCAL, comparison_id=cid, store=store).ratings
        assert [(r.row, r.label, r.rating, r.comment, r.rater) for r in ratings] == [
            (0, "alpha", "up", None, "ann"),
            (0, "beta", "up", None, "ann"),
        ]
        assert publisher.logged == [cid]

    def test_bad_cells_and_failed_candidates(self, store, publisher, cid):
        with pytest.raises(feedback.InvalidFeedback) as exc:
            self.rate(store, publisher, cid, row=9, label="delta", rating="up")
        assert fields(exc) == {
            "row": "row 9 is out of range: use 0 to 3 (this comparison has 4 rows)",
            "label": "unknown candidate 'delta'; use one of the labels alpha, beta",
        }
        with pytest.raises(Conflict):
            self.rate(store, publisher, cid, row=0, label="gamma", rating="up")
        assert store.ratings(cid) == []
