"""Events emitted by the comparison's own steps (start, each candidate, the summary), run in process
on the orchestration harness: real Redis, a SQLite MLflow store, the tiny models, and a dispatch
that records the tasks, webhook deliveries included."""

# ruff: noqa: F811 - the imported fixtures are parameters of the tests by name
from __future__ import annotations

import json
import uuid
from typing import Any

from services.worker import pipeline, webhooks
from shared.schemas import ComparisonCreate, ComparisonStatus
from shared.tasks import DELIVER_WEBHOOK
from shared.webhook_store import WebhookStore

# The orchestration tests' harness and its fixtures (harness, models, tracking_uri), used by name.
from tests.worker.test_orchestration import (  # noqa: F401
    ROWS,
    Harness,
    causal,
    harness,
    models,
    tracking_uri,
)

HOOK = "http://127.0.0.1:8123/hooks"


def submit_with_callbacks(harness: Harness, *candidates: dict[str, Any]) -> str:
    spec = ComparisonCreate.model_validate(
        {
            "name": "with-callbacks",
            "candidates": list(candidates),
            "dataset": {"rows": ROWS},
            "callbacks": [{"url": HOOK}],
        }
    )
    comparison_id = uuid.uuid4().hex
    harness.store.create(
        comparison_id=comparison_id, spec=spec, experiment=harness.experiment, metrics=["output_words"]
    )
    return comparison_id


def run_steps(harness: Harness) -> list[str]:
    """Run every comparison step queued so far, in order; leave webhook deliveries queued."""
    outcomes = []
    while pending := [
        d for d in harness.dispatch.sent if d.task_id not in harness.done and d.name != DELIVER_WEBHOOK
    ]:
        outcomes.append(harness.run(pending[0]))
    return outcomes


def deliveries(harness: Harness, cid: str) -> list[tuple[str, str | None, str]]:
    """(event, label, status in the body) of every delivery, in the order emitted."""
    return [
        (d.event, d.label, json.loads(d.body)["data"]["status"])
        for d in WebhookStore(harness.store).deliveries(cid)
    ]


class TestEmittedBySteps:
    def test_start_each_candidate_and_the_verdict(self, harness, tiny_models):
        cid = submit_with_callbacks(harness, causal(tiny_models, "a"), causal(tiny_models, "b"))
        assert harness.start(cid) == "started"
        assert deliveries(harness, cid) == [("comparison.started", None, "running")]
        assert run_steps(harness) == ["succeeded", "succeeded", "succeeded"]
        assert deliveries(harness, cid) == [
            ("comparison.started", None, "running"),
            ("candidate.finished", "a", "running"),
            ("candidate.finished", "b", "running"),
            ("comparison.finished", None, "succeeded"),
        ]
        sent = harness.dispatch.of(DELIVER_WEBHOOK)
        stored = WebhookStore(harness.store).deliveries(cid)
        assert [d.kwargs["webhook_id"] for d in sent] == [d.webhook_id for d in stored]
        finished = json.loads(stored[-1].body)["data"]
        assert [(c["label"], c["status"], sorted(c["metrics"])) for c in finished["candidates"]] == [
            ("a", "succeeded", ["output_words"]),
            ("b", "succeeded", ["output_words"]),
        ]
        # Redelivered steps emit the same events again: nothing new is stored or sent.
        harness.start(cid)
        pipeline.candidate_ended(harness.ctx, cid, "a")
        harness.store.r.hdel(harness.store._key(cid), "finalized_at")
        pipeline.finalize_comparison(harness.ctx, cid)
        assert len(harness.dispatch.of(DELIVER_WEBHOOK)) == 4
        assert len(WebhookStore(harness.store).deliveries(cid)) == 4

    def test_a_comparison_cancelled_before_it_started(self, harness, tiny_models):
        cid = submit_with_callbacks(harness, causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.cancel(cid)
        assert harness.start(cid) == "skipped"
        run_steps(harness)
        assert deliveries(harness, cid) == [
            ("candidate.finished", "a", "cancelled"),
            ("candidate.finished", "b", "cancelled"),
            ("comparison.finished", None, "cancelled"),
        ]

    def test_a_failing_emit_never_fails_the_comparison(self, harness, tiny_models, monkeypatch):
        def broken(*_: Any, **__: Any) -> list[str]:
            raise ConnectionError("Redis went away while recording a delivery")

        monkeypatch.setattr(webhooks, "emit", broken)
        cid = submit_with_callbacks(harness, causal(tiny_models, "a"), causal(tiny_models, "b"))
        assert harness.start(cid) == "started"
        assert run_steps(harness) == ["succeeded", "succeeded", "succeeded"]
        assert harness.store.status(cid) is ComparisonStatus.succeeded
        assert harness.dispatch.of(DELIVER_WEBHOOK) == []
