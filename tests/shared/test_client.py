"""The typed client, sync and async, against the real API over HTTP (uvicorn, real Redis), with
auth off (``api_only``) and on (an API of its own, keys from ``issue_key``); retry rules against
a scripted loopback server; and the client imported where the service's dependencies are not.

No worker consumes the ``api_only`` queue: ``play_worker`` writes progress, outputs and final
states into Redis through ``ComparisonStore``, as a worker does, while the client waits.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from scripts.stack import Stack, free_port
from shared.apikeys import Quotas, Role, issue_key
from shared.client import (
    ApiError,
    AsyncComparisonClient,
    ComparisonClient,
    RetryPolicy,
    verify_webhook,
)
from shared.schemas import (
    AuditRead,
    CandidateState,
    ComparisonCreate,
    ComparisonPage,
    ComparisonRead,
    ComparisonResults,
    ComparisonStatus,
    DeliveriesRead,
    FieldErrorRead,
    MatchupRead,
    MetricRead,
    ModelRead,
    RatingRead,
    RatingsRead,
    VoteRead,
    VotesRead,
)
from shared.store import ComparisonStore, utcnow
from shared.webhook_signing import new_secret, signed_headers
from tests.conftest import _cleanup_prefix
from tests.fixtures.finished import ROWS as FINISHED_ROWS
from tests.fixtures.finished import write_finished
from tests.fixtures.loopback import Loopback, Seen, forward

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris", "topic": "geo"},
    {"input": "What is 2 + 2?", "reference": "4", "topic": "math"},
    {"input": "Name the largest planet.", "reference": "Jupiter", "topic": "space"},
]
OUTPUTS = {"a": ["Paris", "4", "Saturn"], "b": ["Lyon", "5", "Jupiter"]}
# Quick retries for the scripted server: the tests measure rules, not patience.
FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": f"client-{uuid.uuid4().hex[:8]}",
        "experiment": "client-tests",
        "candidates": [
            {"label": "a", "model": "smollm2-135m-instruct"},
            {"label": "b", "model": "smollm2-135m-instruct", "generation": {"do_sample": True, "seed": 1}},
        ],
        "dataset": {"rows": ROWS},
        "metrics": ["exact_match", "output_tokens"],
    }
    body.update(overrides)
    return body


def play_worker(
    store: ComparisonStore,
    cid: str,
    *,
    step_s: float = 0.0,
    outputs: dict[str, list[str]] = OUTPUTS,
    pairwise: list[dict[str, Any]] | None = None,
) -> None:
    """Run the comparison to success the way a worker writes it: running, one row at a time
    (``step_s`` apart, slower than the event stream's half-second poll), outputs scored by
    exact match, ``pairwise`` verdicts, succeeded."""
    rows = store.rows(cid)
    store.set_fields(cid, experiment_id="7", parent_run_id="parent1", started_at=utcnow())
    assert store.transition(cid, ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
    for label in outputs:
        store.transition_candidate(cid, label, CandidateState.running, allowed_from=[CandidateState.queued])
    for done in range(1, len(rows) + 1):
        for label in outputs:
            store.set_progress(cid, label, done=done, total=len(rows), tokens_per_second=50.0)
        time.sleep(step_s)
    for label, texts in outputs.items():
        scores = [float(out == row["reference"]) for out, row in zip(texts, rows, strict=True)]
        store.save_outputs(
            cid,
            label,
            [
                {"output": out, "scores": {"exact_match": s, "output_tokens": 1.0}}
                for out, s in zip(texts, scores, strict=True)
            ],
        )
        store.set_candidate_fields(cid, label, metrics={"exact_match": sum(scores) / len(scores)})
        store.transition_candidate(
            cid, label, CandidateState.succeeded, allowed_from=[CandidateState.running]
        )
    if pairwise:
        store.set_fields(cid, pairwise=json.dumps(pairwise))
    assert store.transition(cid, ComparisonStatus.succeeded, allowed_from=[ComparisonStatus.running])


def in_thread(target: Any, *args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def record_requests(client: ComparisonClient) -> list[str]:
    """Every request the client sends from now on, in order, as "METHOD /path?query" as sent."""
    sent: list[str] = []
    client.http.event_hooks["request"].append(
        lambda request: sent.append(f"{request.method} {request.url.raw_path.decode()}")
    )
    return sent


def comparison_json(cid: str = "c0ffee") -> dict[str, Any]:
    """A valid ComparisonRead body, for the scripted server."""
    return {
        "id": cid,
        "name": "scripted",
        "status": "queued",
        "experiment": "client-tests",
        "model_type": None,
        "metrics": ["exact_match"],
        "tags": {},
        "rows": 1,
        "created_at": "2025-01-01T00:00:00Z",
        "mlflow": {},
        "candidates": [],
    }


def reply(status: int, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message, "fields": []}


def scripted(*replies: tuple[int, dict[str, str], bytes] | None) -> Loopback:
    """A loopback server answering its requests with ``replies`` in order, then with the last."""
    queue = list(replies)

    def respond(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return Loopback(respond)


@pytest.fixture
def client(api_only: Stack) -> Iterator[ComparisonClient]:
    with ComparisonClient(api_only.api_url) as client:
        yield client


@pytest.fixture
def store(api_only: Stack, redis_client) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=api_only.key_prefix)


@pytest.fixture(scope="module")
def auth_api(redis_url, redis_client, tmp_path_factory) -> Iterator[Stack]:
    """An API with keys required, as in the compose stack."""
    prefix = f"test-client-auth-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        run_dir=tmp_path_factory.mktemp("client-auth"),
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=free_port(),
        queue_name=prefix,
        key_prefix=prefix,
        extra_env={"AUTH_DISABLED": "false"},
    )
    stack.start_api()
    yield stack
    stack.stop()
    _cleanup_prefix(redis_client, prefix, prefix)


@pytest.fixture
def auth_store(auth_api: Stack, redis_client) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=auth_api.key_prefix)


def new_key(store: ComparisonStore, name: str, role: Role = Role.submitter, **quotas: int) -> tuple[str, str]:
    """(key id, whole key)."""
    record, whole = issue_key(store, name=name, role=role, quotas=Quotas(**quotas))
    return record.id, whole


# ---------------------------------------------------------------- submit


class TestSubmit:
    def test_json_spec_returns_the_typed_comparison(self, client):
        body = spec(tags={"team": "search"})
        created = client.submit(body)
        assert isinstance(created, ComparisonRead)
        assert created.status is ComparisonStatus.queued
        assert created.name == body["name"] and created.rows == 3 and created.tags == {"team": "search"}
        assert [c.label for c in created.candidates] == ["a", "b"]
        assert all(c.status is CandidateState.queued for c in created.candidates)
        assert client.get(created.id) == created

    def test_a_comparison_create_is_sent_as_what_was_set(self, client):
        model = ComparisonCreate.model_validate(spec(name="typed-spec"))
        created = client.submit(model)
        assert created.name == "typed-spec" and created.metrics == ["exact_match", "output_tokens"]

    def test_dataset_file(self, client, tmp_path):
        body = spec()
        del body["dataset"]
        path = tmp_path / "rows.csv"
        path.write_text(
            "input,reference,topic\nWhat is the capital of Italy?,Rome,geo\nName a colour,Blue,misc\n"
        )
        created = client.submit(body, data=path)
        assert isinstance(created, ComparisonRead) and created.rows == 2
        rows = client.results(created.id).rows
        assert [(r.input, r.reference, (r.model_extra or {})["topic"]) for r in rows] == [
            ("What is the capital of Italy?", "Rome", "geo"),
            ("Name a colour", "Blue", "misc"),
        ]
        jsonl = "\n".join(json.dumps(r) for r in ROWS).encode()
        assert client.submit(body, data=("rows.jsonl", jsonl)).rows == 3
        assert client.submit_file(body, "rows.jsonl", jsonl).rows == 3

    def test_a_comparison_create_cannot_take_a_file_too(self, client):
        with pytest.raises(ValueError, match="carries its dataset"):
            client.submit(ComparisonCreate.model_validate(spec()), data=("rows.csv", b"input\nx\n"))

    def test_list(self, client):
        mine = client.submit(spec())
        page = client.list(status="queued", limit=200)
        assert isinstance(page, ComparisonPage) and page.limit == 200
        assert mine.id in [c.id for c in page.items]
        # The filter is applied: other tests on this API may have finished comparisons, but
        # this one is queued, so it is not among the succeeded ones.
        succeeded = client.list(status=ComparisonStatus.succeeded, limit=200).items
        assert mine.id not in [c.id for c in succeeded]
        assert all(c.status is ComparisonStatus.succeeded for c in succeeded)

    def test_async(self, api_only, tmp_path):
        body = spec()
        no_dataset = {k: v for k, v in body.items() if k != "dataset"}
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]))

        async def main() -> tuple[ComparisonRead, ComparisonRead, ComparisonRead, ComparisonPage]:
            async with AsyncComparisonClient(api_only.api_url) as client:
                created = await client.submit(body)
                uploaded = await client.submit(no_dataset, data=path)
                return created, uploaded, await client.get(created.id), await client.list(limit=200)

        created, uploaded, fetched, page = asyncio.run(main())
        assert isinstance(created, ComparisonRead) and created.status is ComparisonStatus.queued
        assert created.rows == 3 and uploaded.rows == 2
        assert fetched == created
        assert {created.id, uploaded.id} <= {c.id for c in page.items}


class TestIdempotency:
    def test_a_retried_submit_is_queued_once(self, client, api_only):
        """The first answer is lost (the proxy forwards it, then says 503): the retry carries the
        same Idempotency-Key, so the API returns the first comparison instead of a second."""
        upstream: list[tuple[int, dict[str, Any]]] = []

        def respond(seen: Seen) -> tuple[int, dict[str, str], bytes]:
            status, headers, content = forward(api_only.api_url, seen)
            if seen.method == "POST":
                upstream.append((status, json.loads(content)))
                if len(upstream) == 1:
                    return reply(503, error_body("unavailable", "lost on the way back"))
            return status, headers, content

        body = spec()
        with Loopback(respond) as proxy, ComparisonClient(proxy.url, retry=FAST) as through_proxy:
            created = through_proxy.submit(body)
        posts = [s for s in proxy.seen if s.method == "POST"]
        assert len(posts) == 2
        assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
        uuid.UUID(posts[0].headers["idempotency-key"])  # generated: a fresh uuid
        assert [status for status, _ in upstream] == [202, 200]  # queued, then replayed
        assert created.id == upstream[0][1]["id"] == upstream[1][1]["id"]
        same_name = [c for c in client.list(limit=200).items if c.name == body["name"]]
        assert [c.id for c in same_name] == [created.id]

    def test_each_submit_gets_its_own_key(self, client):
        body = spec()
        first, second = client.submit(body), client.submit(body)
        assert first.id != second.id

    def test_a_key_of_the_callers_own(self, client):
        body = spec()
        key = f"order-{uuid.uuid4().hex}"
        assert client.submit(body, idempotency_key=key).id == client.submit(body, idempotency_key=key).id
        with pytest.raises(ApiError) as caught:
            client.submit(spec(name="another body"), idempotency_key=key)
        assert caught.value.status_code == 422
        assert [f.field for f in caught.value.fields] == ["Idempotency-Key"]

    def test_async_retried_submit_is_queued_once(self, api_only, client):
        answered: list[int] = []

        def respond(seen: Seen) -> tuple[int, dict[str, str], bytes]:
            status, headers, content = forward(api_only.api_url, seen)
            answered.append(status)
            return (
                reply(503, error_body("unavailable", "lost"))
                if len(answered) == 1
                else (status, headers, content)
            )

        body = spec()

        async def main(url: str) -> ComparisonRead:
            async with AsyncComparisonClient(url, retry=FAST) as through_proxy:
                return await through_proxy.submit(body)

        with Loopback(respond) as proxy:
            created = asyncio.run(main(proxy.url))
        assert answered == [202, 200]
        assert [c.id for c in client.list(limit=200).items if c.name == body["name"]] == [created.id]


# ---------------------------------------------------------------- wait


class TestWait:
    def test_follows_the_event_stream_to_the_end(self, client, store):
        created = client.submit(spec())
        sent = record_requests(client)
        states: list[ComparisonRead] = []
        worker = in_thread(play_worker, store, created.id, step_s=0.7)
        final = client.wait(created.id, timeout=60, on_update=states.append)
        worker.join(timeout=30)
        assert isinstance(final, ComparisonRead) and final.status is ComparisonStatus.succeeded
        assert [c.progress.done for c in final.candidates] == [3, 3]
        # Live: states part-way through were seen, not only the start and the end.
        assert any(0 < s.candidates[0].progress.done < 3 for s in states), [s.status for s in states]
        assert states[-1] == final
        # Every state came from the stream: no polling.
        assert sent == [f"GET /v1/comparisons/{created.id}/events"]

    def test_polling(self, client, store):
        created = client.submit(spec())
        sent = record_requests(client)
        states: list[ComparisonRead] = []
        worker = in_thread(play_worker, store, created.id, step_s=0.4)
        final = client.wait(created.id, timeout=60, poll_s=0.1, stream=False, on_update=states.append)
        worker.join(timeout=30)
        assert final.status is ComparisonStatus.succeeded
        assert states[-1] == final and len(states) >= 3
        assert set(sent) == {f"GET /v1/comparisons/{created.id}"} and len(sent) == len(states)

    def test_polls_when_the_api_has_no_event_stream(self, client, store, api_only):
        """An API (or a proxy) that does not serve the stream: waiting falls back to polling."""

        def respond(seen: Seen) -> tuple[int, dict[str, str], bytes]:
            if seen.path.endswith("/events"):
                return reply(404, {"detail": "Not Found"})
            return forward(api_only.api_url, seen)

        created = client.submit(spec())
        worker = in_thread(play_worker, store, created.id, step_s=0.2)
        reasons: list[str] = []
        with Loopback(respond) as proxy, ComparisonClient(proxy.url) as through_proxy:
            final = through_proxy.wait(created.id, timeout=60, poll_s=0.1, on_fallback=reasons.append)
        worker.join(timeout=30)
        assert final.status is ComparisonStatus.succeeded
        assert len(reasons) == 1 and "404" in reasons[0]  # told once why it polls
        paths = [s.path for s in proxy.seen]
        assert paths[0] == f"/v1/comparisons/{created.id}/events"
        assert paths[1:] and set(paths[1:]) == {f"/v1/comparisons/{created.id}"}

    def test_without_a_time_limit(self, client, store):
        created = client.submit(spec())
        sent = record_requests(client)
        worker = in_thread(play_worker, store, created.id, step_s=0.2)
        final = client.wait(created.id, timeout=None)
        worker.join(timeout=30)
        assert final.status is ComparisonStatus.succeeded
        assert sent == [f"GET /v1/comparisons/{created.id}/events"]  # followed the stream

    @pytest.mark.parametrize("stream", [True, False])
    def test_timeout(self, client, stream):
        created = client.submit(spec())
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"comparison {created.id} still queued after 1s"):
            client.wait(created.id, timeout=1.0, poll_s=0.2, stream=stream)
        assert 1.0 <= time.monotonic() - started < 3.0
        assert client.get(created.id).status is ComparisonStatus.queued

    def test_async_stream_and_polling(self, api_only, store, client):
        streamed, polled = client.submit(spec()), client.submit(spec())
        seen: list[str] = []

        async def record(request: httpx.Request) -> None:
            seen.append(request.url.path)

        async def main() -> tuple[ComparisonRead, ComparisonRead, list[ComparisonRead]]:
            states: list[ComparisonRead] = []

            async def on_update(state: ComparisonRead) -> None:  # a coroutine function is awaited
                states.append(state)

            async with AsyncComparisonClient(api_only.api_url) as aclient:
                aclient.http.event_hooks["request"].append(record)
                first = await aclient.wait(streamed.id, timeout=60, on_update=on_update)
                workers.append(in_thread(play_worker, store, polled.id, step_s=0.4))
                second = await aclient.wait(polled.id, timeout=60, poll_s=0.1, stream=False)
                with pytest.raises(TimeoutError, match="still queued"):
                    await aclient.wait(client.submit(spec()).id, timeout=0.5)
                return first, second, states

        workers = [in_thread(play_worker, store, streamed.id, step_s=0.7)]
        first, second, states = asyncio.run(main())
        for worker in workers:
            worker.join(timeout=30)
        assert first.status is second.status is ComparisonStatus.succeeded
        assert states[-1] == first and any(0 < s.candidates[0].progress.done < 3 for s in states)
        assert seen[0] == f"/v1/comparisons/{streamed.id}/events"
        assert f"/v1/comparisons/{streamed.id}" not in seen
        assert seen.count(f"/v1/comparisons/{polled.id}") >= 2


# ---------------------------------------------------------------- results and the rest


class TestResults:
    def test_typed(self, client, store):
        cid = write_finished(store)
        results = client.results(cid)
        assert isinstance(results, ComparisonResults)
        assert results.status is ComparisonStatus.succeeded and results.candidates == ["greedy", "sampled"]
        first = results.rows[0]
        assert (first.index, first.input, first.reference) == (0, FINISHED_ROWS[0]["input"], "Paris")
        assert first.model_extra == {"topic": "geo"}
        assert (
            first.outputs["greedy"].output == "Paris" and first.outputs["greedy"].scores["exact_match"] == 1.0
        )
        assert client.results_csv(cid).splitlines()[0].startswith("index,input,reference,topic,greedy,")

    def test_as_a_dataframe(self, client, store):
        cid = write_finished(store)
        client.rate(cid, row=1, label="sampled", rating="down", comment="Kyoto is wrong", rater="ana")
        frame = client.results_frame(cid)
        assert isinstance(frame, pd.DataFrame)
        assert frame.index.name == "row" and list(frame.index) == [0, 1, 2, 3]
        assert list(frame.columns) == [
            "input",
            "reference",
            "topic",
            "greedy",
            "greedy/exact_match",
            "greedy/output_words",
            "greedy/thumbs_up",
            "greedy/thumbs_down",
            "greedy/comments",
            "sampled",
            "sampled/exact_match",
            "sampled/output_words",
            "sampled/thumbs_up",
            "sampled/thumbs_down",
            "sampled/comments",
        ]
        assert list(frame["input"]) == [r["input"] for r in FINISHED_ROWS]
        assert list(frame["topic"]) == ["geo", "geo", "nature", "nature"]
        assert list(frame["sampled"]) == ["Paris, France", "Kyoto", "8", "Blue, mostly."]
        assert list(frame["greedy/output_words"]) == [1.0, 6.0, 2.0, 4.0]
        assert frame["sampled/exact_match"].dtype == "float64"
        assert frame["sampled/exact_match"].sum() == 1.0
        assert list(frame["sampled/thumbs_down"]) == [0, 1, 0, 0]
        assert frame.loc[1, "sampled/comments"] == [
            {"rater": "ana", "rating": "down", "comment": "Kyoto is wrong"}
        ]
        assert frame.loc[0, "greedy/comments"] == []

    def test_a_queued_comparison_has_missing_outputs_and_scores(self, client):
        created = client.submit(spec())
        frame = client.results_frame(created.id)
        assert list(frame.columns)[:5] == ["input", "reference", "topic", "a", "a/thumbs_up"]
        assert frame["a"].isna().all() and list(frame["reference"]) == ["Paris", "4", "Jupiter"]

    def test_async_dataframe_and_results(self, api_only, store):
        cid = write_finished(store)

        async def main() -> tuple[ComparisonResults, pd.DataFrame, str]:
            async with AsyncComparisonClient(api_only.api_url) as client:
                return (
                    await client.results(cid),
                    await client.results_frame(cid),
                    await client.results_csv(cid),
                )

        results, frame, text = asyncio.run(main())
        assert results.rows[2].outputs["sampled"].output == "8"
        assert frame.loc[2, "sampled"] == "8" and frame.loc[2, "sampled/exact_match"] == 1.0
        assert text.splitlines()[1].startswith("0,What is the capital of France?,Paris,geo,Paris,")

    def test_scores_left_unscored_are_nan(self, client, store):
        created = client.submit(spec())
        play_worker(store, created.id)
        store.save_outputs(
            created.id, "b", [{"output": o, "scores": {"exact_match": None}} for o in OUTPUTS["b"]]
        )
        frame = client.results_frame(created.id)
        assert math.isnan(frame.loc[0, "b/exact_match"])
        assert frame.loc[0, "a/exact_match"] == 1.0


class TestCancel:
    def test_cancel_then_409(self, client):
        created = client.submit(spec())
        cancelled = client.cancel(created.id)
        assert isinstance(cancelled, ComparisonRead) and cancelled.status is ComparisonStatus.cancelled
        with pytest.raises(ApiError) as caught:
            client.cancel(created.id)
        assert (caught.value.status_code, caught.value.code) == (409, "conflict")

    def test_async(self, api_only, client):
        created = client.submit(spec())

        async def main() -> ComparisonRead:
            async with AsyncComparisonClient(api_only.api_url) as aclient:
                return await aclient.cancel(created.id)

        assert asyncio.run(main()).status is ComparisonStatus.cancelled


class TestFeedbackAndCatalog:
    def test_votes_matchups_ratings_and_audit(self, client, store):
        cid = write_finished(store)
        vote = client.vote(cid, row=0, a="greedy", b="sampled", winner="a", voter="ana")
        assert isinstance(vote, VoteRead) and (vote.row, vote.a, vote.b, vote.winner) == (
            0,
            "greedy",
            "sampled",
            "a",
        )
        matchup = client.matchup(cid, voter="bo")
        assert isinstance(matchup, MatchupRead) and set(matchup.outputs) == {"a", "b"}
        blind = client.vote(cid, matchup=matchup.matchup, winner="tie")
        assert blind.matchup == matchup.matchup and {blind.a, blind.b} == {"greedy", "sampled"}
        votes = client.votes(cid)
        assert isinstance(votes, VotesRead) and len(votes.votes) == 2
        assert {rank.label for rank in votes.ranking} == {"greedy", "sampled"}
        rating = client.rate(cid, row=2, label="greedy", rating="up", rater="ana")
        assert isinstance(rating, RatingRead) and (rating.row, rating.label, rating.rating) == (
            2,
            "greedy",
            "up",
        )
        ratings = client.ratings(cid)
        assert isinstance(ratings, RatingsRead) and [(r.row, r.rater) for r in ratings.ratings] == [
            (2, "ana")
        ]
        audit = client.audit(cid)
        assert isinstance(audit, AuditRead)
        assert [e["action"] for e in audit.events][-3:] == ["voted", "voted", "rated"]

    def test_models_and_metrics(self, client):
        models = client.models()
        assert all(isinstance(m, ModelRead) for m in models)
        assert "smollm2-135m-instruct" in [m.name for m in models]
        metrics = {m.name: m for m in client.metrics()}
        assert isinstance(metrics["exact_match"], MetricRead)
        assert metrics["exact_match"].greater_is_better and metrics["exact_match"].scale == "binary"

    def test_deliveries_and_a_verified_webhook(self, client):
        created = client.submit(spec())
        deliveries = client.deliveries(created.id)
        assert isinstance(deliveries, DeliveriesRead) and deliveries.deliveries == []
        secret = client.webhook_secret().secret
        assert secret.startswith("whsec_") and client.webhook_secret().secret == secret
        body = json.dumps({"type": "comparison.finished", "data": {"id": created.id}}).encode()
        headers = signed_headers([secret], msg_id="msg_1", timestamp=int(time.time()), body=body)
        assert verify_webhook(body, headers, secret) == {
            "type": "comparison.finished",
            "data": {"id": created.id},
        }


# ---------------------------------------------------------------- errors


class TestErrors:
    def test_422_carries_every_field_problem_and_is_not_retried(self, client):
        sent = record_requests(client)
        body = spec()
        body["candidates"][0]["generation"] = {"temperature": 99}
        body["candidates"][1]["label"] = "bad label!"
        with pytest.raises(ApiError) as caught:
            client.submit(body)
        error = caught.value
        assert (error.status_code, error.code) == (422, "invalid_request")
        assert error.message.startswith("The comparison was not queued")
        assert all(isinstance(f, FieldErrorRead) for f in error.fields)
        assert [(f.field, f.message) for f in error.fields] == [
            ("candidates[0].generation.temperature", "Input should be less than or equal to 10"),
            ("candidates[1].label", "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}$'"),
        ]
        assert str(error).startswith("HTTP 422: The comparison was not queued")
        assert sent == ["POST /v1/comparisons"]

    def test_404(self, client):
        with pytest.raises(ApiError) as caught:
            client.get("no-such-comparison")
        assert (caught.value.status_code, caught.value.code) == (404, "not_found")
        assert "no-such-comparison" in caught.value.message

    def test_an_id_cannot_reach_another_route(self, client):
        sent = record_requests(client)
        for cid in ("../models", ".."):
            with pytest.raises(ApiError) as caught:
                client.cancel(cid)
            assert caught.value.status_code == 404
        assert sent == ["POST /v1/comparisons/%2E%2E%2Fmodels/cancel", "POST /v1/comparisons/%2E%2E/cancel"]

    def test_401_without_or_with_a_wrong_key(self, auth_api, auth_store):
        for key in (None, "llmc_000000000000_" + "x" * 43):
            with ComparisonClient(auth_api.api_url, api_key=key) as client, pytest.raises(ApiError) as caught:
                client.list()
            assert (caught.value.status_code, caught.value.code) == (401, "unauthorized")
            assert "llm-compare keys create" in caught.value.message

    def test_403_for_a_role_too_low(self, auth_api, auth_store):
        _, reader = new_key(auth_store, "team-r", Role.reader)
        with ComparisonClient(auth_api.api_url, api_key=reader) as client:
            assert client.list().items == []
            with pytest.raises(ApiError) as caught:
                client.submit(spec())
        assert (caught.value.status_code, caught.value.code) == (403, "forbidden")

    def test_async_401(self, auth_api):
        async def main() -> None:
            async with AsyncComparisonClient(auth_api.api_url, api_key="llmc_wrong") as client:
                await client.models()

        with pytest.raises(ApiError) as caught:
            asyncio.run(main())
        assert caught.value.status_code == 401


class TestAuthenticated:
    def test_the_key_is_sent_and_names_the_owner(self, auth_api, auth_store):
        _, key = new_key(auth_store, "team-client")
        with ComparisonClient(auth_api.api_url, api_key=key) as client:
            created = client.submit(spec())
            assert created.owner == "team-client"
            assert [c.id for c in client.list().items] == [created.id]

    def test_429_is_retried_after_retry_after(self, auth_api, auth_store):
        """The key's rate is used up: the API answers 429 with Retry-After, the client waits that
        long and the same submission then goes through, queued once."""
        key_id, key = new_key(auth_store, "team-busy", submissions_per_minute=60)
        for _ in range(60):
            auth_store.take_rate_token(f"submit:{key_id}", per_minute=60)
        answers: list[tuple[int, str | None, float]] = []
        with ComparisonClient(auth_api.api_url, api_key=key) as client:
            client.http.event_hooks["response"].append(
                lambda r: answers.append((r.status_code, r.headers.get("retry-after"), time.monotonic()))
            )
            created = client.submit(spec())
            assert created.owner == "team-busy"
            assert [c.id for c in client.list().items] == [created.id]
        (first, retry_after, refused_at), (second, _, accepted_at) = answers[:2]
        assert (first, second) == (429, 202)
        assert retry_after is not None and accepted_at - refused_at >= int(retry_after)

    def test_429_past_the_policy_bound_is_raised(self, auth_api, auth_store):
        key_id, key = new_key(auth_store, "team-slow", submissions_per_minute=1)
        auth_store.take_rate_token(f"submit:{key_id}", per_minute=1)
        policy = RetryPolicy(max_retry_after_s=5)
        with ComparisonClient(auth_api.api_url, api_key=key, retry=policy) as client:
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                client.submit(spec())
        assert time.monotonic() - started < 2
        assert (caught.value.status_code, caught.value.code) == (429, "rate_limited")
        assert caught.value.retry_after is not None and caught.value.retry_after > 5


# ---------------------------------------------------------------- the retry policy


class TestRetryPolicy:
    def test_429_then_202(self):
        with (
            scripted(
                reply(429, error_body("rate_limited", "slow down"), **{"Retry-After": "1"}),
                reply(202, comparison_json("after-429")),
            ) as server,
            ComparisonClient(server.url) as client,
        ):
            created = client.submit(spec())
        assert created.id == "after-429"
        first, second = server.seen
        assert second.at - first.at >= 1.0
        assert first.headers["idempotency-key"] == second.headers["idempotency-key"]

    def test_async_429_then_202(self):
        async def main(url: str) -> ComparisonRead:
            async with AsyncComparisonClient(url) as client:
                return await client.submit(spec())

        with scripted(
            reply(429, error_body("rate_limited", "slow down"), **{"Retry-After": "1"}),
            reply(202, comparison_json("async-after-429")),
        ) as server:
            assert asyncio.run(main(server.url)).id == "async-after-429"
        assert server.seen[1].at - server.seen[0].at >= 1.0
        assert server.seen[0].headers["idempotency-key"] == server.seen[1].headers["idempotency-key"]

    def test_503_is_retried_up_to_the_bound(self):
        with (
            scripted(reply(503, error_body("unavailable", "Redis is down"))) as server,
            ComparisonClient(server.url, retry=FAST) as client,
            pytest.raises(ApiError) as caught,
        ):
            client.get("c1")
        assert (caught.value.status_code, caught.value.code, caught.value.message) == (
            503,
            "unavailable",
            "Redis is down",
        )
        assert len(server.seen) == FAST.attempts

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500])
    def test_other_errors_are_not_retried(self, status):
        with (
            scripted(reply(status, error_body("nope", f"refused with {status}"))) as server,
            ComparisonClient(server.url, retry=FAST) as client,
            pytest.raises(ApiError) as caught,
        ):
            client.submit(spec())
        assert caught.value.status_code == status and caught.value.message == f"refused with {status}"
        assert len(server.seen) == 1

    def test_a_submission_still_in_progress_is_waited_for(self):
        """409 with Retry-After: an earlier try with the same key is still being submitted."""
        with (
            scripted(
                reply(409, error_body("conflict", "still being submitted"), **{"Retry-After": "1"}),
                reply(200, comparison_json("the-first")),
            ) as server,
            ComparisonClient(server.url, retry=FAST) as client,
        ):
            assert client.submit(spec()).id == "the-first"
        assert len(server.seen) == 2

    def test_retry_after_past_the_bound_is_not_waited_for(self):
        with (
            scripted(
                reply(429, error_body("rate_limited", "come back later"), **{"Retry-After": "120"})
            ) as server,
            ComparisonClient(server.url) as client,
            pytest.raises(ApiError) as caught,
        ):
            client.submit(spec())
        assert caught.value.retry_after == 120.0 and len(server.seen) == 1

    def test_one_attempt_turns_retrying_off(self):
        with (
            scripted(reply(503, error_body("unavailable", "down"))) as server,
            ComparisonClient(server.url, retry=RetryPolicy(attempts=1)) as client,
            pytest.raises(ApiError),
        ):
            client.models()
        assert len(server.seen) == 1

    def test_a_dropped_connection_is_retried_only_where_a_replay_is_harmless(self):
        # A read, and a submission (its Idempotency-Key), may be sent again; a cancel may not.
        with (
            scripted(None, reply(200, comparison_json("read-again"))) as server,
            ComparisonClient(server.url, retry=FAST) as client,
        ):
            assert client.get("read-again").id == "read-again"
        assert len(server.seen) == 2
        with (
            scripted(None, reply(200, comparison_json())) as server,
            ComparisonClient(server.url, retry=FAST) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.cancel("c1")
        assert len(server.seen) == 1

    def test_an_error_body_that_is_not_the_apis(self):
        with (
            scripted((502, {"Content-Type": "text/html"}, b"<html>Bad gateway</html>")) as server,
            ComparisonClient(server.url) as client,
            pytest.raises(ApiError) as caught,
        ):
            client.get("c1")
        assert (caught.value.status_code, caught.value.code) == (502, "http_error")
        assert caught.value.message == "<html>Bad gateway</html>" and caught.value.fields == []

    def test_backoff_grows_with_jitter_within_its_cap(self):
        policy = RetryPolicy(backoff_s=1.0, max_backoff_s=4.0)
        for attempt, step in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
            delays = [policy.backoff(attempt) for _ in range(200)]
            assert all(step / 2 <= d <= step for d in delays)
            assert len(set(delays)) > 100  # jittered, not one fixed pause


# ---------------------------------------------------------------- the example


class TestExample:
    def test_waits_and_prints_the_verdict(self, api_only, store, client):
        from examples.compare_my_endpoint import ROWS as EXAMPLE_ROWS

        verdict = "mine better on exact_match: +0.833 [+0.5, +1] (mine − candidate, p=0.031, n=6)"
        decided = {
            "metric": "exact_match",
            "a": "mine",
            "b": "candidate",
            "n": 6,
            "mean_a": 1.0,
            "mean_b": 0.167,
            "mean_diff": 0.833,
            "ci_low": 0.5,
            "ci_high": 1.0,
            "p_value": 0.031,
            "wins": 5,
            "ties": 1,
            "losses": 0,
            "better": "mine",
            "verdict": verdict,
        }
        outputs = {
            "mine": [r["reference"] for r in EXAMPLE_ROWS],
            "candidate": ["Paris", "Kyoto", "eight", "grey", "4", "Saturn"],
        }
        env = {k: v for k, v in os.environ.items() if k != "LLM_COMPARE_KEY"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.compare_my_endpoint", "--timeout", "60"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "LLM_COMPARE_URL": api_only.api_url},
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("Submitted "), first + (proc.stderr.read() if proc.stderr else "")
            cid = first.split()[1].rstrip(";")
            play_worker(store, cid, step_s=0.6, outputs=outputs, pairwise=[decided])
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr
        assert "  mine 6/6   candidate 6/6" in stdout
        assert "my-endpoint-vs-candidate: succeeded" in stdout
        assert "mine       exact_match=1" in stdout and "candidate  exact_match=0.167" in stdout
        assert stdout.rstrip().endswith(f"Verdict:\n  {verdict}")
        state = client.get(cid)
        assert [(c.label, c.model) for c in state.candidates] == [
            ("mine", "smollm2-135m-instruct"),
            ("candidate", "smollm2-135m-instruct"),
        ]

    def test_its_receiver_keeps_only_authentic_deliveries(self):
        from examples.compare_my_endpoint import receive_finished

        secret, port = new_secret(), free_port()
        server, finished = receive_finished(port, secret)
        data = {"id": "c1", "name": "n", "status": "succeeded", "candidates": [], "verdicts": []}
        body = json.dumps({"type": "comparison.finished", "timestamp": "2025-01-01T00:00:00Z", "data": data})
        now = int(time.time())
        try:
            forged = signed_headers([new_secret()], msg_id="msg_1", timestamp=now, body=body.encode())
            genuine = signed_headers([secret], msg_id="msg_1", timestamp=now, body=body.encode())
            url = f"http://127.0.0.1:{port}/"
            assert httpx.post(url, content=body, headers=forged).status_code == 401
            assert httpx.post(url, content=body, headers=genuine).status_code == 204
            assert finished.get(timeout=5) == data
            assert finished.empty()
        finally:
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------- without the service's dependencies

# The isolated process may import the standard library, httpx, pydantic and what they require
# (read from the installed distributions' metadata, as `pip install llm-compare` would pull
# them) and this package's `shared`: any other import fails as if it were not installed.
_ISOLATED = """
import importlib.abc, json, re, sys, sysconfig
from importlib import metadata

# Loaded now: the standard library's generated _sysconfigdata_* module has no fixed name.
sysconfig.get_config_vars()


def requirement_closure(names):
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement.partition(";")[2]:
                continue
            todo.append(re.split(r"[\\s<>=!~;\\[(]", requirement, maxsplit=1)[0])
    return seen


BASE = requirement_closure(["httpx", "pydantic"])
ALLOWED = {"shared"} | {
    module
    for module, dists in metadata.packages_distributions().items()
    if any(d.lower().replace("_", "-") in BASE for d in dists)
}


def allowed(name):
    top = name.split(".")[0]
    return top in sys.stdlib_module_names or top in ALLOWED


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if not allowed(name):
            raise ImportError(f"{name} is not installed here")
        return None


before = set(sys.modules)
sys.meta_path.insert(0, Refuse())
from shared.client import ComparisonClient, verify_webhook

spec = json.loads(sys.argv[2])
with ComparisonClient(sys.argv[1]) as client:
    created = client.submit(spec)
    state = client.get(created.id)
    results = client.results(created.id)
    try:
        client.results_frame(created.id)
        frame_error = None
    except ImportError as exc:
        frame_error = str(exc)
    cancelled = client.cancel(created.id)
print(json.dumps({
    "id": created.id,
    "status": state.status.value,
    "rows": [row.input for row in results.rows],
    "cancelled": cancelled.status.value,
    "frame_error": frame_error,
    "loaded": sorted(m for m in set(sys.modules) - before if not allowed(m)),
    "base": sorted(BASE),
    "verify": callable(verify_webhook),
}))
"""


class TestImportsOnlyWhatItNeeds:
    def test_works_without_the_services_dependencies(self, api_only, client):
        body = spec()
        done = subprocess.run(
            [sys.executable, "-c", _ISOLATED, api_only.api_url, json.dumps(body)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["loaded"] == [] and out["verify"] is True
        # What may be imported: httpx and pydantic with their own requirements, nothing of the service.
        assert {"httpx", "pydantic", "pydantic-core", "httpcore", "anyio"} <= set(out["base"])
        assert not {"fastapi", "redis", "pydantic-settings", "pyyaml", "structlog"} & set(out["base"])
        assert out["status"] == "queued" and out["cancelled"] == "cancelled"
        assert out["rows"] == [r["input"] for r in ROWS]
        assert "results_frame() needs pandas" in out["frame_error"]
        assert client.get(out["id"]).name == body["name"]
