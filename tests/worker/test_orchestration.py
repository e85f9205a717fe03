"""A comparison's orchestration, called in process the way the Celery tasks call it: the start
step, the candidates, the summary step, what the tasks do when they give up, and the reconciler.

Real Redis, a real MLflow tracking store (SQLite), the tiny random-weight models, and a dispatch
that records the tasks it is asked to publish; the tests then run those tasks themselves, in the
order (and as often) the situation under test needs.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TimeLimitExceeded
from kombu.exceptions import OperationalError
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.worker import pipeline, reconcile, tasks, tracking
from services.worker.locks import Lease
from services.worker.models import ModelCache
from services.worker.step_task import StepBusy
from shared.celery_config import celery_config
from shared.records import CandidateRecord
from shared.schemas import CandidateState, ComparisonCreate, ComparisonStatus
from shared.settings import Settings
from shared.store import FINALIZE_STEP, START_STEP, ComparisonStore, LeaseLost
from shared.tasks import FINALIZE_COMPARISON, RUN_CANDIDATE, START_COMPARISON

ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris"},
    {"input": "What is two plus two?", "reference": "four"},
    {"input": "The sky is", "reference": "blue"},
    {"input": "Name a large planet.", "reference": "Jupiter"},
]
LEASE_S = 3


@dataclass
class Dispatched:
    name: str
    kwargs: dict[str, Any]
    task_id: str


@dataclass
class RecordingDispatch:
    """Publishes nothing: records each task, or refuses the next ones named in ``refuse`` the way
    a broker that cannot be reached does."""

    sent: list[Dispatched] = field(default_factory=list)
    refuse: list[str] = field(default_factory=list)

    def __call__(self, name: str, kwargs: dict[str, Any], task_id: str) -> None:
        if name in self.refuse:
            self.refuse.remove(name)
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append(Dispatched(name, dict(kwargs), task_id))

    def names(self) -> list[str]:
        return [d.name for d in self.sent]

    def of(self, name: str) -> list[Dispatched]:
        return [d for d in self.sent if d.name == name]


class HookedStore(ComparisonStore):
    """The real store, with a hook run before each fenced progress write: the point inside a
    running candidate where a test cancels, stalls, steals the lease or asks for a hand-off."""

    on_progress: Callable[[dict[str, Any]], None] | None = None

    def fenced_set_progress(self, comparison_id: str, label: str, **kwargs: Any) -> None:
        if self.on_progress is not None and kwargs.get("done", 0) > 0:
            self.on_progress(kwargs)
        super().fenced_set_progress(comparison_id, label, **kwargs)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('orchestration-mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache()  # shared, so each tiny model loads once


class Harness:
    def __init__(self, store: HookedStore, settings: Settings, models: ModelCache, artifacts: Path):
        self.store = store
        self.dispatch = RecordingDispatch()
        self.settings = settings
        self.ctx = pipeline.WorkerContext(
            settings=settings, store=store, models=models, dispatch=self.dispatch
        )
        self.client = MlflowClient(settings.mlflow_tracking_uri)
        self.experiment = f"orchestration-{store.prefix}"
        # Created here with its artifacts in the test's folder, not in ./mlruns.
        self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=str(artifacts))
        self.done: set[str] = set()

    def submit(self, *candidates: dict[str, Any], rows: list[dict[str, Any]] = ROWS) -> str:
        spec = ComparisonCreate.model_validate(
            {"name": "orchestration", "candidates": list(candidates), "dataset": {"rows": rows}}
        )
        comparison_id = uuid.uuid4().hex
        self.store.create(
            comparison_id=comparison_id, spec=spec, experiment=self.experiment, metrics=["output_words"]
        )
        return comparison_id

    def run(self, task: Dispatched) -> str:
        self.done.add(task.task_id)
        kwargs = task.kwargs
        if task.name == START_COMPARISON:
            return pipeline.start_comparison(self.ctx, kwargs["comparison_id"])
        if task.name == RUN_CANDIDATE:
            return pipeline.run_candidate(self.ctx, kwargs["comparison_id"], kwargs["label"])
        assert task.name == FINALIZE_COMPARISON
        return pipeline.finalize_comparison(self.ctx, kwargs["comparison_id"])

    def drain(self) -> list[str]:
        """Run every recorded task not run yet, including those they queue, in order."""
        outcomes = []
        while pending := [d for d in self.dispatch.sent if d.task_id not in self.done]:
            outcomes.append(self.run(pending[0]))
        return outcomes

    def start(self, comparison_id: str) -> str:
        return pipeline.start_comparison(self.ctx, comparison_id)

    def candidate(self, comparison_id: str, label: str) -> CandidateRecord:
        return self.store.candidate(comparison_id, label)

    def status(self, comparison_id: str) -> str:
        return self.store.status(comparison_id).value

    def cancel(self, comparison_id: str) -> None:
        """What the gateway does on DELETE: the comparison and its queued candidates."""
        assert self.store.transition(
            comparison_id,
            ComparisonStatus.cancelled,
            allowed_from=[ComparisonStatus.queued, ComparisonStatus.running],
        )
        for label in self.store.spec(comparison_id).labels:
            self.store.transition_candidate(
                comparison_id, label, CandidateState.cancelled, allowed_from=[CandidateState.queued]
            )

    def sweep(self, *, now: float | None = None) -> list[str]:
        return reconcile.sweep(
            self.ctx, reconcile.BrokerQueue(self.store.r, self.settings.queue_name), now=now
        )

    def runs(self, comparison_id: str) -> dict[str, str]:
        """MLflow run name -> status, every run tagged with the comparison."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{tracking.TAG_COMPARISON}` = '{comparison_id}'"
        )
        names = [r.info.run_name for r in found]
        assert len(names) == len(set(names)), f"duplicate runs: {names}"
        return {r.info.run_name: r.info.status for r in found}


