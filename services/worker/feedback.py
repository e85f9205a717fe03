"""Mirror people's votes and ratings to the comparison's MLflow parent run.

The tables ``human_votes.json`` and ``human_ratings.json`` are rewritten whole on every run, so
``mlflow.load_table("human_votes.json", run_ids=[parent])`` always returns the current votes;
``arena/<label>/score`` is logged at step = number of votes, so its history shows the ranking move.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from services.worker import tracking
from shared.ranking import arena_ranking
from shared.schemas import CandidateState

if TYPE_CHECKING:
    from services.worker.pipeline import WorkerContext

log = structlog.get_logger()

VOTES_TABLE = "human_votes.json"
RATINGS_TABLE = "human_ratings.json"
VOTE_COLUMNS = ["id", "row", "a", "b", "winner", "voter", "matchup", "created_at"]
RATING_COLUMNS = ["row", "label", "rating", "comment", "rater", "updated_at"]


def log_feedback(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    # First, so that a vote stored from here on queues another run instead of being missed.
    store.release_feedback_log(comparison_id)
    record = store.get(comparison_id)
    parent_run_id = record.parent_run_id
    if not parent_run_id:
        log.info("feedback.skip_log", comparison_id=comparison_id, reason="no parent run")
        return "skipped"
    votes = store.votes(comparison_id)
    ratings = store.ratings(comparison_id)
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    replace_table(client, parent_run_id, VOTES_TABLE, VOTE_COLUMNS, votes)
    replace_table(client, parent_run_id, RATINGS_TABLE, RATING_COLUMNS, ratings)

    succeeded = [
        c.label
        for c in store.candidates(comparison_id, record.labels)
        if c.status is CandidateState.succeeded
    ]
    ranking = arena_ranking(succeeded, [(v["a"], v["b"], v["winner"]) for v in votes], resamples=0)
    # Stamped with the last vote's time rather than now, so a redelivered task logs the very same
    # points instead of a second one per step.
    timestamp_ms = _millis(votes[-1]["created_at"]) if votes else 0
    metrics = [Metric(f"arena/{r['label']}/score", r["score"], timestamp_ms, len(votes)) for r in ranking]
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics)
    log.info(
        "feedback.logged",
        comparison_id=comparison_id,
        parent_run_id=parent_run_id,
        votes=len(votes),
        ratings=len(ratings),
    )
    return "logged"


def replace_table(
    client: MlflowClient, run_id: str, artifact_file: str, columns: list[str], entries: list[dict[str, Any]]
) -> None:
    """Write ``entries`` as the run's table ``artifact_file``, replacing what was there.

    ``MlflowClient.log_table`` appends to an existing table (it downloads it and concatenates),
    which would repeat every earlier vote; this writes the same "split" JSON that ``log_table``
    and ``load_table`` use, overwrites the artifact, and records the table in the run's
    ``mlflow.loggedArtifacts`` tag, which ``load_table`` searches by.
    """
    table = {"columns": columns, "data": [[entry.get(c) for c in columns] for entry in entries]}
    directory = posixpath.dirname(artifact_file) or None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, posixpath.basename(artifact_file))
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(table, handle)
        client.log_artifact(run_id, path, directory)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def _millis(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)
