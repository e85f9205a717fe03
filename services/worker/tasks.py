"""Celery tasks: thin adapters that call ``services.worker.pipeline``.

Messages carry only ids; each task re-reads what it needs from Redis. The retry policy and what
happens when a task gives up live once, in ``services.worker.step_task.StepTask``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery.exceptions import TimeLimitExceeded

from services.worker import feedback, pipeline
from services.worker.celery_app import app
from services.worker.custom_metrics import load_custom_metrics
from services.worker.errors import describe
from services.worker.models import shared_model_cache
from services.worker.step_task import StepTask
from shared.settings import get_settings
from shared.store import FINALIZE_STEP, START_STEP, ComparisonStore
from shared.tasks import FINALIZE_COMPARISON, LOG_FEEDBACK, RUN_CANDIDATE, START_COMPARISON, queue_for


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


class ComparisonTask(StepTask):
    """A step on the model workers: its context is this process's ``context()``."""

    def step_context(self) -> pipeline.WorkerContext:
        return context()


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
        return self.run_candidate_step(
            lambda: pipeline.run_candidate(context(), comparison_id, label),
            comparison_id=comparison_id,
            label=label,
        )

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

    # give_up does nothing: votes and ratings stay in Redis, and the next one queues another attempt.

    def run(self, comparison_id: str) -> str:
        return feedback.log_feedback(context(), comparison_id)


start_comparison = app.register_task(StartComparison())
run_candidate = app.register_task(RunCandidate())
finalize_comparison = app.register_task(FinalizeComparison())
log_feedback = app.register_task(LogFeedback())
