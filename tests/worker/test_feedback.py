"""Mirroring votes and ratings to the MLflow parent run, against a real `mlflow server`."""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from scripts.stack import Stack, free_port
from services.api import feedback as api_feedback
from services.api.auth import LOCAL
from services.worker import tracking
from services.worker.feedback import log_feedback
from services.worker.models import ModelCache
from services.worker.pipeline import WorkerContext
from shared.ranking import arena_ranking
from shared.schemas import RatingCreate, VoteCreate
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import LOG_FEEDBACK
from tests.fixtures.arena import RecordingPublisher, write_comparison


@pytest.fixture
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)


def context(store: ComparisonStore, tracking_uri: str) -> WorkerContext:
    return WorkerContext(
        settings=Settings(mlflow_tracking_uri=tracking_uri, key_prefix=store.prefix),
        store=store,
        models=ModelCache(),
        dispatch=lambda name, kwargs, task_id: None,
    )


def test_the_task_is_registered_by_its_shared_name():
    from services.worker.tasks import log_feedback as task

    assert task.name == LOG_FEEDBACK and task.max_retries is not None


def test_nothing_to_log_without_a_parent_run(store):
    comparison_id = write_comparison(store, parent_run_id=None)
    assert store.claim_feedback_log(comparison_id)
    # No MLflow server answers there: nothing may be sent.
    assert log_feedback(context(store, f"http://127.0.0.1:{free_port()}"), comparison_id) == "skipped"
    assert store.claim_feedback_log(comparison_id)  # the flag was released


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory) -> Iterator[str]:
    stack = Stack(run_dir=tmp_path_factory.mktemp("feedback-mlflow"), mlflow_port=free_port())
    try:
        stack.start_mlflow()
        yield stack.mlflow_url
    finally:
        stack.stop()


@pytest.mark.integration
class TestLogFeedback:
    def test_tables_are_replaced_and_scores_move(self, store, mlflow_url):
        client = MlflowClient(mlflow_url)
        experiment_id = tracking.ensure_experiment(client, f"feedback-{store.prefix}")
        parent = tracking.ensure_parent_run(
            client, experiment_id=experiment_id, comparison_id="c", name="arena", tags={}
        )
        comparison_id = write_comparison(store, parent_run_id=parent)
        ctx = context(store, mlflow_url)
        publisher = RecordingPublisher()

        def vote(**body):
            api_feedback.create_vote(
                principal=LOCAL,
                comparison_id=comparison_id,
                vote=VoteCreate(**body),
                store=store,
                publisher=publisher,
            )

        vote(row=0, a="alpha", b="beta", winner="a", voter="ann")
        vote(row=1, a="beta", b="alpha", winner="tie")
        assert publisher.logged == [comparison_id]
        assert log_feedback(ctx, comparison_id) == "logged"

        mlflow.set_tracking_uri(mlflow_url)
        mlflow.set_experiment(experiment_id=experiment_id)
        first = mlflow.load_table("human_votes.json", run_ids=[parent])
        assert list(first.columns) == ["id", "row", "a", "b", "winner", "voter", "matchup", "created_at"]
        assert first["id"].tolist() == [v["id"] for v in store.votes(comparison_id)]
        assert first["winner"].tolist() == ["a", "tie"]
        assert len(mlflow.load_table("human_ratings.json", run_ids=[parent])) == 0

        # Second round: the next vote queues the task again (the first one released the flag).
        vote(row=2, a="alpha", b="beta", winner="b")
        vote(row=3, a="alpha", b="beta", winner="both_bad")
        vote(row=0, a="beta", b="alpha", winner="b", voter="bob")
        api_feedback.set_rating(
            principal=LOCAL,
            comparison_id=comparison_id,
            rating=RatingCreate(row=0, label="beta", rating="down", comment="Lyon", rater="ann"),
            store=store,
            publisher=publisher,
        )
        assert publisher.logged == [comparison_id, comparison_id]
        assert log_feedback(ctx, comparison_id) == "logged"

        votes = mlflow.load_table("human_votes.json", run_ids=[parent])
        assert votes["id"].tolist() == [v["id"] for v in store.votes(comparison_id)]  # 5, not 2 + 5
        assert votes["winner"].tolist() == ["a", "tie", "b", "both_bad", "b"]
        assert votes["row"].tolist() == [0, 1, 2, 3, 0]
        ratings = mlflow.load_table("human_ratings.json", run_ids=[parent])
        assert ratings[["row", "label", "rating", "comment", "rater"]].values.tolist() == [
            [0, "beta", "down", "Lyon", "ann"]
        ]

        # One point per round, at step = votes so far, equal to the ranking's point scores.
        labels = ["alpha", "beta"]
        for count in (2, 5):
            expected = arena_ranking(
                labels,
                [(v["a"], v["b"], v["winner"]) for v in store.votes(comparison_id)[:count]],
                resamples=0,
            )
            for entry in expected:
                history = client.get_metric_history(parent, f"arena/{entry['label']}/score")
                point = {m.step: m.value for m in history}[count]
                assert point == pytest.approx(entry["score"])
        history = client.get_metric_history(parent, "arena/alpha/score")
        assert sorted(m.step for m in history) == [2, 5]
        assert client.get_metric_history(parent, "arena/gamma/score") == []

        # A redelivered task rewrites the same tables and logs no second point.
        assert log_feedback(ctx, comparison_id) == "logged"
        assert len(mlflow.load_table("human_votes.json", run_ids=[parent])) == 5
        assert sorted(m.step for m in client.get_metric_history(parent, "arena/alpha/score")) == [2, 5]
