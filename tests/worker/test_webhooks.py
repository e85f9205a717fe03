"""Webhook emission and delivery in process, against real Redis: events recorded once per webhook
id, attempts through a recording transport (or, where the connection itself is under test, to a
receiver on loopback), retries from the due set, signatures checked with the standardwebhooks
library and with shared.webhook_signing."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import standardwebhooks

from services.worker import webhooks
from services.worker.locks import Lease
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import DELIVER_WEBHOOK
from shared.webhook_signing import verify
from shared.webhook_store import WebhookStore
from shared.webhook_targets import Target, check_target, parse_allowed_hosts
from shared.webhooks import webhook_id
from tests.fixtures.finished import spec_dict, write_finished
from tests.fixtures.webhook_receiver import WebhookReceiver

HOOK = "http://127.0.0.1:8123/hooks"
OTHER = "http://127.0.0.1:8124/only-finished"


@dataclass
class RecordingDispatch:
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, name: str, kwargs: dict[str, Any], task_id: str) -> None:
        self.sent.append((name, dict(kwargs)))


@dataclass
class RecordingTransport:
    """Answers each request with the next scripted status (then 204) and records it, with the
    target the delivery was checked against."""

    statuses: list[int] = field(default_factory=list)
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def __call__(self, target: Target, deadline: float) -> httpx.BaseTransport:
        self.targets.append(target)
        return httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 204
        return httpx.Response(status, headers=self.headers.get(len(self.requests), {}))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(redis_url, redis_prefix) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_retry_schedule_s=[0, 5, 300],
        webhook_timeout_s=2,
        api_public_url="http://api.test:8000",
        mlflow_public_url="http://mlflow.test:5000",
    )


@pytest.fixture
def store(redis_client, settings) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=settings.key_prefix, ttl_s=3600)


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def ctx(settings, store, transport) -> webhooks.WebhookContext:
    return webhooks.WebhookContext(
        settings=settings, store=store, dispatch=RecordingDispatch(), transport=transport, clock=Clock()
    )


def finished(store: ComparisonStore, *callbacks: dict[str, Any], key_id: str = "k1") -> str:
    return write_finished(store, spec=spec_dict(callbacks=list(callbacks)), owner="team-a", key_id=key_id)


def emit(ctx: webhooks.WebhookContext, cid: str, event: str, label: str | None = None) -> list[str]:
    return webhooks.emit(ctx.store, ctx.settings, ctx.dispatch, cid, event, label=label)


def sent(ctx: webhooks.WebhookContext) -> list[tuple[str, dict[str, Any]]]:
    assert isinstance(ctx.dispatch, RecordingDispatch)
    return ctx.dispatch.sent


class TestEmit:
    def test_one_delivery_per_subscribed_callback_and_event_once(self, ctx, store):
        cid = finished(store, {"url": HOOK}, {"url": OTHER, "events": ["comparison.finished"]})
        started = emit(ctx, cid, "comparison.started")
        assert started == [webhook_id(cid, "comparison.started", 0)]
        done = emit(ctx, cid, "comparison.finished")
        assert done == [webhook_id(cid, "comparison.finished", 0), webhook_id(cid, "comparison.finished", 1)]
        assert sent(ctx) == [
            (DELIVER_WEBHOOK, {"comparison_id": cid, "webhook_id": wid}) for wid in started + done
        ]
        # Emitted again (a redelivered step): same ids, nothing new stored or sent.
        assert emit(ctx, cid, "comparison.finished") == []
        assert emit(ctx, cid, "comparison.started") == []
        assert len(sent(ctx)) == 3
        deliveries = ctx.hooks.deliveries(cid)
        assert sorted((d.event, d.url, d.state, d.key_id) for d in deliveries) == [
            ("comparison.finished", HOOK, "pending", "k1"),
            ("comparison.finished", OTHER, "pending", "k1"),
            ("comparison.started", HOOK, "pending", "k1"),
        ]

    def test_candidate_finished_once_per_candidate_once_it_has_ended(self, ctx, store):
        cid = finished(store, {"url": HOOK, "events": ["candidate.finished"]})
        ids = emit(ctx, cid, "candidate.finished", "greedy") + emit(ctx, cid, "candidate.finished", "sampled")
        assert ids == [
            webhook_id(cid, "candidate.finished", 0, "greedy"),
            webhook_id(cid, "candidate.finished", 0, "sampled"),
        ]
        assert len(set(ids)) == 2
        body = json.loads(ctx.hooks.delivery(cid, ids[0]).body)
        assert (body["type"], body["data"]["label"]) == ("candidate.finished", "greedy")

    def test_a_candidate_still_running_emits_nothing(self, ctx, store):
        cid = finished(store, {"url": HOOK})
        store.r.hset(f"{store.prefix}:cmp:{cid}:cand:greedy", "status", "running")
        assert emit(ctx, cid, "candidate.finished", "greedy") == []

    def test_no_callbacks_no_deliveries(self, ctx, store):
        cid = write_finished(store)
        assert emit(ctx, cid, "comparison.finished") == []
        assert sent(ctx) == [] and ctx.hooks.deliveries(cid) == []

    def test_the_body_summarises_the_comparison(self, ctx, store):
        cid = finished(store, {"url": HOOK})
        [wid] = emit(ctx, cid, "comparison.finished")
        body = json.loads(ctx.hooks.delivery(cid, wid).body)
        assert body["type"] == "comparison.finished"
        assert datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")) <= datetime.now(UTC)
        data = body["data"]
        assert (data["id"], data["name"], data["status"], data["owner"]) == (
            cid,
            "capitals",
            "succeeded",
            "team-a",
        )
        assert [(c["label"], c["status"], c["metrics"]) for c in data["candidates"]] == [
            ("greedy", "succeeded", {"exact_match": 0.25, "output_words": 3.25}),
            ("sampled", "succeeded", {"exact_match": 0.25, "output_words": 1.5}),
        ]
        # Only decided verdicts: exact_match had no clear difference.
        assert [(v["metric"], v["better"], v["p_value"]) for v in data["verdicts"]] == [
            ("output_words", "sampled", 0.04)
        ]
        assert data["links"] == {
            "comparison": f"http://api.test:8000/v1/comparisons/{cid}",
            "results": f"http://api.test:8000/v1/comparisons/{cid}/results",
            "deliveries": f"http://api.test:8000/v1/comparisons/{cid}/deliveries",
            "page": f"http://api.test:8000/ui/comparisons/{cid}",
            "mlflow": "http://mlflow.test:5000/#/experiments/7/runs/parent123",
        }

    def test_a_failing_emit_never_raises(self, settings):
        broken = ComparisonStore(redis.Redis(port=1, socket_connect_timeout=0.2), prefix="x")
        assert webhooks.emit_safely(broken, settings, RecordingDispatch(), "c1", "comparison.finished") == []

    def test_a_lost_dispatch_is_sent_by_the_sweep(self, ctx, store):
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})

        def refuse(*_: Any) -> None:
            raise ConnectionError("broker down")

        [wid] = webhooks.emit(store, ctx.settings, refuse, cid, "comparison.finished")
        assert webhooks.sweep_due(ctx) == 0  # not before the attempt window
        ctx.clock.now += webhooks.attempt_window_s(ctx.settings) + 60
        assert webhooks.sweep_due(ctx) == 1
        assert sent(ctx) == [(DELIVER_WEBHOOK, {"comparison_id": cid, "webhook_id": wid})]


class TestDeliver:
    def test_a_delivery_is_signed_and_sent_once(self, ctx, store, transport):
        cid = finished(store, {"url": HOOK})
        [wid] = emit(ctx, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        assert webhooks.deliver(ctx, cid, wid) == "delivered"  # a redelivered task sends nothing
        [request] = transport.requests
        assert (str(request.url), request.method) == (HOOK, "POST")
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-id"] == wid
        secret = ctx.hooks.secret("k1").secret
        headers = dict(request.headers)
        assert verify(request.content, headers, secret)["data"]["id"] == cid
        assert (
            standardwebhooks.Webhook(secret).verify(request.content, headers)["type"] == "comparison.finished"
        )
        assert transport.targets[0].address == "127.0.0.1"
        record = ctx.hooks.delivery(cid, wid)
        assert record.state == "delivered" and record.next_attempt_at is None
        assert [(a.status_code, a.error) for a in record.attempts] == [(204, None)]
        assert ctx.hooks.due_at(cid, wid) is None

    def test_a_500_is_retried_on_schedule_with_the_same_webhook_id(self, ctx, store, transport):
        transport.statuses = [500]
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        start = ctx.clock.now
        assert webhooks.deliver(ctx, cid, wid) == "pending"
        record = ctx.hooks.delivery(cid, wid)
        assert [a.status_code for a in record.attempts] == [500]
        assert "answered 500" in record.attempts[0].error
        assert record.next_attempt_at.timestamp() == pytest.approx(start + 5)
        assert ctx.hooks.due_at(cid, wid) == pytest.approx(start + 5)
        # Too early: a task sent twice, or a message redelivered, attempts nothing.
        assert webhooks.deliver(ctx, cid, wid) == "not_due"
        ctx.clock.now = start + 4
        assert webhooks.sweep_due(ctx) == 0
        ctx.clock.now = start + 5.5
        assert webhooks.sweep_due(ctx) == 1
        assert sent(ctx)[-1] == (DELIVER_WEBHOOK, {"comparison_id": cid, "webhook_id": wid})
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        assert [r.headers["webhook-id"] for r in transport.requests] == [wid, wid]
        assert transport.requests[0].content == transport.requests[1].content
        secret = ctx.hooks.secret("k1").secret
        for request in transport.requests:
            assert (
                verify(request.content, dict(request.headers), secret, now=ctx.clock.now)["data"]["id"] == cid
            )
        record = ctx.hooks.delivery(cid, wid)
        assert [a.status_code for a in record.attempts] == [500, 204]
        assert record.state == "delivered"

    def test_a_delivery_fails_once_the_schedule_is_used_up(self, ctx, store, transport):
        transport.statuses = [503, 500, 502]
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        states = []
        for _ in range(3):
            states.append(webhooks.deliver(ctx, cid, wid))
            ctx.clock.now += 301
        assert states == ["pending", "pending", "failed"]
        record = ctx.hooks.delivery(cid, wid)
        assert [a.status_code for a in record.attempts] == [503, 500, 502]
        assert record.next_attempt_at is None and ctx.hooks.due_at(cid, wid) is None
        assert webhooks.deliver(ctx, cid, wid) == "failed" and len(transport.requests) == 3

    def test_a_redirect_is_a_failed_attempt(self, ctx, store, transport):
        transport.statuses = [302, 308]
        transport.headers = {1: {"location": "http://127.0.0.1:8123/elsewhere"}}
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, wid) == "pending"
        ctx.clock.now += 6
        assert webhooks.deliver(ctx, cid, wid) == "pending"
        attempts = ctx.hooks.delivery(cid, wid).attempts
        assert [a.status_code for a in attempts] == [302, 308]
        assert "not followed" in attempts[0].error and "only 307 and 308 keep the POST" in attempts[0].error
        assert "not followed" in attempts[1].error and "only 307" not in attempts[1].error
        assert [str(r.url) for r in transport.requests] == [HOOK, HOOK]

    def test_with_redirects_on_each_hop_is_checked(self, ctx, store, transport):
        ctx.settings = ctx.settings.model_copy(update={"webhook_max_redirects": 1})
        transport.statuses = [307, 200, 307]
        transport.headers = {1: {"location": "/moved"}, 3: {"location": "http://127.0.0.2:8123/x"}}
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished", "comparison.started"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        assert [str(r.url) for r in transport.requests] == [HOOK, "http://127.0.0.1:8123/moved"]
        [other] = emit(ctx, cid, "comparison.started")
        assert webhooks.deliver(ctx, cid, other) == "pending"
        attempt = ctx.hooks.delivery(cid, other).attempts[0]
        assert attempt.status_code is None
        assert "refused: 127.0.0.2:8123 is not on the operator's allowlist" in attempt.error
        assert len(transport.requests) == 3  # nothing went to 127.0.0.2

    def test_the_target_is_checked_again_at_every_attempt(self, ctx, store, transport):
        """DNS may change between submit and delivery: a name allowed through a wildcard that
        now resolves to a private address gets no request."""
        ctx.settings = ctx.settings.model_copy(update={"webhook_allowed_hosts": ["*.example.com"]})
        answers = {"hooks.example.com": ["93.184.215.14"]}
        ctx.resolve = lambda host, port: answers[host]
        cid = finished(store, {"url": "https://hooks.example.com/in", "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        answers["hooks.example.com"] = ["10.0.0.8"]
        assert webhooks.deliver(ctx, cid, wid) == "pending"
        assert transport.requests == []
        error = ctx.hooks.delivery(cid, wid).attempts[0].error
        assert error.startswith("refused: hooks.example.com resolves to 10.0.0.8, a private address")
        answers["hooks.example.com"] = ["93.184.215.14"]
        ctx.clock.now += 6
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        assert transport.targets[-1].address == "93.184.215.14"

    def test_an_attempt_in_progress_is_not_doubled(self, ctx, store, transport):
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        other_attempt = Lease(store.r, ctx.hooks.lock_key(wid), ttl_s=30)
        assert other_attempt.acquire()
        assert webhooks.deliver(ctx, cid, wid) == "busy"
        assert transport.requests == []
        other_attempt.release()
        assert webhooks.deliver(ctx, cid, wid) == "delivered"

    def test_an_expired_delivery_leaves_the_due_set(self, ctx, store):
        cid = finished(store, {"url": HOOK, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        store.r.delete(f"{store.prefix}:cmp:{cid}:deliveries")
        assert webhooks.deliver(ctx, cid, wid) == "gone"
        assert ctx.hooks.due_at(cid, wid) is None


class TestRotation:
    def test_both_secrets_sign_during_the_grace_period_then_only_the_new_one(self, ctx, store, transport):
        cid = finished(store, {"url": HOOK})
        old = ctx.hooks.secret("k1").secret
        rotated = ctx.hooks.rotate_secret("k1", grace_s=3600, now=datetime.fromtimestamp(ctx.clock.now, UTC))
        new = rotated.secret
        assert new != old and rotated.previous == old
        [started] = emit(ctx, cid, "comparison.started")
        assert webhooks.deliver(ctx, cid, started) == "delivered"
        request = transport.requests[0]
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        for secret in (old, new):
            assert (
                standardwebhooks.Webhook(secret).verify(request.content, dict(request.headers))["data"]["id"]
                == cid
            )
            assert verify(request.content, dict(request.headers), secret)["data"]["id"] == cid
        ctx.clock.now += 3601
        [done] = emit(ctx, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, done) == "delivered"
        late = transport.requests[1]
        assert len(late.headers["webhook-signature"].split(" ")) == 1
        assert (
            verify(late.content, dict(late.headers), new, now=ctx.clock.now)["type"] == "comparison.finished"
        )
        with pytest.raises(ValueError, match="no signature matches"):
            verify(late.content, dict(late.headers), old, now=ctx.clock.now)


# ------------------------------------------------------------------------- the real connection
@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


class TestPinnedConnection:
    def test_the_request_goes_to_the_checked_address(self, settings, store, receiver):
        """hooks.test resolves nowhere but in the check's resolver: the request reaching the
        receiver went to the address the check returned, not to a fresh DNS answer."""
        settings = settings.model_copy(update={"webhook_allowed_hosts": ["hooks.test"]})
        ctx = webhooks.WebhookContext(
            settings=settings,
            store=store,
            dispatch=RecordingDispatch(),
            resolve=lambda host, port: {"hooks.test": ["127.0.0.1"]}[host],
        )
        url = f"http://hooks.test:{receiver.port}/hooks"
        cid = finished(store, {"url": url, "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        [got] = receiver.received
        assert got.headers["host"] == f"hooks.test:{receiver.port}"
        assert got.path == "/hooks" and got.webhook_id == wid
        secret = ctx.hooks.secret("k1").secret
        assert standardwebhooks.Webhook(secret).verify(got.body, got.headers)["data"]["id"] == cid
        assert ctx.hooks.delivery(cid, wid).attempts[0].status_code == 204

    def test_a_pinned_transport_connects_nowhere_else(self, receiver):
        target = check_target(receiver.url, parse_allowed_hosts(["127.0.0.1"]))
        transport = webhooks.pinned_transport(target, time.monotonic() + 5)
        with httpx.Client(transport=transport) as client:
            assert client.post(receiver.url, content=b"{}").status_code == 204
            with pytest.raises(httpx.ConnectError, match="not the checked target"):
                client.post(f"http://localhost:{receiver.port}/hooks", content=b"{}")
        assert len(receiver.received) == 1

    def test_a_receiver_that_drips_its_answer_is_cut_at_the_timeout(self, settings, store):
        """Each byte comes within the read timeout; the attempt as a whole still ends on time."""
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        stop = threading.Event()

        def drip() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                    if stop.wait(0.1):
                        return
                    conn.sendall(bytes([byte]))

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        ctx = webhooks.WebhookContext(
            settings=settings.model_copy(update={"webhook_timeout_s": 1.0}),
            store=store,
            dispatch=RecordingDispatch(),
        )
        cid = finished(store, {"url": f"http://127.0.0.1:{port}/slow", "events": ["comparison.finished"]})
        [wid] = emit(ctx, cid, "comparison.finished")
        try:
            started = time.monotonic()
            assert webhooks.deliver(ctx, cid, wid) == "pending"
            assert time.monotonic() - started < 3
        finally:
            stop.set()
            listener.close()
        attempt = ctx.hooks.delivery(cid, wid).attempts[0]
        assert attempt.status_code is None
        assert attempt.error == "no complete answer within 1 s (WEBHOOK_TIMEOUT_S)"
        assert 900 <= attempt.duration_ms < 3000


class TestStore:
    def test_claiming_due_deliveries_hands_each_to_one_sweep(self, store):
        hooks = WebhookStore(store)
        for i in range(3):
            hooks.schedule("c1", f"msg_{i}", at=100.0 + i)
        assert hooks.claim_due(now=101.0, hold_s=60) == [("c1", "msg_0"), ("c1", "msg_1")]
        assert hooks.claim_due(now=101.0, hold_s=60) == []
        assert hooks.due_at("c1", "msg_0") == 161.0
        assert hooks.claim_due(now=200.0, hold_s=60, limit=10) == [
            ("c1", "msg_2"),
            ("c1", "msg_0"),
            ("c1", "msg_1"),
        ]

    def test_a_secret_is_created_once_and_kept(self, store):
        hooks = WebhookStore(store)
        first = hooks.secret("k9")
        assert first.secret.startswith("whsec_") and hooks.secret("k9") == first
        assert hooks.secret("k10").secret != first.secret
