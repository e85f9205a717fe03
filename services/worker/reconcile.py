"""The reconciler: a periodic sweep that finishes, or queues again, what no task will finish.

Tasks end their own work, and give up visibly when they fail for good (services/worker/tasks.py),
but some endings leave nobody to act: a worker killed outright (its message stays unacknowledged
in Redis until the broker's visibility timeout, hours later), a retry that could not be published
while Redis was down, a revoked task, a start or summary step whose process died. The sweep
finds those by looking at each unfinished comparison's steps (its start, each candidate, its
summary). A step is *live* while

- its lease is held (a process is running it, renewing the lease from a heartbeat thread),
- a task for it was just queued or waits out a retry countdown (an ``expect`` key), or
- a message for it waits in the broker's queue.

A step that should be live but has not been for ``RECONCILE_GRACE_S`` (seen by two sweeps at
least) is abandoned, and the sweep:

- queues the start again for a queued comparison, or a started one some of whose candidates it
  never queued;
- queues an unfinished candidate again (an endpoint candidate goes to the I/O workers until its
  rows are stored, then to scoring; ``MAX_WORKER_DEATHS`` still applies to it), and fails it
  with a readable reason once it has done so ``TASK_MAX_RETRIES`` times; in a cancelled
  comparison it marks the candidate cancelled instead;
- counts a final candidate that was never counted as ended;
- queues the summary step of a comparison whose candidates have all ended, and ends the
  comparison as failed once that was lost ``TASK_MAX_RETRIES`` times.

It runs in a daemon thread of every worker's main process (``start_in_background``, from the
``worker_ready`` signal), so the usual ``celery worker`` command line runs it: no beat process.
A Redis flag lets one worker sweep per ``RECONCILE_INTERVAL_S``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis
import structlog

from services.worker import pipeline
from services.worker.locks import CandidateWriter, Lease
from services.worker.step_task import dispatch_step
from shared.schemas import FINAL_CANDIDATE_STATES, CandidateState, ComparisonStatus
from shared.store import FINALIZE_STEP, START_STEP, ComparisonNotFound
from shared.tasks import FINALIZE_COMPARISON, GENERATE_REMOTE, RUN_CANDIDATE, START_COMPARISON

log = structlog.get_logger()

# kombu's Redis transport keeps one list per queue and priority: the queue's own name for the
# default priority, "<queue>\x06\x16<n>" for the others.
_PRIORITY_SEPARATOR = "\x06\x16"


class BrokerQueue:
    """Which comparison steps have a message waiting in the broker's queues (the model workers'
    and the I/O workers', where endpoint candidates are generated)."""

    def __init__(self, client: redis.Redis, queue_name: str, *more_queues: str):
        self.r: Any = client
        self.keys = [
            key
            for name in (queue_name, *more_queues)
            for key in (name, *(f"{name}{_PRIORITY_SEPARATOR}{p}" for p in range(1, 10)))
        ]

    def waiting(self) -> dict[str, set[str]]:
        """comparison id -> steps with a message in the queue (not yet taken by a worker)."""
        pipe = self.r.pipeline(transaction=False)
        for key in self.keys:
            pipe.lrange(key, 0, -1)
        steps: dict[str, set[str]] = defaultdict(set)
        for messages in pipe.execute():
            for raw in messages:
                found = _step_of(raw)
                if found is not None:
                    steps[found[0]].add(found[1])
        return steps


def _step_of(raw: str | bytes) -> tuple[str, str] | None:
    """(comparison id, step) of a Celery message (protocol 2) as kombu stores it in Redis."""
    try:
        message = json.loads(raw)
        name = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _, kwargs, _ = json.loads(body)
        comparison_id = kwargs["comparison_id"]
    except (ValueError, KeyError, TypeError):
        return None  # not one of ours, or not a Celery message
    if name == START_COMPARISON:
        return comparison_id, START_STEP
    if name in (RUN_CANDIDATE, GENERATE_REMOTE) and "label" in kwargs:
        # An endpoint candidate's generation on the I/O workers is its step as well.
        return comparison_id, kwargs["label"]
    if name == FINALIZE_COMPARISON:
        return comparison_id, FINALIZE_STEP
    return None


def sweep(ctx: pipeline.WorkerContext, queue: BrokerQueue, *, now: float | None = None) -> list[str]:
    """One pass over every unfinished comparison. Returns what it did, one line per action."""
    now = time.time() if now is None else now
    waiting = queue.waiting()
    actions: list[str] = []
    for comparison_id in ctx.store.unfinished_comparisons():
        try:
            actions += reconcile_comparison(ctx, comparison_id, waiting.get(comparison_id, set()), now=now)
        except ComparisonNotFound:
            continue  # expired meanwhile
        except redis.RedisError:
            raise  # the next sweep tries again
        except Exception as exc:  # noqa: BLE001 - one broken comparison must not stop the sweep
            log.exception("reconcile.comparison_failed", comparison_id=comparison_id, error=str(exc))
    for action in actions:
        log.warning("reconcile.acted", action=action)
    return actions


