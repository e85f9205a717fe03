"""Publishing to the Celery queue by task name; the gateway never imports worker code."""

from __future__ import annotations

import contextlib

from celery import Celery
from kombu.exceptions import OperationalError

from shared.celery_config import celery_config
from shared.settings import Settings
from shared.tasks import LOG_FEEDBACK, START_COMPARISON

# Fail fast when the broker is down: the client gets a 503 instead of a request that hangs.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class QueueUnavailable(RuntimeError):
    pass


class Publisher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = Celery("llm-compare-api")
        self.app.conf.update(celery_config(settings))

    def start_comparison(self, comparison_id: str) -> str:
        return self._send(START_COMPARISON, comparison_id)

    def log_feedback(self, comparison_id: str) -> str:
        """Queue logging the comparison's votes and ratings to its MLflow parent run."""
        return self._send(LOG_FEEDBACK, comparison_id)

    def _send(self, task_name: str, comparison_id: str) -> str:
        try:
            result = self.app.send_task(
                task_name,
                kwargs={"comparison_id": comparison_id},
                queue=self.settings.queue_name,
                retry=True,
                retry_policy=_PUBLISH_RETRY,
            )
        except (OperationalError, ConnectionError, OSError) as exc:
            raise QueueUnavailable(str(exc)) from exc
        return result.id

    def revoke(self, task_ids: list[str]) -> None:
        if not task_ids:
            return
        # Revoking is an optimisation: workers also check the cancelled status themselves.
        with contextlib.suppress(OperationalError, ConnectionError, OSError):
            self.app.control.revoke(task_ids)

    def close(self) -> None:
        self.app.close()
