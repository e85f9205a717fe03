"""Webhooks through the app in process (FastAPI's TestClient) against real Redis: callbacks checked
at submit time, each key's signing secret and its rotation, and the deliveries listing with its
ownership. Deliveries are made in process with a recording transport (services/worker/webhooks.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.worker import webhooks
from shared.apikeys import Role, issue_key
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.webhook_signing import secret_bytes, verify
from shared.webhook_store import WebhookStore
from tests.fixtures.finished import spec_dict, write_finished

RECEIVER = "http://127.0.0.1:8123/hooks"


@pytest.fixture
def settings(redis_url, redis_prefix) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        mlflow_tracking_uri="http://127.0.0.1:9",
        auth_disabled=False,
        rate_limit_submissions_per_minute=1000,
        max_running_comparisons=50,
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_retry_schedule_s=[0, 5],
        webhook_secret_grace_s=3600,
    )


@pytest.fixture
def store(redis_client, settings) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=settings.key_prefix, ttl_s=600)


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def new_key(store: ComparisonStore, name: str, role: Role = Role.submitter) -> tuple[str, str]:
    record, whole = issue_key(store, name=name, role=role)
    return record.id, whole


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client: TestClient, token: str, callbacks: list[dict[str, Any]]) -> Any:
    return client.post("/v1/comparisons", json=spec_dict(callbacks=callbacks), headers=bearer(token))


def fields(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {f["field"]: f["message"] for f in response.json()["fields"]}


class TestSubmit:
    def test_callbacks_to_a_listed_host_are_accepted_and_kept_apart_from_the_spec(self, client, store):
        key_id, token = new_key(store, "team-a")
        response = submit(
            client, token, [{"url": RECEIVER, "events": ["comparison.finished", "comparison.finished"]}]
        )
        assert response.status_code == 202, response.text
        cid = response.json()["id"]
        assert WebhookStore(store).callbacks(cid) == (
            key_id,
            [{"url": RECEIVER, "events": ["comparison.finished"]}],
        )
        assert "callbacks" not in store.r.hget(f"{store.prefix}:cmp:{cid}", "spec")

    def test_events_default_to_all_three(self, client, store):
        _, token = new_key(store, "team-a")
        cid = submit(client, token, [{"url": RECEIVER}]).json()["id"]
        assert WebhookStore(store).callbacks(cid)[1][0]["events"] == [
            "comparison.started",
            "candidate.finished",
            "comparison.finished",
        ]

    def test_a_loopback_address_not_on_the_allowlist_is_refused(self, client, store):
        _, token = new_key(store, "team-a")
        before = client.get("/v1/comparisons", headers=bearer(token)).json()["total"]
        response = submit(client, token, [{"url": "http://127.0.0.2:8123/hooks"}])
        assert fields(response) == {
            "callbacks[0].url": "127.0.0.2:8123 is not on the operator's allowlist (WEBHOOK_ALLOWED_HOSTS); "
            "ask an operator to add it, or use a listed host"
        }
        assert response.json()["message"].startswith("The comparison was not queued.")
        assert client.get("/v1/comparisons", headers=bearer(token)).json()["total"] == before

    @pytest.mark.parametrize(
        ("callbacks", "field", "message"),
        [
            ([{"url": "ftp://127.0.0.1/x"}], "callbacks[0].url", "the scheme must be http or https"),
            (
                [{"url": "http://me:pw@127.0.0.1/x"}],
                "callbacks[0].url",
                "credentials in the URL are not sent",
            ),
            (
                [{"url": "http://localhost:8123/x"}],
                "callbacks[0].url",
                "localhost:8123 is not on the operator's",
            ),
            (
                [{"url": RECEIVER, "events": ["comparison.done"]}],
                "callbacks[0].events[0]",
                "comparison.started",
            ),
            ([{"url": RECEIVER, "events": []}], "callbacks[0].events", "at least 1 item"),
            ([{"url": RECEIVER, "secret": "x"}], "callbacks[0].secret", "unknown field"),
            ([{"url": RECEIVER}, {"url": RECEIVER}], "callbacks[1].url", "the same URL as callbacks[0]"),
            ([{"url": f"{RECEIVER}/{i}"} for i in range(6)], "callbacks", "at most 5 items"),
            ([{"url": "http://127.0.0.1/" + "a" * 2000}], "callbacks[0].url", "at most 2000 characters"),
        ],
    )
    def test_refusals_name_the_field(self, client, store, callbacks, field, message):
        _, token = new_key(store, "team-a")
        problems = fields(submit(client, token, callbacks))
        assert field in problems, problems
        assert message in problems[field]

    def test_five_callbacks_fit_the_body_shape_limits(self, client, store):
        _, token = new_key(store, "team-a")
        response = submit(client, token, [{"url": f"{RECEIVER}/{i}"} for i in range(5)])
        assert response.status_code == 202, response.text

    def test_without_an_allowlist_callbacks_are_off(self, settings, store):
        _, token = new_key(store, "team-a")
        with TestClient(create_app(settings.model_copy(update={"webhook_allowed_hosts": []}))) as client:
            problems = fields(submit(client, token, [{"url": RECEIVER}]))
        assert problems["callbacks[0].url"].startswith("webhooks are off on this service")


class TestSecret:
    def test_each_key_has_its_own_stable_secret(self, client, store):
        a_id, a = new_key(store, "team-a", Role.reader)
        b_id, b = new_key(store, "team-b")
        first = client.get("/v1/webhooks/secret", headers=bearer(a))
        assert first.status_code == 200
        assert first.headers["cache-control"] == "no-store"
        body = first.json()
        assert body["key_id"] == a_id and body["secret"].startswith("whsec_")
        assert len(secret_bytes(body["secret"])) == 32
        assert body["previous_expires_at"] is None
        assert client.get("/v1/webhooks/secret", headers=bearer(a)).json() == body
        other = client.get("/v1/webhooks/secret", headers=bearer(b)).json()
        assert other["key_id"] == b_id and other["secret"] != body["secret"]

    def test_rotation_keeps_the_old_secret_signing_during_the_grace_period(self, client, store, settings):
        key_id, token = new_key(store, "team-a")
        old = client.get("/v1/webhooks/secret", headers=bearer(token)).json()["secret"]
        before = datetime.now(UTC)
        rotated = client.post("/v1/webhooks/secret/rotate", headers=bearer(token))
        assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
        body = rotated.json()
        assert body["secret"] != old and body["secret"].startswith("whsec_")
        expires = datetime.fromisoformat(body["previous_expires_at"])
        assert before + timedelta(seconds=3600) <= expires <= datetime.now(UTC) + timedelta(seconds=3600)
        assert client.get("/v1/webhooks/secret", headers=bearer(token)).json() == body
        record = WebhookStore(store).secret(key_id)
        assert record.signing_secrets(datetime.now(UTC)) == [body["secret"], old]
        assert record.signing_secrets(expires + timedelta(seconds=1)) == [body["secret"]]

    def test_needs_a_key_and_works_with_auth_off(self, client, settings):
        assert client.get("/v1/webhooks/secret").status_code == 401
        assert client.post("/v1/webhooks/secret/rotate").status_code == 401
        with TestClient(create_app(settings.model_copy(update={"auth_disabled": True}))) as local:
            body = local.get("/v1/webhooks/secret").json()
            assert body["key_id"] == "local" and body["secret"].startswith("whsec_")
            assert local.post("/v1/webhooks/secret/rotate").json()["secret"] != body["secret"]


class TestDeliveries:
    def deliver_all(self, settings: Settings, store: ComparisonStore, cid: str, statuses: list[int]) -> None:
        """What the I/O workers do, in process: every attempt until none is pending."""
        answers = list(statuses)

        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(answers.pop(0) if answers else 204)

        now = [time.time()]
        ctx = webhooks.WebhookContext(
            settings=settings,
            store=store,
            dispatch=lambda *_: None,
            transport=lambda target, deadline: httpx.MockTransport(answer),
            clock=lambda: now[0],
        )
        for event in ("comparison.started", "comparison.finished"):
            webhooks.emit(store, settings, ctx.dispatch, cid, event)
        for _ in range(5):
            for delivery in ctx.hooks.deliveries(cid):
                webhooks.deliver(ctx, cid, delivery.webhook_id)
            now[0] += 6

    def test_deliveries_list_attempts_with_status_codes(self, client, store, settings):
        key_id, token = new_key(store, "team-a", Role.reader)
        cid = write_finished(
            store,
            spec=spec_dict(callbacks=[{"url": RECEIVER, "events": ["comparison.finished"]}]),
            owner="team-a",
            key_id=key_id,
        )
        self.deliver_all(settings, store, cid, [500])
        response = client.get(f"/v1/comparisons/{cid}/deliveries", headers=bearer(token))
        assert response.status_code == 200
        [delivery] = response.json()["deliveries"]
        assert delivery["event"] == "comparison.finished" and delivery["url"] == RECEIVER
        assert delivery["webhook_id"].startswith("msg_") and delivery["callback"] == 0
        assert delivery["state"] == "delivered" and delivery["next_attempt_at"] is None
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 204]
        assert "answered 500" in delivery["attempts"][0]["error"] and delivery["attempts"][1]["error"] is None
        assert all(a["duration_ms"] >= 0 for a in delivery["attempts"])

    def test_a_pending_delivery_shows_its_next_retry(self, client, store, settings):
        key_id, token = new_key(store, "team-a")
        cid = write_finished(
            store,
            spec=spec_dict(callbacks=[{"url": RECEIVER, "events": ["comparison.started"]}]),
            owner="team-a",
            key_id=key_id,
        )
        ctx = webhooks.WebhookContext(
            settings=settings,
            store=store,
            dispatch=lambda *_: None,
            transport=lambda target, deadline: httpx.MockTransport(lambda request: httpx.Response(503)),
        )
        [wid] = webhooks.emit(store, settings, ctx.dispatch, cid, "comparison.started")
        webhooks.deliver(ctx, cid, wid)
        [delivery] = client.get(f"/v1/comparisons/{cid}/deliveries", headers=bearer(token)).json()[
            "deliveries"
        ]
        assert delivery["state"] == "pending" and [a["status_code"] for a in delivery["attempts"]] == [503]
        next_at = datetime.fromisoformat(delivery["next_attempt_at"])
        attempted = datetime.fromisoformat(delivery["attempts"][0]["at"])
        assert timedelta(seconds=4.9) < next_at - attempted < timedelta(seconds=7)

    def test_another_team_gets_404_and_an_admin_sees_them(self, client, store, settings):
        key_id, token = new_key(store, "team-a")
        _, other = new_key(store, "team-b")
        _, admin = new_key(store, "ops", Role.admin)
        cid = write_finished(
            store, spec=spec_dict(callbacks=[{"url": RECEIVER}]), owner="team-a", key_id=key_id
        )
        self.deliver_all(settings, store, cid, [])
        response = client.get(f"/v1/comparisons/{cid}/deliveries", headers=bearer(other))
        assert response.status_code == 404
        assert response.json()["message"] == f"No comparison with id {cid!r}"
        events = [
            d["event"]
            for d in client.get(f"/v1/comparisons/{cid}/deliveries", headers=bearer(admin)).json()[
                "deliveries"
            ]
        ]
        assert sorted(events) == ["comparison.finished", "comparison.started"]
        assert client.get("/v1/comparisons/nope/deliveries", headers=bearer(token)).status_code == 404

    def test_deliveries_are_signed_with_the_submitting_keys_secret(self, client, store, settings):
        key_id, token = new_key(store, "team-a")
        _, other = new_key(store, "team-b")
        cid = write_finished(
            store,
            spec=spec_dict(callbacks=[{"url": RECEIVER, "events": ["comparison.finished"]}]),
            key_id=key_id,
        )
        seen: list[httpx.Request] = []

        def answer(request: httpx.Request) -> httpx.Response:
            request.read()
            seen.append(request)
            return httpx.Response(200)

        ctx = webhooks.WebhookContext(
            settings=settings,
            store=store,
            dispatch=lambda *_: None,
            transport=lambda target, deadline: httpx.MockTransport(answer),
        )
        [wid] = webhooks.emit(store, settings, ctx.dispatch, cid, "comparison.finished")
        assert webhooks.deliver(ctx, cid, wid) == "delivered"
        mine = client.get("/v1/webhooks/secret", headers=bearer(token)).json()["secret"]
        theirs = client.get("/v1/webhooks/secret", headers=bearer(other)).json()["secret"]
        assert verify(seen[0].content, dict(seen[0].headers), mine)["data"]["id"] == cid
        with pytest.raises(ValueError, match="no signature matches"):
            verify(seen[0].content, dict(seen[0].headers), theirs)
