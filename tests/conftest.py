"""Shared fixtures. Integration fixtures start real processes (MLflow server, Celery workers,
the API under uvicorn) on free ports, against the Redis at REDIS_URL (or, when none answers there,
one the session starts itself), and stop them afterwards. Every run uses its own Redis key prefix
and queue, so runs never see each other."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The tests talk to MLflow servers too; keep its telemetry thread (and its os.environ edits) out.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# mlflow.set_tracking_uri(None) falls back to this variable, else to ./mlflow.db in the working
# directory: keep whatever a test logs there out of the checkout.
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='llmc-tests-')}/mlflow.db")

from scripts.stack import Stack, free_port, redis_for_tests
from shared.client import ComparisonClient
from tests.fixtures.json_client import JsonClient
from tests.fixtures.tiny_models import build_all

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def _forget_the_active_mlflow_experiment() -> Iterator[None]:
    """Tests that read tables the notebook way call mlflow.set_experiment(), which is process-wide
    (a module global and MLFLOW_EXPERIMENT_ID); a later mlflow.start_run(run_id=...) in another
    experiment then refuses to start. Each test starts without one."""
    yield
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = None  # type: ignore[attr-defined]
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis at REDIS_URL; when none answers, one of the session's own (append-only, data in
    a temporary directory), stopped at the end. REDIS_URL then names it for code that reads the
    environment; the stacks the fixtures start get it from here."""
    with redis_for_tests(REDIS_URL, tmp_path_factory.mktemp("redis")) as url:
        previous = os.environ.get("REDIS_URL")
        os.environ["REDIS_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("REDIS_URL", None)
            else:
                os.environ["REDIS_URL"] = previous


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_models(model_root: Path) -> dict[str, Path]:
    return build_all(model_root)


def _cleanup_prefix(client: redis.Redis, prefix: str, queue: str) -> None:
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.delete(queue)


@pytest.fixture
def redis_prefix(redis_client) -> Iterator[str]:
    """A key prefix of this test's own, whose keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield prefix
    _cleanup_prefix(redis_client, prefix, queue=prefix)


@pytest.fixture(scope="session")
def api_only(redis_url, redis_client, run_id, tmp_path_factory, model_root) -> Iterator[Stack]:
    """The API alone: no worker consumes its queue and no MLflow server answers."""
    prefix, queue = f"test-api-{run_id}", f"test-api-{run_id}"
    stack = Stack(
        run_dir=tmp_path_factory.mktemp("api-only"),
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=free_port(),  # nothing listens there: /readyz must say so
        queue_name=queue,
        key_prefix=prefix,
        extra_env={
            "MODEL_ROOTS": f"{model_root}:/models",
            "MAX_BODY_BYTES": str(256 * 1024),
            "MAX_ROWS": "50",
            "MAX_CANDIDATES": "4",
            "MAX_NEW_TOKENS": "256",
        },
    )
    stack.start_api()
    yield stack
    stack.stop()
    _cleanup_prefix(redis_client, prefix, queue)


@pytest.fixture
def api_client(api_only: Stack) -> Iterator[JsonClient]:
    client = JsonClient(ComparisonClient(api_only.api_url))
    yield client
    client.close()
