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
