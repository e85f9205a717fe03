"""The Redis state store against the real Redis."""

from __future__ import annotations

import pytest

from shared.schemas import CandidateState, ComparisonCreate, ComparisonStatus
from shared.store import ComparisonNotFound, ComparisonStore


@pytest.fixture
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)


def make_spec() -> ComparisonCreate:
    return ComparisonCreate.model_validate(
        {
            "candidates": [{"label": "a", "model": "m"}, {"label": "b", "model": "m"}],
            "dataset": {"rows": [{"input": "x", "reference": "y"}, {"input": "z"}]},
        }
    )


def test_create_and_read(store):
    store.create(comparison_id="c1", spec=make_spec(), experiment="exp", metrics=["exact_match"])
    record = store.get("c1")
    assert record["status"] == "queued" and record["rows"] == 2
    assert record["spec"]["experiment"] == "exp" and record["spec"]["metrics"] == ["exact_match"]
    assert "dataset" not in record["spec"]
    assert store.rows("c1") == [{"input": "x", "reference": "y"}, {"input": "z"}]
    assert [c["status"] for c in store.candidates("c1", ["a", "b"])] == ["queued", "queued"]
    assert 0 < store.r.ttl(store._key("c1")) <= 600


def test_missing_comparison(store):
    with pytest.raises(ComparisonNotFound):
        store.get("nope")


def test_transitions_are_compare_and_set(store):
    store.create(comparison_id="c2", spec=make_spec(), experiment="e", metrics=[])
    assert store.transition("c2", ComparisonStatus.cancelled, allowed_from=[ComparisonStatus.queued])
    # A worker that starts late must not revive a cancelled comparison.
    assert not store.transition("c2", ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
    assert store.status("c2") is ComparisonStatus.cancelled
    assert store.get("c2")["finished_at"]


def test_candidate_transitions_record_times_and_fields(store):
    store.create(comparison_id="c3", spec=make_spec(), experiment="e", metrics=[])
    assert store.transition_candidate("c3", "a", CandidateState.running, allowed_from=[CandidateState.queued])
    assert store.transition_candidate(
        "c3", "a", CandidateState.failed, allowed_from=[CandidateState.running], error="boom"
    )
    assert not store.transition_candidate(
        "c3", "a", CandidateState.succeeded, allowed_from=[CandidateState.running]
    )
    cand = store.candidate("c3", "a")
    assert cand["status"] == "failed" and cand["error"] == "boom"
    assert cand["started_at"] <= cand["finished_at"]


def test_mark_ended_counts_each_label_once(store):
    store.create(comparison_id="c4", spec=make_spec(), experiment="e", metrics=[])
    assert store.mark_ended("c4", "a") == (True, 1)
    assert store.mark_ended("c4", "a") == (False, 1)  # a redelivered task
    assert store.mark_ended("c4", "b") == (True, 2)


def test_listing_newest_first_with_status_filter(store):
    for i in range(3):
        store.create(comparison_id=f"l{i}", spec=make_spec(), experiment="e", metrics=[])
    store.transition("l1", ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
    ids, total = store.list_ids(status=None, limit=2, offset=0)
    assert (ids, total) == (["l2", "l1"], 3)
    assert store.list_ids(status=None, limit=2, offset=2) == (["l0"], 3)
    assert store.list_ids(status=ComparisonStatus.running, limit=10, offset=0) == (["l1"], 1)


class TestHumanEvaluation:
    def test_votes_keep_their_order_and_expire_with_the_comparison(self, store):
        assert store.votes("v1") == []
        assert store.add_vote("v1", {"id": "1", "row": 0, "winner": "a"}) == 1
        assert store.add_vote("v1", {"id": "2", "row": 1, "winner": "tie"}) == 2
        assert [v["id"] for v in store.votes("v1")] == ["1", "2"]
        assert 0 < store.r.ttl(store._key("v1", "votes")) <= 600

    def test_one_rating_per_cell_and_rater_replaced_then_removed(self, store):
        def rating(row, label, rater, value, comment=None):
            return {"row": row, "label": label, "rater": rater, "rating": value, "comment": comment}

        store.set_rating("r1", rating(1, "b", None, "up"))
        store.set_rating("r1", rating(0, "b", "ann", "down"))
        store.set_rating("r1", rating(0, "a", "ann", "up"))
        store.set_rating("r1", rating(0, "a", "bob", "up"))
        store.set_rating("r1", rating(0, "a", "ann", "down", "too long"))  # replaces ann's
        assert [(r["row"], r["label"], r["rater"], r["rating"]) for r in store.ratings("r1")] == [
            (0, "a", "ann", "down"),
            (0, "a", "bob", "up"),
            (0, "b", "ann", "down"),
            (1, "b", None, "up"),
        ]
        store.set_rating("r1", rating(0, "a", "ann", None, "just a note"))  # a comment alone stays
        store.set_rating("r1", rating(0, "a", "bob", None))  # neither: removed
        assert [
            (r["rater"], r["rating"], r["comment"]) for r in store.ratings("r1") if r["label"] == "a"
        ] == [("ann", None, "just a note")]
        assert 0 < store.r.ttl(store._key("r1", "ratings")) <= 600

    def test_a_matchup_is_taken_once(self, store):
        store.save_matchup("m1", "mid", {"row": 2, "a": "x", "b": "y", "voter": None}, ttl_s=60)
        assert 0 < store.r.ttl(store._key("m1", "matchup", "mid")) <= 60
        assert store.take_matchup("m1", "mid") == ({"row": 2, "a": "x", "b": "y", "voter": None}, True)
        assert store.take_matchup("m1", "mid") == ({"row": 2, "a": "x", "b": "y", "voter": None}, False)
        assert store.take_matchup("m1", "other") is None
        assert store.take_matchup("other", "mid") is None

    def test_the_feedback_log_flag_collapses_bursts(self, store):
        assert store.claim_feedback_log("f1") is True
        assert store.claim_feedback_log("f1") is False
        assert 0 < store.r.ttl(store._key("f1", "feedback_log")) <= 600
        store.release_feedback_log("f1")
        assert store.claim_feedback_log("f1") is True
