"""Celery tasks: thin adapters that call ``services.worker.pipeline`` and own the retry policy.

Messages carry only ids; each task re-reads what it needs from Redis.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import structlog
from celery import Task

from services.worker import feedback, pipeline
from services.worker.celery_app import app
from services.worker.custom_metrics import load_custom_metrics
from services.worker.errors import is_transient
from services.worker.models import shared_model_cache
from shared.settings import get_settings
from shared.store import ComparisonStore
from shared.tasks import FINALIZE_COMPARISON, LOG_FEEDBACK, RUN_CANDIDATE, START_COMPARISON

log = structlog.get_logger()


@lru_cache(maxsize=1)
def context() -> pipeline.WorkerContext:
    """One context per worker process, built on first use (after the fork)."""
    settings = get_settings()
    store = ComparisonStore.from_url(
        settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
    )

    def dispatch(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        app.send_task(name, kwargs=kwargs, task_id=task_id, queue=settings.queue_name)

    return pipeline.WorkerContext(
        settings=settings,
        store=store,
        models=shared_model_cache(),
        dispatch=dispatch,
        custom_metrics=load_custom_metrics(settings),
    )


def _retry_if_transient(task: Task, exc: Exception) -> None:
    """Retry transient failures with capped exponential back-off and jitter, up to max_retries.

    Returns (so the caller can end the job visibly) when the error is permanent or retries ran out.
    """
    if not is_transient(exc) or task.request.retries >= task.max_retries:
        return
    delay = min(60, 2**task.request.retries) * (0.5 + random.random())
    log.warning(
        "task.retry", task=task.name, retries=task.request.retries, delay=round(delay, 1), error=str(exc)
    )
    raise task.retry(exc=exc, countdown=delay)


@app.task(name=START_COMPARISON, bind=True, max_retries=get_settings().task_max_retries)
def start_comparison(self: Task, comparison_id: str) -> str:
    try:
        return pipeline.start_comparison(context(), comparison_id)
    except Exception as exc:
        _retry_if_transient(self, exc)
        pipeline.fail_comparison(context(), comparison_id, f"could not start: {type(exc).__name__}: {exc}")
        raise


@app.task(name=RUN_CANDIDATE, bind=True, max_retries=get_settings().task_max_retries)
def run_candidate(self: Task, comparison_id: str, label: str) -> str:
    try:
        return pipeline.run_candidate(context(), comparison_id, label)
    except pipeline.CandidateBusy as exc:
        # A redelivery while the first delivery may still be alive: check back once its lease
        # could have lapsed, for as long as a candidate may run at all.
        settings = get_settings()
        patience = settings.task_time_limit_s // settings.candidate_lease_s + 2
        raise self.retry(exc=exc, countdown=settings.candidate_lease_s, max_retries=patience) from exc
    except Exception as exc:
        _retry_if_transient(self, exc)
        # The candidate must still end so that the comparison can finish.
        ctx = context()
        pipeline.fail_candidate(ctx, comparison_id, label, f"{type(exc).__name__}: {exc}")
        pipeline.candidate_ended(ctx, comparison_id, label)
        raise


@app.task(name=FINALIZE_COMPARISON, bind=True, max_retries=get_settings().task_max_retries)
def finalize_comparison(self: Task, comparison_id: str) -> str:
    try:
        return pipeline.finalize_comparison(context(), comparison_id)
    except Exception as exc:
        _retry_if_transient(self, exc)
        pipeline.fail_comparison(
            context(), comparison_id, f"summary step failed: {type(exc).__name__}: {exc}"
        )
        raise


@app.task(name=LOG_FEEDBACK, bind=True, max_retries=get_settings().task_max_retries)
def log_feedback(self: Task, comparison_id: str) -> str:
    try:
        return feedback.log_feedback(context(), comparison_id)
    except Exception as exc:
        _retry_if_transient(self, exc)
        # Votes and ratings stay in Redis; the next one queues another attempt.
        log.warning("feedback.log_failed", comparison_id=comparison_id, error=f"{type(exc).__name__}: {exc}")
        raise
