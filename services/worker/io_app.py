"""The I/O workers' Celery app: ``celery -A services.worker.io_app worker --queues <QUEUE_NAME>.io
--pool threads --concurrency 32``.

It runs the work that only waits on the network — requests to remote model endpoints, webhook
deliveries — many tasks at once in threads, in a process that never imports torch, transformers
or mlflow (a test keeps it so), so its image needs none of them. Scoring with mlflow.evaluate()
stays on the model workers' queue.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import structlog
from celery import Celery, signals

from shared.celery_config import celery_config
from shared.settings import get_settings
from shared.store import ComparisonStore
from shared.tasks import queue_for

log = structlog.get_logger()

_settings = get_settings()
app = Celery("llm-compare-io")
app.conf.update(celery_config(_settings))
app.conf.task_default_queue = _settings.io_queue_name
# The modules whose tasks these workers run; each adds itself here.
app.conf.imports = ("services.worker.webhook_tasks", "services.worker.remote_tasks")

_webhook_sweep: dict[str, Any] = {}


@lru_cache(maxsize=1)
def io_store() -> ComparisonStore:
    """One store per I/O worker process, shared by its threads and tasks (its pool is
    thread-safe)."""
    settings = get_settings()
    return ComparisonStore.from_url(
        settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
    )


def dispatch(name: str, kwargs: dict[str, Any], task_id: str) -> None:
    """Send a task to the queue its name says (model workers' or I/O workers')."""
    app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue_for(name, get_settings()))


@signals.worker_ready.connect
def _start_webhook_sweep(**_: object) -> None:
    """Deliveries whose next attempt is due are sent from here: their waits (up to 10 h) are
    kept in Redis, never as broker countdowns (services/worker/webhooks.py)."""
    from services.worker import webhook_tasks

    _webhook_sweep["stop"] = webhook_tasks.start_sweeper()


@signals.worker_shutting_down.connect
def _stop_webhook_sweep(**_: object) -> None:
    stop = _webhook_sweep.get("stop")
    if stop is not None:
        stop.set()


@signals.worker_shutting_down.connect
def _hand_back_running_generations(**_: object) -> None:
    """SIGTERM (a redeploy): running endpoint generations stop sending and give their candidate
    back to the queue; rows already answered are in the response cache, so the next delivery
    resumes from there."""
    from services.worker.remote import STOP

    STOP.set()
