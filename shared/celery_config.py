"""Celery settings both sides must agree on (broker, queue, delivery guarantees)."""

from __future__ import annotations

from typing import Any

from shared.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A task is acknowledged only once it has finished, and each worker process reserves one
        # task at a time, so a worker that dies mid-task leaves it for another worker.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redis redelivers unacknowledged tasks after the visibility timeout: keep it above the
        # longest task so that a slow but alive worker is never duplicated.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": settings.task_time_limit_s - 30,
        "result_expires": settings.result_ttl_s,
        "broker_connection_retry_on_startup": True,
        "task_track_started": True,
        # Workers emit task events for monitors (Flower); a "task-sent" event per publish would
        # double the gateway's broker writes per submission, so it stays off.
        "worker_send_task_events": True,
    }