def reconcile_comparison(
    ctx: pipeline.WorkerContext, comparison_id: str, waiting: set[str], *, now: float
) -> list[str]:
    store, settings = ctx.store, ctx.settings
    record = store.get(comparison_id)
    status = record.status
    labels = record.labels
    states = {c.label: c.status for c in store.candidates(comparison_id, labels)}
    steps = [START_STEP, *labels, FINALIZE_STEP]
    in_flight = store.steps_in_flight(comparison_id, steps)
    live = {step for step in steps if in_flight[step] or step in waiting}
    store.clear_suspects(comparison_id, sorted(live))
    actions: list[str] = []

    def abandoned(step: str) -> bool:
        # Looked up again: an action earlier in this pass may have queued it (the last candidate
        # to end queues the summary step).
        if step in live or store.steps_in_flight(comparison_id, [step])[step]:
            return False
        return now - store.suspect_since(comparison_id, step, now) >= settings.reconcile_grace_s

    def act(step: str, what: str) -> None:
        store.clear_suspects(comparison_id, [step])
        actions.append(f"{comparison_id} {step}: {what}")

    def requeue_start() -> None:
        count = store.count_requeue(comparison_id, START_STEP)
        if count > settings.task_max_retries:
            pipeline.fail_comparison(
                ctx, comparison_id, f"the start step was lost {count - 1} times; see the workers' logs"
            )
            act(START_STEP, "failed the comparison")
        else:
            dispatch_step(ctx, START_COMPARISON, comparison_id, START_STEP)
            act(START_STEP, "queued again")

    started = status is not ComparisonStatus.queued and bool(record.parent_run_id)
    if not started:
        if status is ComparisonStatus.cancelled:
            # Cancelled before it started: the start task, when it runs, closes it.
            if abandoned(START_STEP):
                pipeline.start_comparison(ctx, comparison_id)
                act(START_STEP, "closed the cancelled comparison")
        elif abandoned(START_STEP):
            requeue_start()
        return actions

    queued_tasks = store.task_ids(comparison_id)
    ended = store.ended_labels(comparison_id)
    start_needed = False
    for label in labels:
        state = states[label]
        if state in FINAL_CANDIDATE_STATES:
            if label not in ended and abandoned(label):
                store.mark_ended(comparison_id, label)
                act(label, f"counted as ended ({state.value})")
            continue
        if status is ComparisonStatus.cancelled:
            if abandoned(label):
                _cancel_candidate(ctx, comparison_id, label)
                act(label, "cancelled")
            continue
        if label not in queued_tasks:
            start_needed = True  # the start step died before it queued this candidate
            continue
        if abandoned(label):
            count = store.count_requeue(comparison_id, label)
            if count > settings.task_max_retries:
                pipeline.give_up_candidate(
                    ctx,
                    comparison_id,
                    label,
                    f"the candidate's task was lost {count - 1} times (its worker stopped without "
                    "handing it back); see the workers' logs",
                )
                act(label, "failed")
            else:
                pipeline.queue_candidate(ctx, comparison_id, label)
                act(label, "queued again")
    if start_needed and abandoned(START_STEP):
        requeue_start()

    # Every candidate has ended, the summary step has not run and nothing will run it.
    all_ended = set(labels) <= store.ended_labels(comparison_id)
    if all_ended and not store.is_finalized(comparison_id) and abandoned(FINALIZE_STEP):
        count = store.count_requeue(comparison_id, FINALIZE_STEP)
        if count > settings.task_max_retries:
            pipeline.fail_finalize(
                ctx, comparison_id, f"the summary step was lost {count - 1} times; see the workers' logs"
            )
            act(FINALIZE_STEP, "ended the comparison as failed")
        else:
            store.claim_finalize(comparison_id)
            dispatch_step(ctx, FINALIZE_COMPARISON, comparison_id, FINALIZE_STEP)
            act(FINALIZE_STEP, "queued again")
    return actions


def _cancel_candidate(ctx: pipeline.WorkerContext, comparison_id: str, label: str) -> None:
    """A candidate of a cancelled comparison that nothing runs any more (its task was revoked or
    lost): cancel it, end its run, and count it as ended."""
    store = ctx.store
    lease = Lease(store.r, store.lease_key(comparison_id, label), ttl_s=ctx.settings.candidate_lease_s)
    if not lease.acquire():
        return
    try:
        writer = CandidateWriter(store, comparison_id, label, lease)
        if writer.transition(
            CandidateState.cancelled, allowed_from=[CandidateState.queued, CandidateState.running]
        ):
            pipeline.end_run(ctx, store.candidate(comparison_id, label).run_id, "KILLED")
    finally:
        lease.release()
    pipeline.candidate_ended(ctx, comparison_id, label)


def start_in_background(make_context: Callable[[], pipeline.WorkerContext]) -> threading.Event:
    """Sweep every RECONCILE_INTERVAL_S from a daemon thread until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        ctx = make_context()
        queue = BrokerQueue(ctx.store.r, ctx.settings.queue_name, ctx.settings.io_queue_name)
        interval = ctx.settings.reconcile_interval_s
        while not stop.wait(interval):
            try:
                # Slightly shorter than the period, so that some worker's turn comes every period.
                if ctx.store.take_sweep_turn(every_s=interval * 0.8):
                    sweep(ctx, queue)
            except Exception as exc:  # noqa: BLE001 - Redis away: try again next period
                with contextlib.suppress(Exception):
                    log.warning("reconcile.sweep_failed", error=f"{type(exc).__name__}: {exc}")

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
