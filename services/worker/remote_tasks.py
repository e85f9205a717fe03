"""The I/O workers' task for endpoint candidates: a thin adapter over services.worker.remote.

Registered on the I/O app (services/worker/io_app.py): nothing here may import torch,
transformers or mlflow. Transient failures (Redis, the broker) are retried with capped back-off
and jitter; a generation that gives up for good hands the candidate to its scoring step with
the reason, which fails it visibly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from services.worker import remote
from services.worker.errors import describe
from services.worker.io_app import app, dispatch, io_store
from services.worker.step_task import StepTask
from shared.settings import get_settings
from shared.tasks import GENERATE_REMOTE


@lru_cache(maxsize=1)
def context() -> remote.RemoteContext:
    """One context per I/O worker process, built on first use; its Redis pool is thread-safe."""
    return remote.RemoteContext(settings=get_settings(), store=io_store(), dispatch=dispatch)


class GenerateRemote(StepTask):
    name = GENERATE_REMOTE
    give_up_fallback = "the reconciler queues the candidate again once Redis answers"

    def step_context(self) -> remote.RemoteContext:
        return context()

    def step(self, kwargs: dict[str, Any]) -> str | None:
        return kwargs["label"]

    def run(self, comparison_id: str, label: str) -> str:
        return self.run_candidate_step(
            lambda: remote.generate_remote(context(), comparison_id, label),
            comparison_id=comparison_id,
            label=label,
        )

    def give_up(self, ctx: remote.RemoteContext, exc: BaseException, kwargs: dict[str, Any]) -> None:
        comparison_id, label = str(kwargs.get("comparison_id")), str(kwargs.get("label"))
        remote.give_up(ctx, comparison_id, label, f"generation failed: {describe(exc)}")


generate_remote = app.register_task(GenerateRemote())
