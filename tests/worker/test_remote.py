"""Endpoint candidates generated on a loopback OpenAI-compatible server (services/worker/remote.py),
the way an I/O worker runs them: real Redis, real HTTP on 127.0.0.1, no Celery, no MLflow."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.worker import remote
from services.worker.step_task import StepBusy
from shared.endpoints import EndpointConfig
from shared.schemas import CandidateSpec, CandidateState, ComparisonCreate, ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import RUN_CANDIDATE
from tests.fixtures.openai_server import OpenAIServer, endpoint_entry

KEY_ENV = "LLMC_TEST_LOOPBACK_KEY"
KEY = "k-loopback"
SERVED = "loopback-llm-2026-01"


def rows(n: int, *, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"input": f"{prefix} number {i} here", "reference": "x"} for i in range(n)]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(served_model=SERVED, api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_server(server: OpenAIServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    remote.STOP.clear()
    yield
    remote.STOP.clear()


class Dispatches(list):
    def __call__(self, name: str, kwargs: dict[str, Any], task_id: str) -> None:
        self.append((name, dict(kwargs), task_id))


class Harness:
    def __init__(self, tmp_path: Path, server: OpenAIServer, redis_client, prefix: str, **settings: Any):
        entries = [
            endpoint_entry(server, "chat-ep", api_key_env=KEY_ENV),
            endpoint_entry(server, "text-ep", api="completions", api_key_env=KEY_ENV),
            endpoint_entry(server, "wrong-key", api_key_env="LLMC_TEST_WRONG_KEY"),
            endpoint_entry(server, "no-key-set", api_key_env="LLMC_TEST_UNSET_KEY"),
        ]
        path = tmp_path / f"endpoints-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps([{**e, **settings.pop(e["name"], {})} for e in entries]))
        self.settings = Settings(
            redis_url="redis://unused",
            key_prefix=prefix,
            queue_name=prefix,
            endpoints_file=path,
            candidate_lease_s=3,
            endpoint_retry_base_s=0.05,
            endpoint_retry_max_s=5,
            **settings,
        )
        self.store = ComparisonStore(redis_client, prefix=prefix, ttl_s=3600)
        self.dispatched = Dispatches()
        self.ctx = remote.RemoteContext(settings=self.settings, store=self.store, dispatch=self.dispatched)

    def submit(self, *candidates: dict[str, Any], dataset: list[dict[str, Any]], cache: bool = True) -> str:
        spec = ComparisonCreate.model_validate(
            {"candidates": list(candidates), "dataset": {"rows": dataset}, "cache": cache}
        )
        comparison_id = uuid.uuid4().hex
        self.store.create(comparison_id=comparison_id, spec=spec, experiment="e", metrics=["output_words"])
        return comparison_id

    def generate(self, comparison_id: str, label: str) -> str:
        return remote.generate_remote(self.ctx, comparison_id, label)

    def record(self, comparison_id: str, label: str) -> dict[str, Any]:
        record = self.store.remote_generation(comparison_id, label)
        assert record is not None
        return record


@pytest.fixture
def harness(tmp_path, server, redis_client, redis_prefix) -> Harness:
    return Harness(tmp_path, server, redis_client, redis_prefix)


def candidate(label: str, endpoint: str = "chat-ep", **fields: Any) -> dict[str, Any]:
    return {"label": label, "model": f"endpoint:{endpoint}/tiny-chat", **fields}


# --------------------------------------------------------------------------------------- mapping
class TestRequestMapping:
    ENDPOINT = EndpointConfig(name="e", base_url="http://127.0.0.1:9/v1", api="chat", max_concurrency=1)

    def test_chat_gets_system_and_user_messages_and_greedy_is_temperature_0(self):
        spec = CandidateSpec(
            label="a",
            model="endpoint:e/m",
            prompt_template="Q: {input} ({topic})",
            system_prompt="Be brief.",
            generation={"max_new_tokens": 12, "seed": 7, "stop": ["\n\n"], "top_p": 0.5},
        )
        body = remote.request_body(spec, self.ENDPOINT, "m", {"input": "Why?", "topic": "sky"})
        assert body == {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Q: Why? (sky)"},
            ],
            "max_tokens": 12,
            "temperature": 0,
            "seed": 7,
            "stop": ["\n\n"],
        }
        assert remote.prompt_text(body) == "system: Be brief.\n\nuser: Q: Why? (sky)"

    def test_sampling_sends_temperature_and_top_p(self):
        spec = CandidateSpec(
            label="a", model="endpoint:e/m", generation={"do_sample": True, "temperature": 0.7, "top_p": 0.9}
        )
        body = remote.request_body(spec, self.ENDPOINT, "m", {"input": "Hi"})
        assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 0)
        assert body["messages"] == [{"role": "user", "content": "Hi"}]
        assert "stop" not in body

    def test_completions_get_the_rendered_prompt(self):
        endpoint = self.ENDPOINT.model_copy(update={"api": "completions"})
        spec = CandidateSpec(label="a", model="endpoint:e/m", system_prompt="Be brief.")
        body = remote.request_body(spec, endpoint, "m", {"input": "Hi"})
        assert body["prompt"] == "Be brief.\n\nHi" and "messages" not in body
        assert remote.prompt_text(body) == "Be brief.\n\nHi"


# ------------------------------------------------------------------------------------ generation
class TestGeneration:
    def test_outputs_usage_cost_and_timing_per_row(self, harness, server):
        server.token_delay_s = 0.02
        cid = harness.submit(candidate("chat", system_prompt="Be brief."), dataset=rows(5))
        assert harness.generate(cid, "chat") == "generated"
        record = harness.record(cid, "chat")
        assert record["error"] is None and record["rows_failed"] == 0
        assert (record["endpoint"], record["model_id"], record["api"]) == ("chat-ep", "tiny-chat", "chat")
        assert (record["served_model"], record["system_fingerprint"], record["streamed"]) == (
            SERVED,
            "fp_loopback_1",
            True,
        )
        first = record["rows"][0]
        assert first["output"] == f"{SERVED} says: question number 0 here"
        # Words are the loopback server's tokens: "Be brief." + the input; the reply's words.
        assert (first["input_tokens"], first["output_tokens"]) == (2 + 4, 6)
        assert first["cost"] == pytest.approx(6 / 1000 * 0.5 + 6 / 1000 * 1.5)
        assert 0 < first["ttft_s"] < first["latency_s"]
        assert first["latency_s"] >= 6 * 0.02
        assert first["prompt"] == "system: Be brief.\n\nuser: question number 0 here"
        totals = record["totals"]
        assert totals["input_tokens"] == 5 * 6 and totals["output_tokens"] == 5 * 6
        assert totals["cost"] == pytest.approx(5 * first["cost"])
        assert totals["requests"] == 5 and totals["retries"] == 0
        assert totals["tokens_per_second"] > 0
        # What reached the server: the key from the environment, the mapped settings, streaming.
        sent = server.requests[0]
        assert sent["auth"] == f"Bearer {KEY}" and sent["path"] == "/v1/chat/completions"
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0, 64, 0)
        # The candidate runs, its progress is complete, and its scoring step is queued.
        stored = harness.store.candidate(cid, "chat")
        assert stored.status is CandidateState.running and (stored.done, stored.total) == (5, 5)
        assert stored.rows_failed == 0 and stored.totals["output_tokens"] == 30
        assert [(name, kwargs) for name, kwargs, _ in harness.dispatched] == [
            (RUN_CANDIDATE, {"comparison_id": cid, "label": "chat"})
        ]
        assert harness.store.task_ids(cid)["chat"] == harness.dispatched[0][2]
        assert harness.store.endpoint_in_flight("chat-ep") == 0

    def test_completions_on_a_server_that_does_not_stream(self, harness, server):
        server.streaming = False
        cid = harness.submit(candidate("text", "text-ep"), dataset=rows(3))
        assert harness.generate(cid, "text") == "generated"
        record = harness.record(cid, "text")
        assert server.requests[0]["path"] == "/v1/completions" and "prompt" in server.requests[0]
        first = record["rows"][0]
        assert first["output"] == f"{SERVED} says: question number 0 here"
        assert (first["input_tokens"], first["output_tokens"], first["ttft_s"]) == (4, 6, None)

    def test_a_server_refusing_to_stream_is_asked_without(self, harness, server):
        server.reject_stream = True
        cid = harness.submit(candidate("chat"), dataset=rows(4))
        assert harness.generate(cid, "chat") == "generated"
        record = harness.record(cid, "chat")
        assert record["streamed"] is False and record["rows_failed"] == 0
        assert all(r["output"].startswith(SERVED) for r in record["rows"])
        # Once refused, the rest are asked without streaming straight away.
        assert [r.get("stream", False) for r in server.requests] == [True, False, False, False, False]


class TestRetries:
    def test_a_429_is_retried_after_its_retry_after_and_halves_the_limit(self, harness, server):
        server.failures = [(429, {"Retry-After": "1"})]
        cid = harness.submit(candidate("chat"), dataset=rows(1))
        started = time.monotonic()
        assert harness.generate(cid, "chat") == "generated"
        row = harness.record(cid, "chat")["rows"][0]
        assert row["error"] is None and row["attempts"] == 2
        first, second = server.requests
        assert second["at"] - first["at"] >= 1.0
        assert time.monotonic() - started >= 1.0
        # The endpoint's max_concurrency is 4: one 429 halved it, one success added 1/2.
        assert harness.store.endpoint_limit("chat-ep", max_concurrency=4) == pytest.approx(2.5)
        assert harness.record(cid, "chat")["totals"]["retries"] == 1

    def test_5xx_and_timeouts_are_retried(self, tmp_path, server, redis_client, redis_prefix):
        harness = Harness(tmp_path, server, redis_client, redis_prefix, **{"chat-ep": {"timeout_s": 0.5}})
        server.failures = [(500, {}), (503, {"Retry-After": "0"}), ("hang", 2.0)]
        cid = harness.submit(candidate("chat"), dataset=rows(1))
        assert harness.generate(cid, "chat") == "generated"
        row = harness.record(cid, "chat")["rows"][0]
        assert row["attempts"] == 4 and row["output"].startswith(SERVED)

    def test_a_row_failing_every_attempt_is_recorded_with_its_reason(self, harness, server):
        server.fail_when = ["number 3 "]
        cid = harness.submit(candidate("chat"), dataset=rows(10))
        # 1 of 10 failed: at ENDPOINT_MAX_ERROR_RATE (10 %), not past it.
        assert harness.generate(cid, "chat") == "generated"
        record = harness.record(cid, "chat")
        assert record["error"] is None and record["rows_failed"] == 1
        failed = record["rows"][3]
        assert failed["output"] is None and failed["output_tokens"] is None and failed["cost"] is None
        assert failed["error"] == "6 attempts failed, the last with HTTP 500: " + json.dumps(
            {"error": {"message": "this prompt always fails"}}
        )
        assert sum(r["error"] is None for r in record["rows"]) == 9
        assert harness.store.candidate(cid, "chat").rows_failed == 1

    def test_past_the_error_rate_the_generation_fails_with_the_reasons(self, harness, server):
        server.fail_when = ["number 3 ", "number 7 "]
        cid = harness.submit(candidate("chat"), dataset=rows(10))
        assert harness.generate(cid, "chat") == "failed"
        record = harness.record(cid, "chat")
        assert record["rows_failed"] == 2
        assert record["error"].startswith(
            "2 of 10 rows failed (20%), more than ENDPOINT_MAX_ERROR_RATE (10%) of endpoint 'chat-ep'; "
            "most common: 6 attempts failed, the last with HTTP 500"
        )
        assert harness.dispatched[0][0] == RUN_CANDIDATE  # scoring ends it, visibly

    def test_a_retry_after_past_the_limit_fails_the_row_at_once(self, harness, server):
        server.failures = [(429, {"Retry-After": "600"})]
        cid = harness.submit(candidate("chat"), dataset=rows(1), cache=False)
        started = time.monotonic()
        harness.generate(cid, "chat")
        row = harness.record(cid, "chat")["rows"][0]
        assert time.monotonic() - started < 3
        assert row["error"].endswith("it asked to retry after 600 s, longer than ENDPOINT_RETRY_MAX_S (5 s)")


class TestRefusals:
    def test_a_refused_key_fails_the_generation(self, harness, server, monkeypatch):
        monkeypatch.setenv("LLMC_TEST_WRONG_KEY", "not-the-key")
        cid = harness.submit(candidate("w", "wrong-key"), dataset=rows(6))
        assert harness.generate(cid, "w") == "failed"
        error = harness.record(cid, "w")["error"]
        assert error.startswith("endpoint 'wrong-key' refused the key in LLMC_TEST_WRONG_KEY: HTTP 401")
        assert "not-the-key" not in error
        assert len(server.requests) == 1  # the first row's refusal stops the rest

    def test_a_key_missing_on_the_worker_is_named(self, harness, server, monkeypatch):
        monkeypatch.delenv("LLMC_TEST_UNSET_KEY", raising=False)
        cid = harness.submit(candidate("n", "no-key-set"), dataset=rows(2))
        assert harness.generate(cid, "n") == "failed"
        assert harness.record(cid, "n")["error"] == (
            "the environment variable LLMC_TEST_UNSET_KEY (api_key_env of endpoint 'no-key-set') is not set "
            "on the I/O workers"
        )
        assert server.requests == []

    def test_an_endpoint_this_worker_does_not_know(self, harness):
        cid = harness.submit(candidate("u", "elsewhere"), dataset=rows(2))
        assert harness.generate(cid, "u") == "failed"
        assert "names no endpoint configured on the I/O workers" in harness.record(cid, "u")["error"]


class TestConcurrency:
    def test_two_workers_never_exceed_the_endpoints_limit(
        self, tmp_path, server, redis_client, redis_url, redis_prefix
    ):
        """Two I/O workers (each its own Redis connections and request threads) on two candidates
        of one endpoint whose max_concurrency is 3."""
        server.latency_s = 0.15
        first = Harness(tmp_path, server, redis_client, redis_prefix, **{"chat-ep": {"max_concurrency": 3}})
        second_store = ComparisonStore.from_url(redis_url, prefix=redis_prefix, ttl_s=3600)
        second = remote.RemoteContext(settings=first.settings, store=second_store, dispatch=Dispatches())
        cid = first.submit(candidate("a"), candidate("b"), dataset=rows(12), cache=False)
        outcomes: dict[str, str] = {}
        thread = threading.Thread(target=lambda: outcomes.update(b=remote.generate_remote(second, cid, "b")))
        started = time.monotonic()
        thread.start()
        outcomes["a"] = first.generate(cid, "a")
        thread.join(timeout=60)
        elapsed = time.monotonic() - started
        assert outcomes == {"a": "generated", "b": "generated"}
        assert len(server.requests) == 24
        assert server.max_in_flight == 3
        # 24 requests of 0.15 s, 3 at a time: at least 8 rounds.
        assert elapsed >= 8 * 0.15
        assert first.store.endpoint_in_flight("chat-ep") == 0

    def test_slots_of_a_dead_worker_come_back(self, tmp_path, server, redis_client, redis_prefix):
        harness = Harness(tmp_path, server, redis_client, redis_prefix, **{"chat-ep": {"max_concurrency": 2}})
        # A worker died holding both slots; they expire after 1 s.
        for token in ("dead-1", "dead-2"):
            assert harness.store.endpoint_acquire("chat-ep", token, max_concurrency=2, hold_s=1.0)
        cid = harness.submit(candidate("a"), dataset=rows(2))
        started = time.monotonic()
        assert harness.generate(cid, "a") == "generated"
        assert time.monotonic() - started >= 0.9
        assert server.requests[0]["at"] >= started + 0.9


class TestCacheAndDelivery:
    def test_the_response_cache_is_keyed_by_the_served_model(self, harness, server):
        dataset = rows(4)
        first = harness.submit(candidate("chat"), dataset=dataset)
        harness.generate(first, "chat")
        assert len(server.requests) == 4
        again = harness.submit(candidate("chat"), dataset=dataset)
        harness.generate(again, "chat")
        # The first row is always asked (its reply names the served model); the rest are cached.
        assert len(server.requests) == 5
        record = harness.record(again, "chat")
        assert record["cache_hits"] == 3 and harness.store.candidate(again, "chat").cache_hits == 3
        assert [r["cached"] for r in record["rows"]] == [False, True, True, True]
        assert [r["output"] for r in record["rows"]] == [
            r["output"] for r in harness.record(first, "chat")["rows"]
        ]
        assert record["totals"]["cost"] == pytest.approx(harness.record(first, "chat")["totals"]["cost"])
        # Another served model shares nothing.
        server.served_model = "loopback-llm-2026-02"
        try:
            third = harness.submit(candidate("chat"), dataset=dataset)
            harness.generate(third, "chat")
        finally:
            server.served_model = SERVED
        assert len(server.requests) == 9 and harness.record(third, "chat")["cache_hits"] == 0

    def test_cancel_stops_sending(self, harness, server):
        server.latency_s = 0.2
        cid = harness.submit(candidate("chat"), dataset=rows(40), cache=False)
        outcome: dict[str, str] = {}
        thread = threading.Thread(target=lambda: outcome.update(result=harness.generate(cid, "chat")))
        thread.start()
        time.sleep(0.8)
        assert harness.store.transition(
            cid, ComparisonStatus.cancelled, allowed_from=[ComparisonStatus.queued, ComparisonStatus.running]
        )
        thread.join(timeout=30)
        assert outcome == {"result": "cancelled"}
        sent = len(server.requests)
        time.sleep(0.5)
        assert len(server.requests) == sent < 40
        # No rows stored; the scoring step, queued, marks the candidate cancelled.
        assert harness.store.remote_generation(cid, "chat") is None
        assert [name for name, _, _ in harness.dispatched] == [RUN_CANDIDATE]

    def test_a_shutdown_hands_the_candidate_back_and_a_redelivery_resumes(self, harness, server):
        server.latency_s = 0.2
        cid = harness.submit(candidate("chat"), dataset=rows(40))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                harness.generate(cid, "chat")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.9)
        remote.STOP.set()
        thread.join(timeout=30)
        assert [type(e) for e in errors] == [remote.HandOff]
        assert harness.dispatched == [] and harness.store.remote_generation(cid, "chat") is None
        answered = len(server.requests)
        assert 1 < answered < 40
        # Handed back: the lease is free and the next delivery asks only for what is missing.
        remote.STOP.clear()
        server.latency_s = 0.0
        assert harness.generate(cid, "chat") == "generated"
        record = harness.record(cid, "chat")
        assert record["cache_hits"] >= answered - 2  # rows answered before the stop, the first row apart
        assert len(server.requests) == answered + 40 - record["cache_hits"]

    def test_a_second_delivery_finds_the_lease_held(self, harness, server):
        cid = harness.submit(candidate("chat"), dataset=rows(1))
        holder = harness.store.lease_key(cid, "chat")
        harness.store.r.set(holder, "someone-else", ex=5)
        with pytest.raises(StepBusy) as busy:
            harness.generate(cid, "chat")
        assert 4 <= busy.value.retry_in_s <= 6
        assert server.requests == []

    def test_a_redelivery_after_the_rows_were_stored_only_hands_over(self, harness, server):
        cid = harness.submit(candidate("chat"), dataset=rows(2))
        harness.generate(cid, "chat")
        assert harness.generate(cid, "chat") == "generated"
        assert len(server.requests) == 2
        assert [name for name, _, _ in harness.dispatched] == [RUN_CANDIDATE, RUN_CANDIDATE]
