"""The I/O workers' task for endpoint candidates: a thin adapter over services.worker.remote.

Registered on the I/O app (services/worker/io_app.py): nothing here may import torch,
transformers or mlflow. Transient failures (Redis, the broker) are retried with capped back-off
and jitter; a generation that gives up for good hands the candidate to its scoring step with
the reason, which fails it visibly.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Any

import structlog
from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import Reject

from services.worker import remote
from services.worker.errors import TRANSIENT_ERRORS, describe, retry_while_busy
from services.worker.io_app import app
from shared.settings import get_settings
from shared.store import ComparisonNotFound, ComparisonStore, LeaseLost
from shared.tasks import GENERATE_REMOTE, queue_for

log = structlog.get_logger()

RETRY_BACKOFF_MAX_S = 60


@lru_cache(maxsize=1)
def context() -> remote.RemoteContext:
    """One context per I/O worker process, built on first use; its Redis pool is thread-safe."""
    settings = get_settings()
    store = ComparisonStore.from_url(
        settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
    )

    def dispatch(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue_for(name, settings))

    return remote.RemoteContext(settings=settings, store=store, dispatch=dispatch)


class GenerateRemote(Task):
    name = GENERATE_REMOTE
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 2
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = get_settings().transient_max_retries

    def run(self, comparison_id: str, label: str) -> str:
        try:
            return remote.generate_remote(context(), comparison_id, label)
        except remote.RemoteBusy as exc:
            retry = retry_while_busy(self, exc, exc.retry_in_s)
            if retry is None:
                log.info("remote.busy_dropped", comparison_id=comparison_id, label=label)
                return "busy"
            raise retry from exc
        except remote.HandOff as exc:
            log.info("remote.handed_back", comparison_id=comparison_id, label=label)
            raise Reject("I/O worker shutting down", requeue=True) from exc

    def on_retry(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: ExceptionInfo
    ) -> None:
        # The retry waits out a countdown holding no lease: the reconciler must not take the
        # candidate for lost meanwhile.
        when = getattr(einfo.exception, "when", None)
        countdown = float(when) if isinstance(when, numbers.Real) else RETRY_BACKOFF_MAX_S
        settings = get_settings()
        try:
            context().store.expect_task(
                kwargs["comparison_id"],
                kwargs["label"],
                task_id,
                within_s=countdown + settings.reconcile_grace_s + 2 * settings.reconcile_interval_s,
            )
        except Exception as error:  # noqa: BLE001 - a missing hint costs at worst a duplicate
            log.warning("task.expect_failed", task=self.name, error=str(error))

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: ExceptionInfo
    ) -> None:
        comparison_id, label = kwargs.get("comparison_id"), kwargs.get("label")
        if isinstance(exc, LeaseLost | ComparisonNotFound):
            log.info("task.dropped", task=self.name, comparison_id=comparison_id, reason=type(exc).__name__)
            return
        log.warning("task.gave_up", task=self.name, comparison_id=comparison_id, error=describe(exc))
        try:
            remote.give_up(context(), str(comparison_id), str(label), f"generation failed: {describe(exc)}")
        except Exception as error:  # noqa: BLE001
            log.error(
                "task.give_up_failed",
                task=self.name,
                comparison_id=comparison_id,
                error=f"{type(error).__name__}: {error}",
                note="the reconciler queues the candidate again once Redis answers",
            )


generate_remote = app.register_task(GenerateRemote())
