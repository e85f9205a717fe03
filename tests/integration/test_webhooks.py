"""Webhooks end to end: a comparison with a callback runs on the real stack (API, model workers,
an I/O worker) and a receiver on loopback gets every event, signed, and a retry after it
answered 500."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import standardwebhooks

from scripts.stack import Stack
from shared.webhook_signing import verify
from tests.fixtures.webhook_receiver import Received, WebhookReceiver
from tests.integration.test_end_to_end import tiny_spec

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def finished_delivered(received: list[Received]) -> bool:
    return any(r.event == "comparison.finished" and r.status == 204 for r in received)


def test_every_event_signed_once_per_webhook_id_with_a_retry(
    stack: Stack, tiny_models: dict[str, Path], receiver: WebhookReceiver
):
    receiver.fail = {"comparison.finished": [500]}
    api = httpx.Client(base_url=stack.api_url, timeout=30)
    spec = tiny_spec(tiny_models, metrics=["output_words"], callbacks=[{"url": receiver.url}])
    submitted = api.post("/v1/comparisons", json=spec)
    assert submitted.status_code == 202, submitted.text
    cid = submitted.json()["id"]
    received = receiver.wait_for(finished_delivered, timeout=240)

    secret = api.get("/v1/webhooks/secret").json()["secret"]
    for request in received:
        assert request.path == "/hooks"
        assert standardwebhooks.Webhook(secret).verify(request.body, request.headers)["data"]["id"] == cid
        assert verify(request.body, request.headers, secret)["data"]["id"] == cid
    # One event per webhook id; the finished one came twice (500, then 204) under the same id.
    by_id = {r.webhook_id: (r.event, r.payload["data"].get("label")) for r in received}
    assert sorted(by_id.values(), key=str) == sorted(
        [
            ("candidate.finished", "causal"),
            ("candidate.finished", "t5"),
            ("comparison.finished", None),
            ("comparison.started", None),
        ],
        key=str,
    )
    finished = [r for r in received if r.event == "comparison.finished"]
    assert [r.status for r in finished] == [500, 204]
    assert finished[0].webhook_id == finished[1].webhook_id and finished[0].body == finished[1].body
    assert Counter(r.webhook_id for r in received if r.status == 204) == Counter(by_id.keys())
    verdict = finished[1].payload["data"]
    assert verdict["status"] == "succeeded"
    assert {c["label"]: c["status"] for c in verdict["candidates"]} == {
        "causal": "succeeded",
        "t5": "succeeded",
    }

    deliveries = api.get(f"/v1/comparisons/{cid}/deliveries").json()["deliveries"]
    assert {(d["webhook_id"], d["state"]) for d in deliveries} == {(wid, "delivered") for wid in by_id}
    [listed] = [d for d in deliveries if d["event"] == "comparison.finished"]
    assert [a["status_code"] for a in listed["attempts"]] == [500, 204]
    assert listed["url"] == receiver.url and listed["next_attempt_at"] is None
    api.close()
