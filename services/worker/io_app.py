"""The I/O workers' Celery app: ``celery -A services.worker.io_app worker --queues <QUEUE_NAME>.io
--pool threads --concurrency 32``.

It runs the work that only waits on the network — requests to remote model endpoints, webhook
deliveries — many tasks at once in threads, in a process that never imports torch, transformers
or mlflow (a test keeps it so), so its image needs none of them. Scoring with mlflow.evaluate()
stays on the model workers' queue.
"""

from __future__ import annotations

import structlog
from celery import Celery

from shared.celery_config import celery_config
from shared.settings import get_settings

log = structlog.get_logger()

_settings = get_settings()
app = Celery("llm-compare-io")
app.conf.update(celery_config(_settings))
app.conf.task_default_queue = _settings.io_queue_name
# The modules whose tasks these workers run; each adds itself here.
app.conf.imports = ()
