"""Celery tasks: thin adapters that call ``services.worker.pipeline``.

Messages carry only ids; each task re-reads what it needs from Redis. The retry policy and what
happens when a task gives up live once, in ``ComparisonTask``.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Any

import structlog
from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded

from services.worker import feedback, pipeline
from services.worker.celery_app import app
from services.worker.custom_metrics import load_custom_metrics
from services.worker.errors import TRANSIENT_ERRORS, describe, retry_while_busy
from services.worker.models import shared_model_cache
from shared.settings import get_settings
from shared.store import FINALIZE_STEP, START_STEP, ComparisonNotFound, ComparisonStore, LeaseLost
from shared.tasks import FINALIZE_COMPARISON, LOG_FEEDBACK, RUN_CANDIDATE, START_COMPARISON, queue_for

log = structlog.get_logger()

RETRY_BACKOFF_MAX_S = 60


@lru_cache(maxsize=1)
def context() -> pipeline.WorkerContext:
    """One context per worker process, built on first use (after the fork)."""
    settings = get_settings()
    store = ComparisonStore.from_url(
        settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
    )

    def dispatch(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue_for(name, settings))

    return pipeline.WorkerContext(
        settings=settings,
        store=store,
        models=shared_model_cache(),
        dispatch=dispatch,
        custom_metrics=load_custom_metrics(settings),
    )


class ComparisonTask(Task):
    """What every comparison task shares.

    Transient failures (``services.worker.errors.TRANSIENT_ERRORS``) are retried with capped
    exponential back-off and full jitter, ``TRANSIENT_MAX_RETRIES`` times. Whatever else ends a task
    (a permanent error, retries run out, the hard time limit) goes through ``on_failure``, which
    ends the job visibly: Celery calls it from the worker's main process when the hard time limit
    killed the task body, where no ``except`` of the body ever runs. If even that cannot reach
    Redis or MLflow, the reconciler (services/worker/reconcile.py) finishes the job later.
    """

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 2
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = get_settings().transient_max_retries

    def step(self, kwargs: dict[str, Any]) -> str | None:
        """The comparison step this task runs (a candidate's label, START_STEP, FINALIZE_STEP)."""
        return None

    def give_up(self, ctx: pipeline.WorkerContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        """End the job visibly after this task failed for good."""

    def on_retry(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: ExceptionInfo
    ) -> None:
        step = self.step(kwargs)
        if step is None:
            return
        # The retry waits out a countdown in some worker's memory, holding no lease meanwhile:
        # tell the reconciler not to take the step for lost until it should have run.
        when = getattr(einfo.exception, "when", None)
        countdown = float(when) if isinstance(when, numbers.Real) else RETRY_BACKOFF_MAX_S
        settings = get_settings()
        try:
            context().store.expect_task(
                kwargs["comparison_id"],
                step,
                task_id,
                within_s=countdown + settings.reconcile_grace_s + 2 * settings.reconcile_interval_s,
            )
        except Exception as error:  # noqa: BLE001 - a missing hint costs at worst a duplicate
            log.warning("task.expect_failed", task=self.name, error=str(error))

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: ExceptionInfo
    ) -> None:
        comparison_id = kwargs.get("comparison_id")
        if isinstance(exc, LeaseLost | ComparisonNotFound):
            # Another delivery owns the step now, or the comparison expired: nothing to end.
            log.info("task.dropped", task=self.name, comparison_id=comparison_id, reason=type(exc).__name__)
            return
        log.warning("task.gave_up", task=self.name, comparison_id=comparison_id, error=describe(exc))
        try:
            self.give_up(context(), exc, kwargs)
        except Exception as error:  # noqa: BLE001
            log.error(
                "task.give_up_failed",
                task=self.name,
                comparison_id=comparison_id,
                error=f"{type(error).__name__}: {error}",
                note="the reconciler ends the job once Redis and MLflow answer",
            )


class StartComparison(ComparisonTask):
    name = START_COMPARISON

    def run(self, comparison_id: str) -> str:
        return pipeline.start_comparison(context(), comparison_id)

    def step(self, kwargs: dict[str, Any]) -> str | None:
        return START_STEP

    def give_up(self, ctx: pipeline.WorkerContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        pipeline.fail_comparison(ctx, kwargs["comparison_id"], f"could not start: {describe(exc)}")


class RunCandidate(ComparisonTask):
    name = RUN_CANDIDATE

    def run(self, comparison_id: str, label: str) -> str:
        try:
            return pipeline.run_candidate(context(), comparison_id, label)
        except pipeline.CandidateBusy as exc:
            retry = retry_while_busy(self, exc, exc.retry_in_s)
            if retry is None:
                log.info("candidate.busy_dropped", comparison_id=comparison_id, label=label)
                return "busy"
            raise retry from exc
        except pipeline.HandOff as exc:
            # This worker is shutting down: the same message goes back to the queue for another.
            log.info("candidate.handed_off", comparison_id=comparison_id, label=label)
            raise Reject("worker shutting down", requeue=True) from exc

    def step(self, kwargs: dict[str, Any]) -> str | None:
        return kwargs["label"]

    def give_up(self, ctx: pipeline.WorkerContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        settings = ctx.settings
        pipeline.give_up_candidate(
            ctx,
            kwargs["comparison_id"],
            kwargs["label"],
            describe(exc, time_limit_s=settings.task_time_limit_s),
            # The hard time limit killed the process that held the lease.
            holder_is_gone=isinstance(exc, TimeLimitExceeded),
        )


class FinalizeComparison(ComparisonTask):
    name = FINALIZE_COMPARISON

    def run(self, comparison_id: str) -> str:
        return pipeline.finalize_comparison(context(), comparison_id)

    def step(self, kwargs: dict[str, Any]) -> str | None:
        return FINALIZE_STEP

    def give_up(self, ctx: pipeline.WorkerContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        pipeline.fail_finalize(ctx, kwargs["comparison_id"], f"summary step failed: {describe(exc)}")


class LogFeedback(ComparisonTask):
    name = LOG_FEEDBACK

    def run(self, comparison_id: str) -> str:
        return feedback.log_feedback(context(), comparison_id)

    def give_up(self, ctx: pipeline.WorkerContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        # Votes and ratings stay in Redis; the next one queues another attempt.
        pass


start_comparison = app.register_task(StartComparison())
run_candidate = app.register_task(RunCandidate())
finalize_comparison = app.register_task(FinalizeComparison())
log_feedback = app.register_task(LogFeedback())
