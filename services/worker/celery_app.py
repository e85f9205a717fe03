"""The worker's Celery app: ``celery -A services.worker.celery_app worker``.

Nothing heavy happens at import: models load lazily inside each worker process (child), never in
the prefork parent, because CUDA and tokenizer thread pools do not survive a fork.

Once ready, the worker's main process also hands work back on SIGTERM (below) and runs the
reconciler (services/worker/reconcile.py) in a thread.
"""

from __future__ import annotations

import os
from typing import Any

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
from shared.settings import get_settings
from shared.tasks import queue_for  # noqa: E402

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


@signals.worker_ready.connect
def _hand_work_back_on_sigterm(sender: Any, **_: object) -> None:
    """SIGTERM (a redeploy, `docker stop`, a Kubernetes rollout) hands running work back within
    WORKER_SOFT_SHUTDOWN_S instead of waiting for it, which took up to TASK_TIME_LIMIT_S; a worker
    SIGKILLed at the end of its grace period left its message to the visibility timeout.

    Prefork pools: SIGTERM starts Celery's cold shutdown, as REMAP_SIGTERM=SIGQUIT would (that
    variable is read when billiard is imported, before this module). Running tasks get
    worker_soft_shutdown_timeout to finish, then their processes are stopped (SystemExit, so
    leases are released) and their unacknowledged messages go back to the queue.
    Solo pools run the task in this very process, where the cold shutdown cannot stop it: Celery's
    warm shutdown goes on, and a running candidate gives its message back at its next progress
    report (pipeline.HAND_OFF).
    """
    from celery.apps.worker import install_worker_term_hard_handler
    from celery.concurrency.prefork import TaskPool as PreforkPool

    worker = sender.controller
    if isinstance(sender.pool, PreforkPool):
        install_worker_term_hard_handler(worker, sig="SIGTERM")
        log.info("worker.sigterm_hands_back", soft_shutdown_s=app.conf.worker_soft_shutdown_timeout)


@signals.worker_shutting_down.connect
def _hand_off_running_candidate(**_: object) -> None:
    from services.worker import pipeline

    pipeline.HAND_OFF.set()
    stop = _reconciler.get("stop")
    if stop is not None:
        stop.set()


_reconciler: dict[str, Any] = {}


@signals.worker_ready.connect
def _start_reconciler(**_: object) -> None:
    from services.worker import reconcile
    from services.worker.models import ModelCache
    from services.worker.pipeline import WorkerContext
    from shared.store import ComparisonStore

    def make_context() -> WorkerContext:
        settings = get_settings()
        store = ComparisonStore.from_url(
            settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
        )

        def dispatch(name: str, kwargs: dict[str, Any], task_id: str) -> None:
            app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue_for(name, settings))

        # The sweep never loads a model: the cache stays empty in this (parent) process.
        return WorkerContext(settings=settings, store=store, models=ModelCache(), dispatch=dispatch)

    _reconciler["stop"] = reconcile.start_in_background(make_context)
