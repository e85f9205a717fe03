"""What a webhook says: its id and its JSON body.

Every body reads ``{"type": <event>, "timestamp": <when it happened>, "data": <summary>}`` (the
Standard Webhooks shape); the summary is the comparison as it stands at the event: id, name,
status, each candidate's status and metrics, the decided verdicts and the links. A
``candidate.finished`` body also names the candidate (``data.label``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.records import CandidateRecord, ComparisonRecord
from shared.settings import Settings

# What a body keeps of each decided paired comparison (GET /v1/comparisons/{id} has them all).
_VERDICT_FIELDS = ("metric", "a", "b", "better", "mean_diff", "ci_low", "ci_high", "p_value", "n", "verdict")


def webhook_id(comparison_id: str, event: str, callback: int, label: str | None = None) -> str:
    """The ``webhook-id`` of one event for one callback: the same however often the event is
    emitted (a redelivered step emits it again), so receivers can deduplicate on it."""
    key = "\x1f".join((comparison_id, event, label or "", str(callback)))
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def comparison_summary(
    record: ComparisonRecord, candidates: Sequence[CandidateRecord], settings: Settings
) -> dict[str, Any]:
    base = (settings.api_public_url or "").rstrip("/")
    path = f"{base}/v1/comparisons/{record.id}"
    mlflow_url = settings.mlflow_link(record.experiment_id, record.parent_run_id)
    verdicts = [
        {key: _finite(entry.get(key)) for key in _VERDICT_FIELDS}
        for entry in record.pairwise
        if entry.get("better")
    ]
    ranking = record.judge_ranking
    return {
        "id": record.id,
        "name": record.spec.name,
        "status": record.status.value,
        "owner": record.owner,
        "created_at": _iso(record.created_at),
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "error": record.error,
        "candidates": [
            {
                "label": c.label,
                "model": c.model,
                "status": c.status.value,
                "rows_done": c.done,
                "rows": c.total,
                "metrics": {name: _finite(value) for name, value in c.metrics.items()},
                "error": c.error,
                "finished_at": _iso(c.finished_at),
            }
            for c in candidates
        ],
        "verdicts": verdicts,
        "judge_ranking": (
            {"judge": ranking.get("judge"), "ranking": ranking.get("ranking")} if ranking else None
        ),
        "links": {
            "comparison": path,
            "results": f"{path}/results",
            "deliveries": f"{path}/deliveries",
            "page": f"{base}/ui/comparisons/{record.id}",
            "mlflow": mlflow_url,
        },
    }


def event_body(
    event: str,
    *,
    record: ComparisonRecord,
    candidates: Sequence[CandidateRecord],
    settings: Settings,
    at: datetime,
    label: str | None = None,
) -> str:
    data = comparison_summary(record, candidates, settings)
    if label is not None:
        data["label"] = label
    return json.dumps({"type": event, "timestamp": _iso(at), "data": data}, separators=(",", ":"))


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a metric that came out so reads as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")
