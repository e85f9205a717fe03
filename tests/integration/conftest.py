"""The stack the end-to-end and browser tests share: Redis, an `mlflow server`, two Celery
workers, an I/O worker, the API under uvicorn, a loopback judge and a loopback OpenAI-compatible
endpoint (ENDPOINTS_FILE), all started once on free ports."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser, sync_playwright

from scripts.browser import CHROMIUM, CHROMIUM_ARGS
from scripts.stack import Stack, free_port
from shared.client import ComparisonClient
from tests.conftest import _cleanup_prefix
from tests.fixtures.json_client import JsonClient
from tests.fixtures.judge_server import JudgeServer
from tests.fixtures.openai_server import OpenAIServer, endpoint_entry

# The loopback endpoint's key, passed to the processes the way `make dev` passes api_key_env's.
ENDPOINT_KEY_ENV = "E2E_ENDPOINT_KEY"
ENDPOINT_KEY = "e2e-endpoint-key"
# Requests the loopback endpoint may have in flight at once, across the I/O workers.
ENDPOINT_LIMIT = 3


@pytest.fixture(scope="package")
def judge_server() -> Iterator[JudgeServer]:
    with JudgeServer(api_key="e2e-key") as server:
        yield server


@pytest.fixture(scope="package")
def openai_server() -> Iterator[OpenAIServer]:
    with OpenAIServer(served_model="loopback-e2e-v1", api_key=ENDPOINT_KEY) as server:
        yield server


@pytest.fixture(scope="package")
def stack(
    redis_url, redis_client, run_id, tmp_path_factory, model_root, tiny_models, judge_server, openai_server
) -> Iterator[Stack]:
    prefix, queue = f"test-e2e-{run_id}", f"test-e2e-{run_id}"
    endpoints = tmp_path_factory.mktemp("endpoints") / "endpoints.yaml"
    endpoints.write_text(
        json.dumps(
            [
                endpoint_entry(
                    openai_server, "loop-chat", api_key_env=ENDPOINT_KEY_ENV, max_concurrency=ENDPOINT_LIMIT
                ),
                endpoint_entry(
                    openai_server,
                    "loop-text",
                    api="completions",
                    api_key_env=ENDPOINT_KEY_ENV,
                    max_concurrency=ENDPOINT_LIMIT,
                ),
            ]
        )
    )
    stack = Stack(
        run_dir=tmp_path_factory.mktemp("e2e"),
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=free_port(),
        workers=2,
        worker_concurrency=1,
        io_workers=1,
        queue_name=queue,
        key_prefix=prefix,
        # Two worker processes share two cores: one torch thread each avoids oversubscription.
        # A short lease lets a redelivered task take over from a killed worker within seconds.
        extra_env={
            "MODEL_ROOTS": str(model_root),
            "TORCH_THREADS": "1",
            "GENERATION_BATCH_SIZE": "4",
            "CANDIDATE_LEASE_S": "8",
            "CUSTOM_METRIC_MODULES": "examples.custom_metrics",
            # Gateway and workers both see the judge: the gateway to accept judge metrics.
            "JUDGE_BASE_URL": judge_server.base_url,
            "JUDGE_MODEL": "rule-judge",
            "JUDGE_API_KEY": "e2e-key",
            # Webhook receivers on loopback (tests/integration/test_webhooks.py); retries in
            # seconds instead of the 28-hour schedule.
            "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "WEBHOOK_RETRY_SCHEDULE_S": "0,1,1,1",
            "WEBHOOK_SWEEP_INTERVAL_S": "0.2",
            # Remote endpoints on loopback (tests/integration/test_remote_endpoints.py).
            "ENDPOINTS_FILE": str(endpoints),
            ENDPOINT_KEY_ENV: ENDPOINT_KEY,
            "ENDPOINT_RETRY_BASE_S": "0.2",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        _cleanup_prefix(redis_client, prefix, queue)


@pytest.fixture(scope="package")
def client(stack: Stack) -> Iterator[JsonClient]:
    client = JsonClient(ComparisonClient(stack.api_url))
    yield client
    client.close()


@pytest.fixture(scope="package")
def mlflow_client(stack: Stack) -> MlflowClient:
    mlflow.set_tracking_uri(stack.mlflow_url)
    return MlflowClient(stack.mlflow_url)


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (``playwright install`` cannot download here).
    Missing, it skips the browser tests locally and fails them in CI (CI is set there)."""
    if not CHROMIUM.exists():
        message = f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
