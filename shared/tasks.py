"""Celery task names, and the queue each goes to. The gateway publishes by name and never imports
worker code."""

from __future__ import annotations

from shared.settings import Settings

START_COMPARISON = "comparison.start"
RUN_CANDIDATE = "comparison.run_candidate"
FINALIZE_COMPARISON = "comparison.finalize"
LOG_FEEDBACK = "comparison.log_feedback"
# Work that waits on the network, for the I/O workers (services/worker/io_app.py).
GENERATE_REMOTE = "comparison.generate_remote"
DELIVER_WEBHOOK = "webhook.deliver"

IO_TASKS = frozenset({GENERATE_REMOTE, DELIVER_WEBHOOK})


def queue_for(task_name: str, settings: Settings) -> str:
    """The model workers' queue, or the I/O workers' one for tasks that only wait on requests."""
    return settings.io_queue_name if task_name in IO_TASKS else settings.queue_name
