"""Which failures are worth retrying.

Only infrastructure that can come back (Redis, the MLflow server's network) is transient; a bad
model id, bad weights or invalid data fail the candidate at once with a readable message.
"""

from __future__ import annotations

import requests
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)

# MLflow's REST client retries by itself, then wraps the network error in an MlflowException
# whose message carries the cause; these markers tell it apart from a real refusal.
_MLFLOW_NETWORK_MARKERS = ("Max retries exceeded", "Connection refused", "Read timed out", "503", "502")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if type(exc).__name__ == "MlflowException" and "API request to" in str(exc):
        return any(marker in str(exc) for marker in _MLFLOW_NETWORK_MARKERS)
    return False