@pytest.fixture
def harness(
    redis_client, redis_prefix, tracking_uri, models, model_root, tiny_models, tmp_path
) -> Iterator[Harness]:
    settings = Settings(
        mlflow_tracking_uri=tracking_uri,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        model_roots=[model_root],
        candidate_lease_s=LEASE_S,
        generation_batch_size=2,
        max_worker_deaths=2,
        task_max_retries=2,
        reconcile_interval_s=0.1,
        reconcile_grace_s=0,
    )
    store = HookedStore(redis_client, prefix=redis_prefix, ttl_s=3600)
    yield Harness(store, settings, models, tmp_path / "artifacts")
    pipeline.HAND_OFF.clear()


def causal(tiny_models, label: str = "causal", **generation: Any) -> dict[str, Any]:
    return {
        "label": label,
        "model": str(tiny_models["causal"]),
        "generation": {"max_new_tokens": 4, **generation},
    }


def missing(model_root, label: str = "missing") -> dict[str, Any]:
    return {"label": label, "model": str(model_root / "not-there")}


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# ------------------------------------------------------------------------------------ transitions
class TestHappyPath:
    def test_queued_running_succeeded_with_every_run_ended(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b", do_sample=True))
        assert harness.status(cid) == "queued"
        assert harness.start(cid) == "started"
        assert harness.status(cid) == "running"
        assert [d.kwargs["label"] for d in harness.dispatch.of(RUN_CANDIDATE)] == ["a", "b"]
        assert harness.store.task_ids(cid) == {d.kwargs["label"]: d.task_id for d in harness.dispatch.sent}
        assert harness.runs(cid) == {"orchestration": "RUNNING"}

        assert harness.run(harness.dispatch.sent[0]) == "succeeded"
        a = harness.candidate(cid, "a")
        assert (a.status, a.done, a.total) == (CandidateState.succeeded, 4, 4)
        assert harness.dispatch.of(FINALIZE_COMPARISON) == []  # b has not ended
        assert harness.run(harness.dispatch.sent[1]) == "succeeded"
        assert len(harness.dispatch.of(FINALIZE_COMPARISON)) == 1
        assert harness.run(harness.dispatch.of(FINALIZE_COMPARISON)[0]) == "succeeded"
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FINISHED", "b": "FINISHED"}
        assert harness.store.is_finalized(cid)
        assert harness.store.unfinished_comparisons() == []
        assert [len(harness.store.outputs(cid, label) or []) for label in ("a", "b")] == [4, 4]

    def test_a_failing_candidate_partially_fails_the_comparison(self, harness, tiny_models, model_root):
        cid = harness.submit(causal(tiny_models), missing(model_root))
        harness.start(cid)
        assert harness.drain() == ["succeeded", "failed", "partially_failed"]
        assert "does not exist" in harness.candidate(cid, "missing").error
        assert harness.runs(cid) == {"orchestration": "FINISHED", "causal": "FINISHED", "missing": "FAILED"}

    def test_every_candidate_failing_fails_the_parent_run(self, harness, model_root):
        cid = harness.submit(missing(model_root, "x"), missing(model_root, "y"))
        harness.start(cid)
        assert harness.drain() == ["failed", "failed", "failed"]
        assert harness.runs(cid) == {"orchestration": "FAILED", "x": "FAILED", "y": "FAILED"}


class TestRedelivery:
    def test_a_redelivered_start_queues_nothing_twice(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        harness.start(cid)
        assert [d.kwargs["label"] for d in harness.dispatch.of(RUN_CANDIDATE)] == ["a", "b"]
        assert list(harness.runs(cid)) == ["orchestration"]

    def test_redelivered_candidates_and_summary_change_nothing(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        harness.drain()
        assert harness.status(cid) == "succeeded"
        before = harness.candidate(cid, "a")
        for task in list(harness.dispatch.sent):
            assert harness.run(task) == "succeeded"  # every task delivered a second time
        assert harness.candidate(cid, "a") == before
        assert len(harness.dispatch.of(FINALIZE_COMPARISON)) == 1
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FINISHED", "b": "FINISHED"}

    def test_a_copy_finding_the_lease_held_waits_for_it_to_lapse(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        holder = Lease(harness.store.r, harness.store.lease_key(cid, "a"), ttl_s=LEASE_S)
        assert holder.acquire()
        with pytest.raises(StepBusy) as busy:
            harness.run(harness.dispatch.sent[0])
        assert 1 < busy.value.retry_in_s <= LEASE_S + 1
        assert harness.candidate(cid, "a").status is CandidateState.queued

    def test_a_redelivery_after_a_death_takes_over_the_same_run(self, harness, tiny_models):
        """The first delivery died mid-candidate (its lease lapsed, the candidate reads running):
        the next one reuses its MLflow run and writes every row."""
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        stalled, release = threading.Event(), threading.Event()

        def stall(_: dict[str, Any]) -> None:
            stalled.set()
            release.wait(30)

        harness.store.on_progress = stall
        first, started = in_thread(lambda: harness.run(harness.dispatch.sent[0]))
        assert stalled.wait(60)
        harness.store.on_progress = None
        run_id = harness.candidate(cid, "a").run_id
        # The process is gone: its lease is dropped as a lapse would drop it.
        harness.store.force_release(harness.store.lease_key(cid, "a"))
        assert harness.run(harness.dispatch.sent[0]) == "succeeded"
        assert harness.candidate(cid, "a").run_id == run_id
        release.set()
        first.join(30)
        assert isinstance(started.get("error"), LeaseLost)  # the stalled one wrote nothing more
        assert harness.candidate(cid, "a").done == 4
        assert len(harness.store.outputs(cid, "a") or []) == 4


class TestCancel:
    def test_cancelled_while_queued_is_closed_by_its_start(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.cancel(cid)
        assert harness.start(cid) == "skipped"
        assert harness.dispatch.names() == [FINALIZE_COMPARISON]
        assert harness.drain() == ["cancelled"]
        assert harness.store.is_finalized(cid)
        assert harness.store.get(cid).parent_run_id is None
        assert harness.runs(cid) == {}

    def test_cancelled_after_start_ends_the_parent_run_killed(self, harness, tiny_models):
        """The gateway cancels the queued candidates and revokes their tasks: one of them still
        runs (it was already delivered), the other never does."""
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        harness.cancel(cid)
        assert harness.run(harness.dispatch.sent[0]) == "cancelled"
        finalize = harness.dispatch.of(FINALIZE_COMPARISON)
        assert len(finalize) == 1
        assert harness.run(finalize[0]) == "cancelled"
        assert harness.runs(cid) == {"orchestration": "KILLED"}

    def test_cancelling_a_running_candidate_ends_it_and_the_comparison(self, harness, tiny_models):
        rows = ROWS * 4
        cid = harness.submit(causal(tiny_models, "a", max_new_tokens=8), causal(tiny_models, "b"), rows=rows)
        harness.start(cid)

        def cancel_once(_: dict[str, Any]) -> None:
            harness.store.on_progress = None
            harness.cancel(cid)

        harness.store.on_progress = cancel_once
        assert harness.run(harness.dispatch.sent[0]) == "cancelled"
        a = harness.candidate(cid, "a")
        assert a.status is CandidateState.cancelled and 0 < a.done < len(rows)
        assert harness.candidate(cid, "b").status is CandidateState.cancelled  # the gateway cancelled it
        # b's task was revoked and never runs; the summary step comes anyway.
        assert harness.dispatch.names().count(FINALIZE_COMPARISON) == 1
        assert harness.run(harness.dispatch.of(FINALIZE_COMPARISON)[0]) == "cancelled"
        assert harness.runs(cid) == {"orchestration": "KILLED", "a": "KILLED"}
        assert harness.store.unfinished_comparisons() == []

    def test_cancelled_after_the_candidates_ended(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        harness.run(harness.dispatch.sent[0])
        harness.run(harness.dispatch.sent[1])
        harness.cancel(cid)
        assert harness.drain() == ["cancelled"]
        assert harness.runs(cid) == {"orchestration": "KILLED", "a": "FINISHED", "b": "FINISHED"}


# ---------------------------------------------------------------------------------- stuck, before
class TestNothingIsLeftRunning:
    def test_the_hard_time_limit_fails_the_candidate_and_the_comparison_ends(
        self, harness, tiny_models, monkeypatch
    ):
        """The hard limit kills the task body, so no except clause runs; Celery calls on_failure
        from the worker's main process with TimeLimitExceeded."""
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        stalled, release = threading.Event(), threading.Event()

        def stall(_: dict[str, Any]) -> None:
            stalled.set()
            release.wait(30)

        harness.store.on_progress = stall
        body, result = in_thread(lambda: harness.run(harness.dispatch.sent[0]))
        assert stalled.wait(60)
        harness.store.on_progress = None
        monkeypatch.setattr(tasks, "context", lambda: harness.ctx)
        kwargs = {"comparison_id": cid, "label": "a"}
        tasks.run_candidate.on_failure(TimeLimitExceeded(10800), "t", (), kwargs, None)
        a = harness.candidate(cid, "a")
        assert a.status is CandidateState.failed
        assert a.error.startswith("the candidate ran longer than TASK_TIME_LIMIT_S (10800 s)")
        # Had the body lived on, it could not write any more.
        release.set()
        body.join(30)
        assert isinstance(result.get("error"), LeaseLost)
        assert harness.candidate(cid, "a").status is CandidateState.failed
        assert harness.drain() == ["succeeded", "partially_failed"]
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FAILED", "b": "FINISHED"}

    def test_a_start_that_gives_up_fails_the_comparison(self, harness, tiny_models, monkeypatch):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        monkeypatch.setattr(tasks, "context", lambda: harness.ctx)
        error = MlflowException("Could not create run under non-active experiment with ID 7.")
        tasks.start_comparison.on_failure(error, "t", (), {"comparison_id": cid}, None)
        assert harness.drain() == ["failed"]
        record = harness.store.get(cid)
        assert record.error == f"could not start: MlflowException: {error.message}"
        assert [harness.candidate(cid, label).status for label in ("a", "b")] == [CandidateState.failed] * 2
        assert harness.store.unfinished_comparisons() == []

    def test_a_summary_step_that_gives_up_ends_the_parent_run(self, harness, tiny_models, monkeypatch):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.run(harness.dispatch.sent[0])
        monkeypatch.setattr(tasks, "context", lambda: harness.ctx)
        tasks.finalize_comparison.on_failure(KeyError("metrics"), "t", (), {"comparison_id": cid}, None)
        assert harness.status(cid) == "failed"
        assert harness.store.get(cid).error == "summary step failed: KeyError: 'metrics'"
        assert harness.runs(cid) == {"orchestration": "FAILED", "a": "FINISHED"}
        assert harness.run(harness.dispatch.of(FINALIZE_COMPARISON)[0]) == "failed"  # delivered late
        assert harness.store.unfinished_comparisons() == []

    def test_busy_retries_running_out_leave_the_candidate_to_the_sweep(
        self, harness, tiny_models, monkeypatch
    ):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        monkeypatch.setattr(tasks, "context", lambda: harness.ctx)
        # A holder that died without releasing its lease (which has not lapsed yet).
        holder = Lease(harness.store.r, harness.store.lease_key(cid, "a"), ttl_s=60)
        assert holder.acquire()
        task = harness.dispatch.sent[0]
        tasks.run_candidate.push_request(retries=10_000, id=task.task_id)
        try:
            assert tasks.run_candidate.run(**task.kwargs) == "busy"
        finally:
            tasks.run_candidate.pop_request()
        harness.store.r.delete(harness.store._key(cid, "expect", "a"))
        assert harness.sweep() == []  # the lease is still held: the holder may be alive
        holder.r.delete(holder.key)  # ... until it lapses
        assert harness.sweep() == [f"{cid} a: queued again"]
        assert harness.drain() == ["succeeded", "succeeded", "succeeded"]
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FINISHED"}

    def test_a_start_whose_dispatch_failed_queues_the_rest_when_redelivered(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"), causal(tiny_models, "c"))
        harness.dispatch.refuse = [RUN_CANDIDATE]
        # The first publish is refused: nothing may be recorded for a task that was not published.
        with pytest.raises(OperationalError):
            harness.start(cid)
        assert harness.store.task_ids(cid) == {}
        harness.start(cid)
        assert sorted(d.kwargs["label"] for d in harness.dispatch.of(RUN_CANDIDATE)) == ["a", "b", "c"]
        assert harness.drain() == ["succeeded"] * 3 + ["succeeded"]

    def test_a_failed_summary_dispatch_is_queued_by_the_redelivered_candidate(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.dispatch.refuse = [FINALIZE_COMPARISON]
        with pytest.raises(OperationalError):
            harness.run(harness.dispatch.sent[0])
        assert harness.dispatch.of(FINALIZE_COMPARISON) == []
        assert harness.run(harness.dispatch.sent[0]) == "succeeded"  # the task's retry
        assert len(harness.dispatch.of(FINALIZE_COMPARISON)) == 1
        assert harness.drain() == ["succeeded"]

    def test_a_lost_summary_step_is_queued_by_the_sweep(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.dispatch.refuse = [FINALIZE_COMPARISON]
        # Redis went away right after the refused publish: the claim could not be released.
        harness.store.release_finalize_claim = lambda comparison_id: None  # type: ignore[method-assign]
        with pytest.raises(OperationalError):
            harness.run(harness.dispatch.sent[0])
        assert harness.run(harness.dispatch.sent[0]) == "succeeded"
        assert harness.dispatch.of(FINALIZE_COMPARISON) == []  # nobody queues it again...
        assert harness.status(cid) == "running"
        assert harness.sweep() == [f"{cid} {FINALIZE_STEP}: queued again"]  # ...but the sweep
        assert harness.drain() == ["succeeded"]
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FINISHED"}

    def test_a_retry_that_could_not_be_published_is_queued_by_the_sweep(
        self, harness, tiny_models, monkeypatch
    ):
        """MLflow fails the candidate transiently, then its retry cannot be published (Redis is
        down): the message is gone and nothing holds the candidate."""
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        down = harness.settings.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:9"})
        with pytest.raises(tracking.TrackingUnavailable):
            pipeline.run_candidate(
                pipeline.WorkerContext(
                    settings=down, store=harness.store, models=harness.ctx.models, dispatch=harness.dispatch
                ),
                cid,
                "a",
            )
        assert harness.candidate(cid, "a").status is CandidateState.running
        assert harness.store.r.get(harness.store.lease_key(cid, "a")) is None
        harness.store.r.delete(harness.store._key(cid, "expect", "a"))
        assert harness.sweep() == [f"{cid} a: queued again"]
        assert harness.drain() == ["succeeded", "succeeded", "succeeded"]
        assert harness.runs(cid) == {"orchestration": "FINISHED", "a": "FINISHED"}


# ---------------------------------------------------------------------------------- leases, deaths
class TestFencing:
    def test_a_process_that_lost_its_lease_cannot_overwrite_the_new_holder(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), rows=ROWS * 2)
        harness.start(cid)
        key = harness.store.lease_key(cid, "a")
        new_holder = Lease(harness.store.r, key, ttl_s=60)

        def taken_over(_: dict[str, Any]) -> None:
            # This process stalled past its lease and another delivery took the candidate over.
            harness.store.on_progress = None
            harness.store.force_release(key)
            assert new_holder.acquire()
            theirs = pipeline.CandidateWriter(harness.store, cid, "a", new_holder)
            theirs.progress(done=1, total=8)
            theirs.outputs([{"output": "theirs", "scores": {}}])

        harness.store.on_progress = taken_over
        with pytest.raises(LeaseLost):
            harness.run(harness.dispatch.sent[0])
        a = harness.candidate(cid, "a")
        assert (a.status, a.done) == (CandidateState.running, 1)
        assert harness.store.outputs(cid, "a") == [{"output": "theirs", "scores": {}}]
        assert harness.store.r.get(key) == new_holder.token  # its lease was not released by the loser
        assert harness.dispatch.of(FINALIZE_COMPARISON) == []  # nor did it count as ended

    def test_fenced_writes_check_the_token(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        key = harness.store.lease_key(cid, "a")
        mine = Lease(harness.store.r, key, ttl_s=60)
        assert mine.acquire()
        writer = pipeline.CandidateWriter(harness.store, cid, "a", mine)
        assert writer.transition(CandidateState.running, allowed_from=[CandidateState.queued])
        assert not writer.transition(CandidateState.running, allowed_from=[CandidateState.queued])
        harness.store.r.set(key, "someone-else")
        for write in (
            lambda: writer.progress(done=2, total=4),
            lambda: writer.fields(error="x"),
            lambda: writer.outputs([]),
            lambda: writer.transition(CandidateState.failed, allowed_from=[CandidateState.running]),
        ):
            with pytest.raises(LeaseLost):
                write()
        a = harness.candidate(cid, "a")
        assert (a.status, a.done, a.error) == (CandidateState.running, 0, None)
        assert harness.store.outputs(cid, "a") is None


class TestWorkerDeaths:
    def test_a_candidate_that_killed_its_worker_too_often_fails(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.start(cid)
        for _ in range(3):  # three starts whose process died (never uncounted)
            harness.store.begin_attempt(cid, "a")
        assert harness.drain() == ["failed", "succeeded", "partially_failed"]
        assert harness.candidate(cid, "a").error == (
            "the worker running this candidate died 3 times (for example out of memory); "
            "lower GENERATION_BATCH_SIZE or max_new_tokens"
        )
        assert harness.runs(cid) == {"orchestration": "FINISHED", "b": "FINISHED"}

    def test_up_to_the_limit_it_runs_again(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        for _ in range(2):
            harness.store.begin_attempt(cid, "a")
        assert harness.drain() == ["succeeded", "succeeded"]

    def test_starts_that_end_in_an_error_are_no_deaths(self, harness, model_root):
        cid = harness.submit(missing(model_root, "x"))
        harness.start(cid)
        for _ in range(4):
            harness.store.force_release(harness.store.lease_key(cid, "x"))
            harness.store.transition_candidate(
                cid, "x", CandidateState.queued, allowed_from=[CandidateState.failed]
            )
            assert harness.run(harness.dispatch.sent[0]) == "failed"
            assert "does not exist" in harness.candidate(cid, "x").error

    def test_a_hand_off_gives_the_candidate_back_unharmed(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), rows=ROWS * 2)
        harness.start(cid)

        def shutting_down(_: dict[str, Any]) -> None:
            harness.store.on_progress = None
            pipeline.HAND_OFF.set()

        harness.store.on_progress = shutting_down
        with pytest.raises(pipeline.HandOff):
            harness.run(harness.dispatch.sent[0])
        pipeline.HAND_OFF.clear()
        assert harness.candidate(cid, "a").status is CandidateState.running
        assert harness.store.r.get(harness.store.lease_key(cid, "a")) is None
        assert harness.store.begin_attempt(cid, "a") == 1  # the hand-off was no death
        harness.store.end_attempt(cid, "a")
        assert harness.run(harness.dispatch.sent[0]) == "succeeded"  # the message, delivered again
        assert harness.drain() == ["succeeded"]


# ------------------------------------------------------------------------------------- the sweep
class TestSweep:
    def test_it_waits_for_the_grace_period(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.settings.reconcile_grace_s = 30
        assert harness.sweep(now=1000.0) == []
        assert harness.sweep(now=1029.0) == []
        assert harness.sweep(now=1030.0) == [f"{cid} {START_STEP}: queued again"]
        assert harness.dispatch.names() == [START_COMPARISON]

    def test_a_message_waiting_in_the_queue_is_left_alone(self, harness, tiny_models, redis_url):
        cid = harness.submit(causal(tiny_models, "a"))
        app = Celery("test-sweep")
        app.conf.update(celery_config(harness.settings.model_copy(update={"redis_url": redis_url})))
        app.send_task(START_COMPARISON, kwargs={"comparison_id": cid}, queue=harness.settings.queue_name)
        app.close()
        harness.store.r.delete(f"_kombu.binding.{harness.settings.queue_name}")
        assert reconcile.BrokerQueue(harness.store.r, harness.settings.queue_name).waiting() == {
            cid: {START_STEP}
        }
        assert harness.sweep() == []
        harness.store.r.delete(harness.settings.queue_name)
        assert harness.sweep() == [f"{cid} {START_STEP}: queued again"]

    def test_a_running_candidate_is_left_alone(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.store.r.delete(harness.store._key(cid, "expect", "a"))
        held = Lease(harness.store.r, harness.store.lease_key(cid, "a"), ttl_s=60)
        assert held.acquire()
        assert harness.sweep() == []

    def test_a_candidate_lost_too_often_fails_and_the_comparison_ends(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        for attempt in range(2):
            harness.store.r.delete(harness.store._key(cid, "expect", "a"))
            assert harness.sweep() == [f"{cid} a: queued again"], attempt
        harness.store.r.delete(harness.store._key(cid, "expect", "a"))
        assert harness.sweep() == [f"{cid} a: failed"]
        a = harness.candidate(cid, "a")
        assert a.error == (
            "the candidate's task was lost 2 times (its worker stopped without handing it back); "
            "see the workers' logs"
        )
        assert harness.run(harness.dispatch.of(FINALIZE_COMPARISON)[0]) == "failed"
        assert harness.runs(cid) == {"orchestration": "FAILED"}

    def test_a_start_that_died_mid_fan_out_is_queued_again(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"), causal(tiny_models, "b"))
        harness.dispatch.refuse = [RUN_CANDIDATE]
        with pytest.raises(OperationalError):
            harness.start(cid)  # and its retry could not be published either
        harness.store.r.delete(harness.store._key(cid, "expect", START_STEP))
        assert harness.sweep() == [f"{cid} {START_STEP}: queued again"]
        assert harness.drain() == ["started", "succeeded", "succeeded", "succeeded"]

    def test_a_lost_summary_step_past_the_limit_ends_the_comparison(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.run(harness.dispatch.sent[0])
        for _ in range(3):
            harness.store.r.delete(harness.store._key(cid, "expect", FINALIZE_STEP))
            harness.sweep()
        assert harness.status(cid) == "failed"
        assert harness.store.get(cid).error == "the summary step was lost 2 times; see the workers' logs"
        assert harness.runs(cid) == {"orchestration": "FAILED", "a": "FINISHED"}
        assert harness.store.unfinished_comparisons() == []

    def test_a_cancelled_candidate_nobody_runs_is_ended(self, harness, tiny_models):
        cid = harness.submit(causal(tiny_models, "a"))
        harness.start(cid)
        harness.store.transition_candidate(
            cid, "a", CandidateState.running, allowed_from=[CandidateState.queued]
        )
        harness.cancel(cid)  # a was running: the gateway leaves it to its task, which was lost
        harness.store.r.delete(harness.store._key(cid, "expect", "a"))
        assert harness.sweep() == [f"{cid} a: cancelled"]
        assert harness.drain() == ["cancelled", "cancelled"]
        assert harness.runs(cid) == {"orchestration": "KILLED"}
