"""Response-cache keys decide exactly what may be reused; the cache itself runs on real Redis."""

from __future__ import annotations

import pytest

from services.worker.generation import Generated
from services.worker.models import LoadedModel
from services.worker.response_cache import ResponseCache, cache_keys
from shared.schemas import CandidateSpec
from shared.sources import classify_model


def loaded(resolved: str = "model.gguf sha256:abc", dtype: str = "float32") -> LoadedModel:
    return LoadedModel(
        model=None,
        tokenizer=None,
        source=classify_model("smollm2-135m-instruct"),
        resolved=resolved,
        device="cpu",
        dtype=dtype,
        is_seq2seq=False,
    )


def spec(**generation) -> CandidateSpec:
    return CandidateSpec(label="a", model="smollm2-135m-instruct", generation=generation)


def test_same_inputs_same_keys_and_each_input_matters():
    base = cache_keys(candidate=spec(), loaded=loaded(), prompts=["p1", "p2"], chat=True)
    assert base == cache_keys(candidate=spec(), loaded=loaded(), prompts=["p1", "p2"], chat=True)
    assert len(set(base)) == 2
    variants = [
        cache_keys(candidate=spec(max_new_tokens=65), loaded=loaded(), prompts=["p1"], chat=True),
        cache_keys(
            candidate=spec(), loaded=loaded(resolved="model.gguf sha256:def"), prompts=["p1"], chat=True
        ),
        cache_keys(candidate=spec(), loaded=loaded(dtype="bfloat16"), prompts=["p1"], chat=True),
        cache_keys(candidate=spec(), loaded=loaded(), prompts=["p1"], chat=False),
        cache_keys(
            candidate=CandidateSpec(label="b", model="smollm2-135m-instruct", system_prompt="Be brief."),
            loaded=loaded(),
            prompts=["p1"],
            chat=True,
        ),
    ]
    assert all(v[0] != base[0] for v in variants)
    # The label is not part of what decides an output: another candidate can reuse it.
    other_label = CandidateSpec(label="zzz", model="smollm2-135m-instruct")
    assert cache_keys(candidate=other_label, loaded=loaded(), prompts=["p1"], chat=True)[0] == base[0]


def test_repeated_prompts_share_a_key_when_greedy_but_not_when_sampling():
    greedy = cache_keys(candidate=spec(), loaded=loaded(), prompts=["p", "p"], chat=True)
    assert greedy[0] == greedy[1]
    sampled = cache_keys(candidate=spec(do_sample=True), loaded=loaded(), prompts=["p", "p", "q"], chat=True)
    assert len(set(sampled)) == 3


@pytest.fixture
def cache(redis_client, redis_prefix):
    return ResponseCache(redis_client, prefix=redis_prefix, ttl_s=60)


def test_round_trip_on_redis(cache, redis_client):
    cache.put_many({"k1": Generated("hello", 2, 0.25)})
    assert cache.get_many(["k1", "k2"]) == [Generated("hello", 2, 0.25), None]
    assert 0 < redis_client.ttl(f"{cache.prefix}:gen:k1") <= 60
    assert cache.get_many([]) == []


def test_cached_rows_keep_their_own_latency(cache):
    batch = {"k1": Generated("Paris", 2, 0.125), "k2": Generated("It is Rome, I think", 6, 0.375)}
    cache.put_many(batch)
    assert [g.latency_s for g in cache.get_many(["k2", "k1"])] == [0.375, 0.125]


def test_entries_from_before_per_row_latency_are_not_reused(monkeypatch):
    from services.worker import response_cache

    current = cache_keys(candidate=spec(), loaded=loaded(), prompts=["p1"], chat=True)
    monkeypatch.setattr(response_cache, "KEY_VERSION", 1)  # entries holding their batch's average
    assert cache_keys(candidate=spec(), loaded=loaded(), prompts=["p1"], chat=True) != current
