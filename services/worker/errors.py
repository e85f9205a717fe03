"""Which failures are worth retrying, decided by type where they arise.

Only infrastructure that can come back is transient: Redis (state and broker), and the MLflow
server, whose network errors and 5xx answers ``services.worker.tracking`` raises as
``TrackingUnavailable``. Anything else (a bad model id, bad weights, invalid data, a bug) fails
the candidate at once with a message a person can act on.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnly
from redis.exceptions import TimeoutError as RedisTimeoutError


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
