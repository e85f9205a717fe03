"""The example receiver (examples/webhook_receiver.py) against real deliveries: it prints each
event once, the verdict included, and refuses what is not signed with its secret."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from examples.webhook_receiver import Receiver, serve
from services.worker import webhooks
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.webhook_signing import new_secret, signed_headers
from shared.webhook_store import WebhookStore
from tests.fixtures.finished import spec_dict, write_finished


@pytest.fixture
def store(redis_client, redis_prefix) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)


@pytest.fixture
def printed() -> list[str]:
    return []


@pytest.fixture
def server(store, printed) -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver([WebhookStore(store).secret("k1").secret], output=printed.append)
    http = serve(receiver, "127.0.0.1", 0)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}/hooks", receiver
    http.shutdown()
    http.server_close()


def test_each_event_printed_once_with_the_verdict(store, server, printed, redis_url, redis_prefix):
    url, _ = server
    settings = Settings(redis_url=redis_url, key_prefix=redis_prefix, webhook_allowed_hosts=["127.0.0.1"])
    ctx = webhooks.WebhookContext(settings=settings, store=store, dispatch=lambda *_: None)
    cid = write_finished(store, spec=spec_dict(callbacks=[{"url": url}]), key_id="k1")
    ids = webhooks.emit(store, settings, ctx.dispatch, cid, "comparison.started")
    for label in ("greedy", "sampled"):
        ids += webhooks.emit(store, settings, ctx.dispatch, cid, "candidate.finished", label=label)
    ids += webhooks.emit(store, settings, ctx.dispatch, cid, "comparison.finished")
    assert [webhooks.deliver(ctx, cid, wid) for wid in ids] == ["delivered"] * 4
    assert printed == [
        f"capitals ({cid}) started with 2 candidates",
        f"capitals ({cid}): candidate greedy succeeded: exact_match=0.25, output_words=3.25",
        f"capitals ({cid}): candidate sampled succeeded: exact_match=0.25, output_words=1.5",
        f"capitals ({cid}) succeeded",
        "  sampled better on output_words: +1.75 [+0.25, +3.5] (greedy − sampled, p=0.04, n=4)",
        f"  /ui/comparisons/{cid}",
    ]


def test_a_repeated_webhook_id_is_acknowledged_and_ignored(server, printed, store):
    url, receiver = server
    secret = receiver.secrets[0]
    body = b'{"type":"comparison.started","data":{"id":"c1","name":"n","candidates":[]}}'
    headers = signed_headers([secret], msg_id="msg_same", timestamp=int(time.time()), body=body)
    for _ in range(2):
        assert httpx.post(url, content=body, headers=headers).status_code == 204
    assert printed == ["n (c1) started with 0 candidates"]


def test_an_unsigned_or_foreign_delivery_is_refused(server, printed):
    url, _ = server
    body = b'{"type":"comparison.finished","data":{}}'
    foreign = signed_headers([new_secret()], msg_id="msg_x", timestamp=int(time.time()), body=body)
    assert httpx.post(url, content=body, headers=foreign).status_code == 400
    assert httpx.post(url, content=body).status_code == 400
    assert printed == [
        "refused a delivery: no signature matches the secret",
        "refused a delivery: missing header: send webhook-id, webhook-timestamp and webhook-signature",
    ]
