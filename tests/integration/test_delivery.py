"""Handing work over between real Celery workers: a worker stopped with SIGTERM (a redeploy)
gives its running candidate back at once; one killed outright loses it to the reconciler, long
before the broker's visibility timeout. Two workers of their own, on their own queue and Redis
keys, an MLflow server and the API, all on free ports."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from scripts.stack import Stack, free_port
from services.worker import tracking
from shared.client import ComparisonClient
from tests.conftest import _cleanup_prefix
from tests.fixtures.json_client import JsonClient

pytestmark = pytest.mark.integration

ROWS = [
    {"input": f"{question} ({i})", "reference": reference}
    for i in range(60)
    for question, reference in (
        ("What is the capital of France?", "Paris"),
        ("Name a large planet.", "Jupiter"),
        ("What is two plus two?", "four"),
        ("The sky is", "blue"),
    )
]


@pytest.fixture(scope="module")
def workers(redis_url, redis_client, run_id, tmp_path_factory, model_root, tiny_models) -> Iterator[Stack]:
    prefix = f"test-delivery-{run_id}"
    stack = Stack(
        run_dir=tmp_path_factory.mktemp("delivery"),
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=free_port(),
        workers=2,
        queue_name=prefix,
        key_prefix=prefix,
        # The delivery settings keep their defaults (lease 60 s, soft shutdown 10 s) except the
        # reconciler's, shortened so that the SIGKILL case fits a test.
        extra_env={
            "MODEL_ROOTS": str(model_root),
            "TORCH_THREADS": "1",
            # One row at a time: the long candidate then generates for longer than the soft
            # shutdown lets it run on, even with these tiny models.
            "GENERATION_BATCH_SIZE": "1",
            "RECONCILE_INTERVAL_S": "2",
            "RECONCILE_GRACE_S": "4",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        _cleanup_prefix(redis_client, prefix, prefix)


@pytest.fixture(scope="module")
def api(workers: Stack) -> Iterator[JsonClient]:
    client = JsonClient(ComparisonClient(workers.api_url))
    yield client
    client.close()


def spec(tiny_models: dict[str, Path], name: str) -> dict[str, Any]:
    """A long candidate to interrupt, and a short one that frees the other worker at once."""
    return {
        "name": name,
        "experiment": "e2e-delivery",
        "candidates": [
            {"label": "long", "model": str(tiny_models["causal"]), "generation": {"max_new_tokens": 64}},
            {"label": "short", "model": str(tiny_models["seq2seq"]), "generation": {"max_new_tokens": 1}},
        ],
        "dataset": {"rows": ROWS},
        "metrics": ["output_words"],
        "cache": False,  # every test generates, rather than reading the earlier test's outputs
    }


def worker_holding(workers: Stack, api: ComparisonClient, comparison_id: str) -> tuple[str, int]:
    """Once the long candidate is mid-generation: (the worker's name, its pool process id)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        long = api.get(comparison_id)["candidates"][0]
        if long["status"] == "running" and 0 < long["progress"]["done"] < len(ROWS):
            child = int(long["worker"].rsplit(":", 1)[1])
            parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
            name = next(name for name, pid in workers.pids.items() if pid == parent)
            return name, child
        time.sleep(0.05)
    raise AssertionError("never saw the long candidate mid-generation")


def assert_complete_without_duplicates(api: ComparisonClient, workers: Stack, final: dict[str, Any]) -> None:
    assert final["status"] == "succeeded", final
    long = final["candidates"][0]
    assert (long["progress"]["done"], long["progress"]["total"]) == (len(ROWS), len(ROWS))
    results = api.results(final["id"])
    assert all(isinstance(row["outputs"]["long"]["output"], str) for row in results["rows"])  # 0 rows lost
    client = MlflowClient(workers.mlflow_url)
    runs = client.search_runs(
        [final["mlflow"]["experiment_id"]],
        filter_string=f"tags.`{tracking.TAG_COMPARISON}` = '{final['id']}'",
    )
    assert sorted(r.info.run_name for r in runs) == sorted([final["name"], "long", "short"])  # no duplicate
    assert {r.info.status for r in runs} == {"FINISHED"}


def restart(workers: Stack, name: str) -> None:
    workers.stop([name])
    log = workers.log_path(name)
    ready = log.read_text().count(" ready.")
    workers.start_worker(int(name.removeprefix("worker")))
    deadline = time.monotonic() + 120
    while log.read_text().count(" ready.") == ready:
        assert time.monotonic() < deadline, f"{name} did not start again"
        time.sleep(0.2)


def test_a_sigtermed_worker_hands_its_candidate_over_within_a_minute(workers, api, tiny_models):
    created = api.submit(spec(tiny_models, "sigterm"))
    name, child = worker_holding(workers, api, created["id"])
    # As `docker stop` and Kubernetes do: SIGTERM to the worker's main process only.
    os.kill(workers.pids[name], signal.SIGTERM)
    stopped = time.monotonic()
    final = api.wait(created["id"], timeout=60, poll_s=0.5)
    assert time.monotonic() - stopped < 60
    assert_complete_without_duplicates(api, workers, final)
    long = final["candidates"][0]
    assert int(long["worker"].rsplit(":", 1)[1]) != child
    log = workers.log_path(name).read_text()
    assert "Restoring 1 unacknowledged message(s)" in log
    restart(workers, name)


def test_a_sigkilled_worker_loses_its_candidate_to_the_reconciler(workers, api, tiny_models):
    created = api.submit(spec(tiny_models, "sigkill"))
    name, child = worker_holding(workers, api, created["id"])
    # The whole worker at once (its main process and pool): nothing hands the message back, and the
    # broker would redeliver it only after TASK_TIME_LIMIT_S + 10 min.
    os.killpg(workers.pids[name], signal.SIGKILL)
    killed = time.monotonic()
    # The lease lapses (CANDIDATE_LEASE_S), then the sweep waits out its grace period.
    final = api.wait(created["id"], timeout=150, poll_s=0.5)
    assert time.monotonic() - killed < 60 + 4 + 2 * 2 + 30
    assert_complete_without_duplicates(api, workers, final)
    other = next(n for n in ("worker0", "worker1") if n != name)
    assert "reconcile.acted" in workers.log_path(other).read_text()
    restart(workers, name)
