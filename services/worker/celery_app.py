"""The worker's Celery app: ``celery -A services.worker.celery_app worker``.

Nothing heavy happens at import: models load lazily inside each worker process (child), never in
the prefork parent, because CUDA and tokenizer thread pools do not survive a fork.
"""

from __future__ import annotations

import os

# Must be set before any tokenizer is created and before the pool forks: a Rust thread pool
# started in the parent deadlocks the children.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Logging models offline would otherwise run a pip dry run against the registry.
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
# MLflow's usage telemetry sets and unsets an environment variable from a background thread while
# requests iterates os.environ, which failed a task with KeyError('_MLFLOW_TELEMETRY_SESSION_ID');
# a worker also has no network to send it over.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import structlog  # noqa: E402
from celery import Celery, signals  # noqa: E402

from shared.celery_config import celery_config  # noqa: E402
from shared.settings import get_settings  # noqa: E402

log = structlog.get_logger()

app = Celery("llm-compare-worker")
app.conf.update(celery_config(get_settings()))
app.conf.imports = ("services.worker.tasks",)


@signals.worker_process_init.connect
def _configure_torch(**_: object) -> None:
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


@signals.worker_ready.connect
def _publish_custom_metrics(**_: object) -> None:
    """Let the gateway know which custom metrics this worker can run (it imports no worker code)."""
    from services.worker.custom_metrics import load_custom_metrics, publish
    from shared.store import ComparisonStore

    settings = get_settings()
    store = ComparisonStore.from_url(settings.redis_url, prefix=settings.key_prefix)
    publish(store.r, settings.key_prefix, load_custom_metrics(settings))
