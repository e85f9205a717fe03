"""The I/O workers' webhook task: a thin adapter to ``services.worker.webhooks.deliver``.

Celery retries nothing here: when an attempt fails, ``deliver`` schedules the next one in the
due set, which the sweep (``start_sweeper``, started by services/worker/io_app.py) turns into a
new task when it is due.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import structlog
from redis.exceptions import RedisError

from services.worker import webhooks
from services.worker.io_app import app, dispatch, io_store
from shared.settings import get_settings
from shared.tasks import DELIVER_WEBHOOK

log = structlog.get_logger()


@lru_cache(maxsize=1)
def context() -> webhooks.WebhookContext:
    """One context per I/O worker process, shared by its threads."""
    return webhooks.WebhookContext(settings=get_settings(), store=io_store(), dispatch=dispatch)


@app.task(name=DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(comparison_id: str, webhook_id: str) -> str:
    try:
        return webhooks.deliver(context(), comparison_id, webhook_id)
    except RedisError as exc:
        # The delivery stays in the due set (or its lock lapses): the sweep sends it again once
        # Redis answers.
        log.warning(
            "webhook.redis_unavailable", comparison_id=comparison_id, webhook_id=webhook_id, error=repr(exc)
        )
        return "redis_unavailable"


def start_sweeper() -> threading.Event:
    return webhooks.start_sweeper(context, interval_s=get_settings().webhook_sweep_interval_s)
