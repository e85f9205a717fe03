"""MLflow runs for a comparison: one parent run, one nested run per candidate.

Runs are found by tags before they are created, so a task that is delivered twice (acks_late
after a worker died) reuses its earlier run instead of logging a duplicate.
"""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

TAG_COMPARISON = "llm_compare.comparison_id"
TAG_LABEL = "llm_compare.candidate"
TAG_ROLE = "llm_compare.role"
TAG_PARENT = "mlflow.parentRunId"


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


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
