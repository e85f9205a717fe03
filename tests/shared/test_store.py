"""The Redis state store against the real Redis."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from shared.records import CandidateRecord
from shared.schemas import CandidateState, ComparisonCreate, ComparisonStatus
from shared.store import LOCAL_OWNER, ComparisonNotFound, ComparisonStore, utcnow


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
    assert record.status is ComparisonStatus.queued and record.rows == 2
    assert record.spec.experiment == "exp" and record.spec.metrics == ("exact_match",)
    assert "dataset" not in json.loads(store.r.hget(store._key("c1"), "spec"))
    assert store.rows("c1") == [{"input": "x", "reference": "y"}, {"input": "z"}]
    assert [c.status for c in store.candidates("c1", ["a", "b"])] == [CandidateState.queued] * 2
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
    assert store.get("c2").finished_at is not None


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
    assert cand.status is CandidateState.failed and cand.error == "boom"
    assert cand.started_at is not None and cand.finished_at is not None
    assert cand.started_at <= cand.finished_at


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


class TestRecords:
    """Comparisons and candidates read back as typed records; the stored hashes stay as they were."""

    def test_create_writes_the_same_hashes_as_before(self, store):
        spec = make_spec()
        store.create(comparison_id="h1", spec=spec, experiment="exp", metrics=["exact_match"], owner="team-a")
        stored = store.r.hgetall(store._key("h1"))
        assert set(stored) == {"id", "spec", "status", "created_at", "rows", "owner"}
        assert (stored["id"], stored["status"], stored["rows"], stored["owner"]) == (
            "h1",
            "queued",
            "2",
            "team-a",
        )
        # Callbacks are kept under their own key, not in the spec (shared/webhook_store.py).
        expected_spec = {
            **spec.model_dump(mode="json", exclude={"dataset", "callbacks"}),
            "experiment": "exp",
        }
        assert stored["spec"] == json.dumps({**expected_spec, "metrics": ["exact_match"]})
        assert store.r.hgetall(store._key("h1", "cand", "a")) == {
            "label": "a",
            "model": "m",
            "status": "queued",
            "done": "0",
            "total": "2",
        }

    def test_create_returns_what_get_and_candidates_read(self, store):
        record, candidates = store.create(comparison_id="h2", spec=make_spec(), experiment="e", metrics=[])
        assert record == store.get("h2")
        assert candidates == store.candidates("h2", ["a", "b"])
        assert record.labels == ["a", "b"] and record.owner == "local"
        assert (record.pairwise, record.judge_ranking, record.started_at) == ((), None, None)

    def test_the_spec_reads_back_as_it_was_stored(self, store):
        store.create(comparison_id="h3", spec=make_spec(), experiment="e", metrics=["latency"])
        spec = store.spec("h3")
        assert spec == store.get("h3").spec
        # What the start step logs to MLflow as comparison_spec.json.
        assert spec.model_dump(mode="json") == json.loads(store.r.hget(store._key("h3"), "spec"))
        assert spec.candidate("b").model == "m" and spec.candidate("b").generation.max_new_tokens == 64

    def test_written_fields_read_as_their_types(self, store):
        store.create(comparison_id="h4", spec=make_spec(), experiment="e", metrics=["exact_match"])
        store.transition("h4", ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
        store.set_fields("h4", started_at=utcnow(), experiment_id="7", parent_run_id="p1")
        store.set_fields("h4", pairwise=json.dumps([{"metric": "exact_match"}]), judge_ranking="null")
        store.transition_candidate("h4", "a", CandidateState.running, allowed_from=[CandidateState.queued])
        store.set_progress("h4", "a", done=1, total=2, tokens_per_second=12.345, eta_s=3.21)
        store.set_candidate_fields(
            "h4",
            "a",
            run_id="r1",
            worker="host:1",
            cache_hits=1,
            metrics={"exact_match": 0.5, "judge_correctness": None},
            aggregates={"exact_match": {"n": 2, "mean": 0.5, "ci_method": "wilson"}},
            metrics_unavailable={"judge_correctness": "no judge"},
            generation_started_at=utcnow(),
        )
        store.transition_candidate("h4", "a", CandidateState.succeeded, allowed_from=[CandidateState.running])
        record = store.get("h4")
        assert record.status is ComparisonStatus.running
        assert isinstance(record.started_at, datetime) and record.started_at.tzinfo is not None
        assert (record.experiment_id, record.parent_run_id) == ("7", "p1")
        assert record.pairwise == ({"metric": "exact_match"},) and record.judge_ranking is None
        a = store.candidate("h4", "a")
        assert a.status is CandidateState.succeeded and a.is_final
        assert (a.done, a.total, a.cache_hits) == (1, 2, 1)
        assert (a.tokens_per_second, a.eta_s) == (12.35, 3.2)
        assert a.metrics == {"exact_match": 0.5, "judge_correctness": None}
        assert a.aggregates["exact_match"]["ci_method"] == "wilson"
        assert a.metrics_unavailable == {"judge_correctness": "no judge"}
        assert (a.run_id, a.worker, a.error) == ("r1", "host:1", None)
        assert a.started_at is not None and a.generation_started_at is not None and a.finished_at is not None
        assert a.started_at <= a.generation_started_at <= a.finished_at

    def test_a_record_stored_before_later_fields_existed_reads_their_defaults(self, store):
        # No owner, no cache hits, and a spec without cache, pairwise_judge or tags.
        old_spec = {
            "name": "old",
            "experiment": "e",
            "model_type": None,
            "candidates": [{"label": "a", "model": "m"}, {"label": "b", "model": "m"}],
            "metrics": ["exact_match"],
        }
        created = "2024-05-01T10:00:00.000001+00:00"
        store.r.hset(
            store._key("old"),
            mapping={"id": "old", "spec": json.dumps(old_spec), "status": "succeeded", "created_at": created},
        )
        store.r.hset(store._key("old", "cand", "a"), mapping={"label": "a", "model": "m", "status": "failed"})
        record = store.get("old")
        assert record.owner == LOCAL_OWNER and record.rows == 0
        assert record.created_at == datetime(2024, 5, 1, 10, 0, 0, 1, tzinfo=UTC)
        assert (record.spec.cache, record.spec.pairwise_judge, record.spec.tags) == (True, False, {})
        assert record.spec.candidates[0].prompt_template == "{input}"
        [a] = store.candidates("old", ["a", "b"])  # b was never written
        assert a == CandidateRecord(label="a", model="m", status=CandidateState.failed)
        assert (a.metrics, a.tokens_per_second, a.started_at) == ({}, None, None)

    def test_records_are_immutable(self, store):
        record, [a, _] = store.create(comparison_id="h5", spec=make_spec(), experiment="e", metrics=[])
        with pytest.raises(FrozenInstanceError):
            record.status = ComparisonStatus.failed  # type: ignore[misc]
        with pytest.raises(FrozenInstanceError):
            a.done = 1  # type: ignore[misc]
        with pytest.raises(ValidationError):
            record.spec.name = "renamed"  # type: ignore[misc]


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
