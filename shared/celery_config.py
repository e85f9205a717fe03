"""Celery settings both sides must agree on (broker, queue, delivery guarantees)."""

from __future__ import annotations

from typing import Any

from shared.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        # No result backend: nothing reads task results (progress and outcomes live in the
        # comparison's own Redis keys), so storing one per task for a month only cost memory.
        "task_ignore_result": True,
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A task is acknowledged only once it has finished, and each worker process reserves one
        # task at a time, so a worker that dies mid-task leaves it for another worker.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redis redelivers unacknowledged tasks after the visibility timeout: keep it above the
        # longest task so that a slow but alive worker is never duplicated. A whole worker killed
        # outright is noticed much sooner by the reconciler (services/worker/reconcile.py).
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": settings.task_time_limit_s - 30,
        # On a cold shutdown (which SIGTERM starts, see services/worker/celery_app.py) running
        # tasks get this long to finish before they are stopped and their messages requeued.
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_s,
        "broker_connection_retry_on_startup": True,
        # Workers emit task events for monitors (Flower); a "task-sent" event per publish would
        # double the gateway's broker writes per submission, so it stays off.
        "worker_send_task_events": True,
    }
