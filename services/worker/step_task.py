"""What every task that runs a step of a comparison shares, on the model workers
(services/worker/tasks.py) and the I/O workers (services/worker/remote_tasks.py) alike: the
retry policy for transient failures, the reconciler's hint while a retry waits, and ending the
job visibly once the task fails for good. Light on purpose: the I/O workers import it without
torch or mlflow.
"""

from __future__ import annotations

import numbers
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import Reject

from services.worker.errors import TRANSIENT_ERRORS, describe, retry_while_busy
from services.worker.locks import Lease
from shared.schemas import FINAL_CANDIDATE_STATES, CandidateState
from shared.settings import Settings, get_settings
from shared.store import ComparisonNotFound, ComparisonStore, LeaseLost

log = structlog.get_logger()

RETRY_BACKOFF_MAX_S = 60

# Sends a task: its name, its kwargs and the task id chosen for it.
Dispatch = Callable[[str, dict[str, Any], str], None]


class StepContext(Protocol):
    """What a step needs of its process's context (WorkerContext, RemoteContext)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> ComparisonStore: ...

    @property
    def dispatch(self) -> Dispatch: ...


class StepBusy(Exception):
    """Another delivery of this step holds its lease: try again once it could have lapsed."""

    def __init__(self, message: str, *, retry_in_s: float):
        super().__init__(message)
        self.retry_in_s = retry_in_s


class HandOff(Exception):
    """This worker is shutting down: give the step back to the queue for another worker."""


def candidate_lease(
    store: ComparisonStore, settings: Settings, comparison_id: str, label: str
) -> Lease | CandidateState:
    """The candidate's lease, or its final state when it has ended; raises StepBusy while another
    delivery holds it (which may be a process that just died: its lease lapses soon)."""
    lease = Lease(store.r, store.lease_key(comparison_id, label), ttl_s=settings.candidate_lease_s)
    if lease.acquire():
        return lease
    state = store.candidate(comparison_id, label).status
    if state in FINAL_CANDIDATE_STATES:
        return state
    raise StepBusy(f"candidate {label} is held by {lease.holder()}", retry_in_s=lease.seconds_left() + 1)


def dispatch_step(
    ctx: StepContext, name: str, comparison_id: str, step: str, extra: dict[str, Any] | None = None
) -> str:
    """Send the step's task; returns its id. Until it shows up in the queue or takes its lease,
    the reconciler must not take it for lost."""
    task_id = uuid.uuid4().hex
    ctx.dispatch(name, {"comparison_id": comparison_id, **(extra or {})}, task_id)
    settings = ctx.settings
    ctx.store.expect_task(
        comparison_id, step, task_id, within_s=settings.reconcile_grace_s + 2 * settings.reconcile_interval_s
    )
    return task_id


class StepTask(Task):
    """Transient failures (``services.worker.errors.TRANSIENT_ERRORS``) are retried with capped
    exponential back-off and full jitter, ``TRANSIENT_MAX_RETRIES`` times. Whatever else ends a
    task (a permanent error, retries run out, the hard time limit) goes through ``on_failure``,
    which ends the job visibly through ``give_up``: Celery calls it from the worker's main
    process when the hard time limit killed the task body, where no ``except`` of the body ever
    runs. If even that cannot reach Redis or MLflow, the reconciler
    (services/worker/reconcile.py) finishes the job later."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 2
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = get_settings().transient_max_retries
    # What the log says happens when give_up itself fails.
    give_up_fallback = "the reconciler ends the job once Redis and MLflow answer"

    def step_context(self) -> Any:
        """The process's context (its store, dispatch, ...), built on first use."""
        raise NotImplementedError

    def step(self, kwargs: dict[str, Any]) -> str | None:
        """The comparison step this task runs (a candidate's label, START_STEP, FINALIZE_STEP)."""
        return None

    def give_up(self, ctx: Any, exc: BaseException, kwargs: dict[str, Any]) -> None:
        """End the job visibly after this task failed for good."""

    def run_candidate_step(self, step: Callable[[], str], *, comparison_id: str, label: str) -> str:
        """Run a candidate's step: while another delivery holds its lease, check back once the
        lease could have lapsed (for as long as a candidate may run); on shutdown, put the
        message back on the queue for another worker."""
        try:
            return step()
        except StepBusy as exc:
            retry = retry_while_busy(self, exc, exc.retry_in_s)
            if retry is None:
                # The holder is alive and still running it; if it dies, the reconciler takes over.
                log.info("candidate.busy_dropped", task=self.name, comparison_id=comparison_id, label=label)
                return "busy"
            raise retry from exc
        except HandOff as exc:
            log.info("candidate.handed_off", task=self.name, comparison_id=comparison_id, label=label)
            raise Reject("worker shutting down", requeue=True) from exc

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
            ctx: StepContext = self.step_context()
            ctx.store.expect_task(
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
            self.give_up(self.step_context(), exc, kwargs)
        except Exception as error:  # noqa: BLE001
            log.error(
                "task.give_up_failed",
                task=self.name,
                comparison_id=comparison_id,
                error=f"{type(error).__name__}: {error}",
                note=self.give_up_fallback,
            )
