"""The comparison index (P:cmps) is pruned of comparisons whose record is gone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.schemas import ComparisonCreate, ComparisonStatus
from shared.store import ComparisonStore

TTL_S = 600


@pytest.fixture
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=TTL_S)


def make(store: ComparisonStore, comparison_id: str) -> None:
    spec = ComparisonCreate.model_validate(
        {
            "candidates": [{"label": "a", "model": "m"}, {"label": "b", "model": "m"}],
            "dataset": {"rows": [{"input": "x"}]},
        }
    )
    store.create(comparison_id=comparison_id, spec=spec, experiment="e", metrics=[])


def test_entries_whose_record_is_gone_are_pruned_when_listing(store):
    for cid in ("c1", "c2", "c3"):
        make(store, cid)
    store.r.delete(store._key("c2"))  # expired, evicted or deleted
    ids, total = store.list_ids(status=None, limit=10, offset=0)
    assert (ids, total) == (["c3", "c1"], 2)
    assert store.r.zrange(store._index, 0, -1) == ["c1", "c3"]


def test_entries_older_than_the_ttl_are_dropped(store):
    make(store, "fresh")
    make(store, "old")
    # An entry whose record outlived its TTL by the index's clock (its score is its creation).
    store.r.zadd(store._index, {"old": datetime.now(UTC).timestamp() - TTL_S - 60})
    ids, total = store.list_ids(status=ComparisonStatus.queued, limit=10, offset=0)
    assert (ids, total) == (["fresh"], 1)
    assert store.r.zrange(store._index, 0, -1) == ["fresh"]


def test_pages_and_totals_count_only_live_comparisons(store):
    for i in range(6):
        make(store, f"c{i}")
    for gone in ("c5", "c4", "c1"):
        store.r.delete(store._key(gone))
    # Gone records never show on a page. Without a status filter only the listed page is
    # checked (the pages poll this every few seconds), so a record removed by something other
    # than its expiry (expired ones are trimmed by score) is counted until its page is listed.
    assert store.list_ids(status=None, limit=2, offset=0) == (["c3", "c2"], 4)
    assert store.list_ids(status=None, limit=2, offset=2) == (["c0"], 3)
    assert store.list_ids(status=None, limit=2, offset=0) == (["c3", "c2"], 3)
    # A status filter reads every entry, so it is exact at once.
    store.r.delete(store._key("c3"))
    assert store.list_ids(status=ComparisonStatus.queued, limit=10, offset=0) == (["c2", "c0"], 2)


def test_a_member_that_names_no_comparison_is_pruned(store):
    make(store, "c1")
    store.r.zadd(store._index, {"x:rows": datetime.now(UTC).timestamp()})
    assert store.list_ids(status=None, limit=10, offset=0) == (["c1"], 1)
    assert store.r.zrange(store._index, 0, -1) == ["c1"]


def test_a_page_of_records_with_their_candidates_skips_what_expired(store):
    for cid in ("c1", "c2", "c3"):
        make(store, cid)
    store.set_progress("c3", "b", done=1, total=1, tokens_per_second=None)
    store.r.delete(store._key("c2"))  # expired between the index read and this one
    page = store.many(["c3", "c2", "c1"])
    assert [record.id for record, _ in page] == ["c3", "c1"]
    assert [[c.label for c in candidates] for _, candidates in page] == [["a", "b"], ["a", "b"]]
    assert page[0][1][1].done == 1 and page[1][1][1].done == 0
