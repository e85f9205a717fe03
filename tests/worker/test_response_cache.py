"""Response-cache keys decide exactly what may be reused; the cache itself runs on real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.worker.generation import Generated
from services.worker.models import LoadedModel, ModelCache, load_model
from services.worker.response_cache import ResponseCache, cache_keys
from shared.schemas import CandidateSpec
from shared.settings import Settings
from shared.sources import classify_model
from shared.store import ComparisonStore
from tests.fixtures.tiny_models import build_causal, build_tokenizer


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
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix)


@pytest.fixture
def cache(store):
    return ResponseCache(store, ttl_s=60)


def test_round_trip_on_redis(cache, store, redis_client):
    cache.put_many({"k1": Generated("hello", 2, 0.25)})
    assert cache.get_many(["k1", "k2"]) == [Generated("hello", 2, 0.25), None]
    assert 0 < redis_client.ttl(store.response_cache_key("k1")) <= 60
    assert list(store.response_cache_keys()) == [store.response_cache_key("k1")]
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


# ------------------------------------------------------------------------- what keys a model
ANSWERS = {"p1": Generated("old answer", 2, 0.1), "p2": Generated("another", 1, 0.1)}


def _keys(loaded: LoadedModel) -> list[str]:
    return cache_keys(candidate=spec(), loaded=loaded, prompts=list(ANSWERS), chat=True)


@pytest.fixture
def own_model(tmp_path) -> tuple[Path, Settings]:
    """A local model directory of this test's own, which it may overwrite."""
    root = tmp_path / "models"
    return build_causal(root / "tiny", build_tokenizer()), Settings(model_roots=[root])


def test_replaced_weights_in_a_local_directory_are_not_served_from_the_cache(cache, own_model):
    folder, settings = own_model
    models = ModelCache()
    before = models.get(str(folder), revision=None, settings=settings)
    cache.put_many(dict(zip(_keys(before), ANSWERS.values(), strict=True)))
    # Unchanged: the same worker, or a fresh one, finds those outputs again.
    assert models.get(str(folder), revision=None, settings=settings) is before
    assert cache.get_many(_keys(load_model(str(folder), revision=None, settings=settings))) == list(
        ANSWERS.values()
    )

    # Same name, other weights (same architecture, so the file has the same size).
    size = (folder / "model.safetensors").stat().st_size
    _reinitialise(folder, seed=7)
    assert (folder / "model.safetensors").stat().st_size == size

    after = models.get(str(folder), revision=None, settings=settings)
    assert after is not before and after.resolved != before.resolved
    assert before.model is None  # the stale copy was released, not served
    assert cache.get_many(_keys(after)) == [None, None]


def test_big_files_count_by_size_and_modification_time(cache, own_model, monkeypatch):
    """Weights are too big to hash on every run: a file above the threshold is fingerprinted by
    size and mtime, so rewriting it still changes the key."""
    from services.worker import models as worker_models

    folder, settings = own_model
    monkeypatch.setattr(worker_models, "HASHED_FILE_MAX_BYTES", 1024)
    first = worker_models.directory_fingerprint(folder)
    assert worker_models.directory_fingerprint(folder) == first
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert worker_models.directory_fingerprint(folder) != first
    # A small file (the tokenizer's config) counts by content: touching it changes nothing.
    second = worker_models.directory_fingerprint(folder)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text())
    assert worker_models.directory_fingerprint(folder) == second
    config.write_text(config.read_text() + " ")
    assert worker_models.directory_fingerprint(folder) != second


def _reinitialise(folder: Path, *, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter)
    model.save_pretrained(folder)
