"""MLflow runs for a comparison: one parent run, one nested run per candidate.

Runs are found by tags before they are created, so a task that is delivered twice (acks_late
after a worker died) reuses its earlier run instead of logging a duplicate.

Every call through ``client()`` that cannot reach the server, or that the server answers with a
5xx, raises ``TrackingUnavailable``: the one type the tasks retry for MLflow. MLflow's REST
client has already retried by then, and it wraps the network error in a plain MlflowException
(as its context, not its cause), so the chain of exceptions is read by type, not by message.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, cast

import requests
import urllib3.exceptions
from mlflow.entities import Run
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from services.worker.errors import TrackingUnavailable

TAG_COMPARISON = "llm_compare.comparison_id"
TAG_LABEL = "llm_compare.candidate"
TAG_ROLE = "llm_compare.role"
TAG_PARENT = "mlflow.parentRunId"

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    # Raised once MLflow's own retries on 429/5xx answers ran out.
    requests.exceptions.RetryError,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)


def _server_unavailable(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _NETWORK_ERRORS):
            return True
        if isinstance(current, RestException) and current.get_http_status_code() >= 500:
            return True
        # Artifact uploads to the server (--serve-artifacts) raise requests' HTTPError.
        if isinstance(current, requests.exceptions.HTTPError):
            response = current.response
            if response is not None and response.status_code >= 500:
                return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def unavailable_as_transient() -> Iterator[None]:
    """Raise ``TrackingUnavailable`` for what a later attempt could get past."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as exc:
        if _server_unavailable(exc):
            raise TrackingUnavailable(f"{type(exc).__name__}: {exc}"[:2000]) from exc
        raise


class _Translating:
    """An MlflowClient whose every method raises ``TrackingUnavailable`` as above."""

    def __init__(self, wrapped: MlflowClient):
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._wrapped, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with unavailable_as_transient():
                return attr(*args, **kwargs)

        return call


def client(tracking_uri: str) -> MlflowClient:
    # Typed as the client it wraps: callers use MlflowClient's interface unchanged.
    return cast(MlflowClient, _Translating(MlflowClient(tracking_uri=tracking_uri)))


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:
        # Two workers racing to create the same experiment: the loser reads the winner's.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _find(mlflow_client: MlflowClient, experiment_id: str, filter_string: str) -> Run | None:
    runs = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=1)
    return runs[0] if runs else None


def ensure_parent_run(
    mlflow_client: MlflowClient, *, experiment_id: str, comparison_id: str, name: str, tags: dict[str, str]
) -> str:
    existing = _find(
        mlflow_client,
        experiment_id,
        f"tags.`{TAG_COMPARISON}` = '{comparison_id}' and tags.`{TAG_ROLE}` = 'comparison'",
    )
    if existing is not None:
        return existing.info.run_id
    run = mlflow_client.create_run(
        experiment_id,
        run_name=name,
        tags={**tags, TAG_COMPARISON: comparison_id, TAG_ROLE: "comparison"},
    )
    return run.info.run_id


def ensure_candidate_run(
    mlflow_client: MlflowClient, *, experiment_id: str, parent_run_id: str, comparison_id: str, label: str
) -> str:
    existing = _find(
        mlflow_client,
        experiment_id,
        f"tags.`{TAG_COMPARISON}` = '{comparison_id}' and tags.`{TAG_LABEL}` = '{label}'",
    )
    if existing is not None:
        if existing.info.status != "RUNNING":
            mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = mlflow_client.create_run(
        experiment_id,
        run_name=label,
        tags={
            TAG_PARENT: parent_run_id,
            TAG_COMPARISON: comparison_id,
            TAG_LABEL: label,
            TAG_ROLE: "candidate",
        },
    )
    return run.info.run_id
