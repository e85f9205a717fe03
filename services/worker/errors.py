"""Which failures are worth retrying, decided by type where they arise.

Only infrastructure that can come back is transient: Redis (state and broker), and the MLflow
server, whose network errors and 5xx answers ``services.worker.tracking`` raises as
``TrackingUnavailable``. Anything else (a bad model id, bad weights, invalid data, a bug) fails
the candidate at once with a message a person can act on.
"""

from __future__ import annotations

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnly
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import get_settings


class TrackingUnavailable(Exception):
    """The MLflow tracking server could not be reached, or answered with a server error (5xx)."""


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    TrackingUnavailable,
    # BusyLoadingError (Redis replaying its append-only file) is a ConnectionError; ReadOnlyError
    # is what a replica answers for the moment a failover takes.
    RedisConnectionError,
    RedisTimeoutError,
    RedisReadOnly,
    # Publishing a task (a candidate, the summary step) while the broker is away.
    BrokerUnavailable,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def describe(exc: BaseException, *, time_limit_s: int | None = None) -> str:
    """A message for a person: what went wrong and, where there is one, what to change."""
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        limit = f" ({time_limit_s} s)" if time_limit_s else ""
        return (
            f"the candidate ran longer than TASK_TIME_LIMIT_S{limit}; use fewer rows or a smaller "
            "max_new_tokens, or raise TASK_TIME_LIMIT_S"
        )
    if isinstance(exc, TrackingUnavailable):
        return f"the MLflow tracking server stayed unreachable after retries: {exc}"
    if isinstance(exc, TRANSIENT_ERRORS):
        return f"Redis or the broker stayed unreachable after retries: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def retry_while_busy(task: Task, exc: Exception, retry_in_s: float) -> Retry | None:
    """The retry to raise when another delivery holds the candidate's lease, or None once
    waiting is pointless. The holder may be a process that just died (its lease lapses within
    CANDIDATE_LEASE_S), so check back then, for as long as a candidate may run; past that the
    holder is alive and still running it, and if it dies the reconciler takes over."""
    settings = get_settings()
    patience = settings.task_time_limit_s // settings.candidate_lease_s + 2
    if task.request.retries >= patience:
        return None
    retry = task.retry(exc=exc, countdown=retry_in_s, max_retries=patience, throw=False)
    # retry() leaves its max_retries on the task object, where autoretry would apply it to this
    # process's later transient failures too.
    if hasattr(task, "override_max_retries"):
        del task.override_max_retries
    return retry
