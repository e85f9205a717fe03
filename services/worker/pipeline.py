"""What the worker does for a comparison, as plain functions the Celery tasks call.

start_comparison   -> creates the MLflow parent run, fans out one task per candidate
run_candidate      -> loads the model, generates, runs mlflow.evaluate() in a nested run
finalize_comparison-> once every candidate has ended, writes the summary on the parent run

Every step may be delivered more than once (acks_late after a worker died, a retry, the
reconciler queueing a step it found abandoned): each holds a lease while it runs, so two copies
never run side by side, and finds its own earlier work instead of repeating it. A candidate's
writes are fenced by its lease. The steps that give up end the job visibly (fail_comparison,
give_up_candidate, fail_finalize), and the summary step ends the MLflow parent run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import structlog
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from redis.exceptions import RedisError

from services.worker import tracking, webhooks
from services.worker.custom_metrics import CustomMetric
from services.worker.errors import TrackingUnavailable, describe, is_transient
from services.worker.evaluation import evaluate_outputs
from services.worker.generation import (
    Generated,
    GenerationCancelled,
    check_prompt_lengths,
    generate_outputs,
    render_prompt,
    wants_chat_template,
)
from services.worker.judge import (
    Judge,
    JudgeError,
    UnavailableJudge,
    bradley_terry,
    judge_from_settings,
    judge_pairs,
)
from services.worker.locks import CandidateWriter, Lease
from services.worker.models import ModelCache, ModelLoadError
from services.worker.remote_scoring import (
    RemoteGenerationFailed,
    awaits_generation,
    is_endpoint,
    load_generation,
    stored_outputs,
)
from services.worker.response_cache import ResponseCache, cache_keys
from services.worker.stats import paired_compare
from services.worker.step_task import Dispatch, HandOff, candidate_lease, dispatch_step
from services.worker.summary import build_summary, render_html
from shared.metrics import METRICS, MetricInfo
from shared.records import CandidateRecord, ComparisonSpec
from shared.schemas import (
    FINAL_CANDIDATE_STATES,
    CandidateSpec,
    CandidateState,
    ComparisonStatus,
)
from shared.settings import Settings
from shared.store import FINALIZE_STEP, START_STEP, ComparisonStore, LeaseLost, utcnow
from shared.tasks import FINALIZE_COMPARISON, GENERATE_REMOTE, RUN_CANDIDATE

log = structlog.get_logger()

_MAX_PARAM_CHARS = 6000


@dataclass
class WorkerContext:
    settings: Settings
    store: ComparisonStore
    models: ModelCache
    # Sends a task by name with kwargs and a task id chosen by the caller.
    dispatch: Dispatch
    custom_metrics: dict[str, CustomMetric] = field(default_factory=dict)

    def metric_info(self) -> dict[str, MetricInfo]:
        return {**METRICS, **{name: m.info for name, m in self.custom_metrics.items()}}


# ---------------------------------------------------------------------------------------- start
def start_comparison(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    status = store.status(comparison_id)
    if status.is_final:
        log.info("comparison.skip_start", comparison_id=comparison_id, status=status.value)
        if status is ComparisonStatus.cancelled:
            # Cancelled before it started: nothing runs its candidates, so count them as ended
            # here and let the summary step close the comparison.
            labels = store.spec(comparison_id).labels
            _count_final_candidates_as_ended(ctx, comparison_id, labels)
            queue_finalize_when_done(ctx, comparison_id, labels)
        return "skipped"
    lease = Lease(store.r, store.lease_key(comparison_id, START_STEP), ttl_s=ctx.settings.candidate_lease_s)
    if not lease.acquire():
        # Another delivery is starting it; if that one dies, the reconciler queues the start again.
        log.info("comparison.start_busy", comparison_id=comparison_id, holder=lease.holder())
        return "busy"
    with lease.kept_alive():
        return _start_locked(ctx, comparison_id)


def queue_candidate(ctx: WorkerContext, comparison_id: str, label: str) -> str:
    """Publish the candidate's task, then record it. In that order: a published task nobody
    recorded is harmless (a redelivered start publishes it again and the candidate's lease keeps
    the two apart), while a recorded one that was never published would be skipped by every
    redelivery of the start task."""
    # An endpoint candidate is generated on the I/O workers first (services/worker/remote.py),
    # which queue its scoring step themselves; once its rows are stored it goes to scoring.
    name = GENERATE_REMOTE if awaits_generation(ctx.store, comparison_id, label) else RUN_CANDIDATE
    task_id = dispatch_step(ctx, name, comparison_id, label, {"label": label})
    ctx.store.record_task(comparison_id, label, task_id)
    return task_id


def _start_locked(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    # From here on the comparison owes a summary step, whatever happens to its tasks.
    store.mark_open(comparison_id)
    if store.transition(comparison_id, ComparisonStatus.running, allowed_from=[ComparisonStatus.queued]):
        store.set_fields(comparison_id, started_at=utcnow())
    record = store.get(comparison_id)
    spec = record.spec
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    experiment_id = tracking.ensure_experiment(client, spec.experiment)
    parent_run_id = tracking.ensure_parent_run(
        client, experiment_id=experiment_id, comparison_id=comparison_id, name=spec.name, tags=spec.tags
    )
    store.set_fields(comparison_id, experiment_id=experiment_id, parent_run_id=parent_run_id)
    _log_params(
        client,
        parent_run_id,
        {
            "name": spec.name,
            "model_type": spec.model_type,
            "metrics": ",".join(spec.metrics),
            "rows": record.rows,
            "candidates": ",".join(spec.labels),
        },
    )
    client.log_dict(parent_run_id, {"rows": store.rows(comparison_id)}, "dataset.json")
    client.log_dict(parent_run_id, spec.model_dump(mode="json"), "comparison_spec.json")

    already = store.task_ids(comparison_id)
    for label in spec.labels:
        if label in already:  # a redelivered start task: that candidate is already queued
            continue
        queue_candidate(ctx, comparison_id, label)
    log.info(
        "comparison.started",
        comparison_id=comparison_id,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
    )
    emit_event(ctx, comparison_id, "comparison.started")
    return "started"


def emit_event(ctx: WorkerContext, comparison_id: str, event: str, *, label: str | None = None) -> None:
    """Call back the comparison's webhooks subscribed to ``event`` (at most once per event and
    callback, however often a redelivered step gets here). Never raises."""
    webhooks.emit_safely(ctx.store, ctx.settings, ctx.dispatch, comparison_id, event, label=label)


# ------------------------------------------------------------------------------------ candidate
# Set in a worker whose pool runs tasks in its main process (solo, for GPUs) when it is asked to
# shut down; prefork workers stop their children through Celery's soft shutdown instead.
HAND_OFF = threading.Event()


def run_candidate(ctx: WorkerContext, comparison_id: str, label: str) -> str:
    store = ctx.store
    if awaits_generation(store, comparison_id, label) and not store.status(comparison_id).is_final:
        # An endpoint candidate queued here before the I/O workers generated it: they go first.
        queue_candidate(ctx, comparison_id, label)
        return "generating"
    lease = candidate_lease(store, ctx.settings, comparison_id, label)
    if not isinstance(lease, Lease):
        candidate_ended(ctx, comparison_id, label)
        return lease.value
    with lease.kept_alive():
        starts = store.begin_attempt(comparison_id, label)
        try:
            outcome = _run_candidate_locked(ctx, comparison_id, label, lease, deaths=starts - 1)
        finally:
            # Getting here means this process lived to see the start end (an error, a lost lease,
            # a shutdown's SystemExit): it was no death. A process killed outright never gets here.
            with contextlib.suppress(RedisError):
                store.end_attempt(comparison_id, label)
    candidate_ended(ctx, comparison_id, label)
    return outcome


def _run_candidate_locked(
    ctx: WorkerContext, comparison_id: str, label: str, lease: Lease, *, deaths: int
) -> str:
    store = ctx.store
    writer = CandidateWriter(store, comparison_id, label, lease)
    stored = store.candidate(comparison_id, label)
    state = stored.status
    if state in FINAL_CANDIDATE_STATES:
        return state.value
    if store.status(comparison_id) is ComparisonStatus.cancelled:
        writer.transition(
            CandidateState.cancelled, allowed_from=[CandidateState.queued, CandidateState.running]
        )
        # An earlier delivery may have opened the candidate's run before the cancel.
        end_run(ctx, stored.run_id, "KILLED")
        return "cancelled"
    if deaths > ctx.settings.max_worker_deaths:
        message = (
            f"the worker running this candidate died {deaths} times (for example out of memory); "
            "lower GENERATION_BATCH_SIZE or max_new_tokens"
        )
        writer.transition(
            CandidateState.failed,
            allowed_from=[CandidateState.queued, CandidateState.running],
            error=message,
        )
        end_run(ctx, stored.run_id, "FAILED", error=message)
        log.warning("candidate.failed", comparison_id=comparison_id, label=label, error=message)
        return "failed"
    if not writer.transition(
        CandidateState.running, allowed_from=[CandidateState.queued, CandidateState.running]
    ):
        # Cancelled (or failed by the reconciler) between the reads above and now.
        return store.candidate(comparison_id, label).status.value
    record = store.get(comparison_id)
    spec = record.spec
    candidate = spec.candidate(label)
    # Both written by the start step, which queued this candidate after writing them.
    assert record.experiment_id is not None and record.parent_run_id is not None
    rows = store.rows(comparison_id)
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    run_id = tracking.ensure_candidate_run(
        client,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        comparison_id=comparison_id,
        label=label,
    )
    writer.fields(run_id=run_id, worker=f"{socket.gethostname()}:{os.getpid()}")
    log.info(
        "candidate.started", comparison_id=comparison_id, label=label, model=candidate.model, run_id=run_id
    )
    try:
        # MLflow is also reached from inside mlflow.evaluate(): its network errors are transient too.
        with tracking.unavailable_as_transient():
            scored = _generate_and_evaluate(
                ctx,
                comparison_id=comparison_id,
                candidate=candidate,
                rows=rows,
                spec=spec,
                run_id=run_id,
                experiment_id=record.experiment_id,
                writer=writer,
            )
    except GenerationCancelled:
        writer.transition(CandidateState.cancelled, allowed_from=[CandidateState.running])
        client.set_terminated(run_id, status="KILLED")
        log.info("candidate.cancelled", comparison_id=comparison_id, label=label)
        return "cancelled"
    except (LeaseLost, HandOff):
        raise
    except Exception as exc:  # noqa: BLE001
        if is_transient(exc):
            raise  # the task retries with back-off
        # Whatever went wrong with this candidate (missing weights, out of memory, a template
        # the tokenizer rejects) ends it with a readable error; the other candidates go on.
        message = _describe(exc, ctx.settings)
        writer.transition(
            CandidateState.failed,
            allowed_from=[CandidateState.queued, CandidateState.running],
            error=message,
        )
        end_run(ctx, run_id, "FAILED", error=message)
        log.warning("candidate.failed", comparison_id=comparison_id, label=label, error=message)
        return "failed"
    writer.fields(metrics=scored["metrics"], aggregates=scored["aggregates"])
    if not writer.transition(CandidateState.succeeded, allowed_from=[CandidateState.running]):
        # Ended meanwhile from outside (the reconciler cancelled it): that state stands, and the
        # summary step ends the run to match.
        return store.candidate(comparison_id, label).status.value
    client.set_terminated(run_id, status="FINISHED")
    log.info(
        "candidate.finished",
        comparison_id=comparison_id,
        label=label,
        rows=len(rows),
        metrics=scored["metrics"],
    )
    return "succeeded"


def fail_candidate(ctx: WorkerContext, comparison_id: str, label: str, message: str) -> bool:
    """Fail a candidate from outside its lease (nobody runs it): queued or running -> failed."""
    return ctx.store.transition_candidate(
        comparison_id,
        label,
        CandidateState.failed,
        allowed_from=[CandidateState.queued, CandidateState.running],
        error=message,
    )


def give_up_candidate(
    ctx: WorkerContext, comparison_id: str, label: str, message: str, *, holder_is_gone: bool = False
) -> None:
    """End a candidate whose task gave up (its error was permanent, its retries ran out, the hard
    time limit killed it) so that the comparison can finish.

    ``holder_is_gone``: the process that held the lease was killed (the hard time limit), so
    the lease is dropped rather than waited out. Otherwise, a candidate whose lease another
    delivery holds is left to that delivery.
    """
    store = ctx.store
    lease = Lease(store.r, store.lease_key(comparison_id, label), ttl_s=ctx.settings.candidate_lease_s)
    if holder_is_gone:
        store.force_release(lease.key)
    if not lease.acquire():
        log.info("candidate.give_up_skipped", comparison_id=comparison_id, label=label, holder=lease.holder())
        return
    try:
        writer = CandidateWriter(store, comparison_id, label, lease)
        if writer.transition(
            CandidateState.failed,
            allowed_from=[CandidateState.queued, CandidateState.running],
            error=message,
        ):
            log.warning("candidate.failed", comparison_id=comparison_id, label=label, error=message)
            end_run(ctx, store.candidate(comparison_id, label).run_id, "FAILED", error=message)
    finally:
        lease.release()
    candidate_ended(ctx, comparison_id, label)


def end_run(ctx: WorkerContext, run_id: str | None, status: str, *, error: str | None = None) -> None:
    """Mark a candidate's MLflow run ended, as far as the server can be reached: the summary step
    ends any run it finds still RUNNING, so an unreachable server here loses nothing."""
    if not run_id:
        return
    try:
        client = tracking.client(ctx.settings.mlflow_tracking_uri)
        if error:
            client.set_tag(run_id, "llm_compare.error", error[:5000])
        client.set_terminated(run_id, status=status)
    except TrackingUnavailable as exc:
        log.warning("candidate.run_not_ended", run_id=run_id, status=status, error=str(exc))


def _describe(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, ModelLoadError | RemoteGenerationFailed):
        return str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return f"out of memory while generating: {exc}; lower GENERATION_BATCH_SIZE or max_new_tokens"
    return describe(exc, time_limit_s=settings.task_time_limit_s)


def _generate_and_evaluate(
    ctx: WorkerContext,
    *,
    comparison_id: str,
    candidate: CandidateSpec,
    rows: list[dict[str, Any]],
    spec: ComparisonSpec,
    run_id: str,
    experiment_id: str,
    writer: CandidateWriter,
) -> dict[str, Any]:
    if is_endpoint(candidate.model):
        return _score_remote(
            ctx,
            comparison_id=comparison_id,
            candidate=candidate,
            rows=rows,
            spec=spec,
            run_id=run_id,
            experiment_id=experiment_id,
            writer=writer,
        )
    store = ctx.store
    started = time.perf_counter()
    loaded = ctx.models.get(candidate.model, revision=candidate.revision, settings=ctx.settings)
    load_seconds = time.perf_counter() - started
    chat = wants_chat_template(candidate, loaded)
    prompts = [render_prompt(candidate, loaded, row, chat=chat) for row in rows]
    check_prompt_lengths(
        prompts, candidate=candidate, loaded=loaded, max_prompt_tokens=ctx.settings.max_prompt_tokens
    )

    cache = ResponseCache(store, ttl_s=ctx.settings.result_ttl_s)
    keys = cache_keys(candidate=candidate, loaded=loaded, prompts=prompts, chat=chat)
    # A model whose exact weights are unknown (a hub branch without its commit) shares nothing.
    use_cache = spec.cache and loaded.cacheable
    cached = cache.get_many(keys) if use_cache else [None] * len(prompts)
    missing = [i for i, hit in enumerate(cached) if hit is None]
    hits = len(prompts) - len(missing)
    writer.progress(done=hits, total=len(rows))
    if missing:
        writer.fields(generation_started_at=utcnow())
    started = time.perf_counter()

    def on_progress(done: int, tokens: int, fraction: float) -> None:
        # Also inside long batches, so that a cancel or a shutdown lands mid-batch. The write is
        # refused (LeaseLost) once another delivery has taken the candidate over.
        if HAND_OFF.is_set():
            raise HandOff()
        elapsed = time.perf_counter() - started
        writer.progress(
            done=hits + done,
            total=len(rows),
            tokens_per_second=tokens / elapsed if elapsed > 0 else None,
            eta_s=elapsed * (1 - fraction) / fraction if fraction > 0 else None,
        )
        if store.status(comparison_id) is ComparisonStatus.cancelled:
            raise GenerationCancelled()

    fresh = generate_outputs(
        candidate=candidate,
        loaded=loaded,
        prompts=[prompts[i] for i in missing],
        batch_size=ctx.settings.generation_batch_size,
        kv_cache_budget_bytes=ctx.settings.kv_cache_budget_bytes,
        on_batch=lambda done, tokens: on_progress(done, tokens, done / len(missing)),
        on_step=on_progress,
    )
    generation_seconds = time.perf_counter() - started
    if loaded.cacheable:
        cache.put_many({keys[i]: g for i, g in zip(missing, fresh, strict=True)})
    generated: list[Generated] = [hit for hit in cached]  # type: ignore[misc]
    for i, g in zip(missing, fresh, strict=True):
        generated[i] = g
    writer.fields(cache_hits=hits)
    # Outputs are kept even if scoring fails below, so /results can still show them.
    writer.outputs([{"output": g.output, "scores": {}} for g in generated])

    params = {
        "model": candidate.model,
        "model_source": loaded.source.kind.value,
        "model_resolved": loaded.resolved,
        "revision": candidate.revision,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "seq2seq": loaded.is_seq2seq,
        "prompt_template": candidate.prompt_template,
        "system_prompt": candidate.system_prompt,
        "use_chat_template": candidate.use_chat_template,
        "chat_template_applied": chat,
        "batch_size": ctx.settings.generation_batch_size,
        "kv_cache_budget_mb": ctx.settings.generation_kv_cache_mb,
        "response_cache": "on" if use_cache else "off",
        "model_type": spec.model_type,
        **{f"generation.{k}": v for k, v in candidate.generation.model_dump().items()},
        **loaded.params,
    }
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    _log_params(client, run_id, params)
    total_tokens = sum(g.output_tokens or 0 for g in fresh)
    now_ms = int(time.time() * 1000)
    run_metrics = {
        "cache_hits": hits,
        "cache_misses": len(missing),
        "load_seconds": load_seconds,
        "generation_seconds": generation_seconds,
        "generation_tokens_per_second": total_tokens / generation_seconds if generation_seconds else 0.0,
    }
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in run_metrics.items()])
    return _score(
        ctx,
        comparison_id=comparison_id,
        candidate=candidate,
        rows=rows,
        prompts=prompts,
        generated=generated,
        spec=spec,
        run_id=run_id,
        experiment_id=experiment_id,
        writer=writer,
        client=client,
    )


def _score_remote(
    ctx: WorkerContext,
    *,
    comparison_id: str,
    candidate: CandidateSpec,
    rows: list[dict[str, Any]],
    spec: ComparisonSpec,
    run_id: str,
    experiment_id: str,
    writer: CandidateWriter,
) -> dict[str, Any]:
    """An endpoint candidate: the I/O workers generated and stored its rows; score them here,
    in its MLflow run, like any other candidate's."""
    record = ctx.store.remote_generation(comparison_id, candidate.label)
    if record and record.get("rows"):
        # Kept even if the candidate fails below, so /results can still show them.
        writer.outputs(stored_outputs(record))
    stored = load_generation(record, candidate, spec)
    # cache_hits, rows_failed and totals are on the candidate already: the I/O worker wrote them.
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    _log_params(client, run_id, stored.params)
    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in stored.run_metrics.items()])
    return _score(
        ctx,
        comparison_id=comparison_id,
        candidate=candidate,
        rows=rows,
        prompts=stored.prompts,
        generated=stored.generated,
        spec=spec,
        run_id=run_id,
        experiment_id=experiment_id,
        writer=writer,
        client=client,
    )


def _score(
    ctx: WorkerContext,
    *,
    comparison_id: str,
    candidate: CandidateSpec,
    rows: list[dict[str, Any]],
    prompts: list[str],
    generated: list[Generated],
    spec: ComparisonSpec,
    run_id: str,
    experiment_id: str,
    writer: CandidateWriter,
    client: Any,
) -> dict[str, Any]:
    """mlflow.evaluate() on the generated rows in the candidate's run; the scores kept with them."""
    mlflow.set_tracking_uri(ctx.settings.mlflow_tracking_uri)
    # Judge metrics whose judge stayed unavailable, with why: filled in while scoring.
    judge_unavailable: dict[str, str] = {}
    scored = evaluate_outputs(
        run_id=run_id,
        experiment_id=experiment_id,
        rows=rows,
        prompts=prompts,
        generated=generated,
        metric_names=list(spec.metrics),
        model_type=spec.model_type,
        options={
            "regex": spec.regex,
            "judge_rubric": spec.judge_rubric,
            "judge": _judge_if_needed(ctx, spec.metrics),
            "judge_unavailable": judge_unavailable,
        },
        custom=ctx.custom_metrics,
    )
    if judge_unavailable:
        # Unscored, not failed: null in the candidate's metrics, the reason beside them and on
        # its run, and "not scored: ..." as each row's justification in the eval table.
        scored["metrics"].update(dict.fromkeys(judge_unavailable))
        writer.fields(metrics_unavailable=judge_unavailable)
        client.set_tag(run_id, "llm_compare.metrics_unavailable", json.dumps(judge_unavailable)[:5000])
        log.warning(
            "candidate.judge_unavailable",
            comparison_id=comparison_id,
            label=candidate.label,
            **judge_unavailable,
        )
    if scored["skipped_builtins"]:
        _log_params(client, run_id, {"model_type_metrics_skipped": ",".join(scored["skipped_builtins"])})
    writer.outputs(
        [
            {"output": None, "scores": s, "error": g.error} if g.error else {"output": g.output, "scores": s}
            for g, s in zip(generated, scored["row_scores"], strict=True)
        ],
    )
    return scored


def _judge_if_needed(ctx: WorkerContext, metric_names: Sequence[str]) -> Judge | None:
    registry = ctx.metric_info()
    if not any(registry[name].needs_judge for name in metric_names if name in registry):
        return None
    # The gateway refuses judge metrics without a judge, but this worker's settings may differ;
    # that leaves the metrics unscored rather than failing the candidate.
    try:
        judge = judge_from_settings(ctx.settings)
    except JudgeError as exc:
        return UnavailableJudge(f"the judge is misconfigured on this worker: {exc}")
    return judge or UnavailableJudge(_NO_JUDGE)


_NO_JUDGE = "no LLM judge is configured on this worker (JUDGE_BASE_URL and JUDGE_MODEL, or JUDGE_LOCAL_MODEL)"


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    entries = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items() if v is not None]
    try:
        client.log_batch(run_id, params=entries)
    except MlflowException as exc:
        # A redelivered task re-logs the same params; MLflow refuses only changed values.
        if "Changing param values is not allowed" not in str(exc):
            raise


# ------------------------------------------------------------------------------------- finalize
def candidate_ended(ctx: WorkerContext, comparison_id: str, label: str) -> None:
    """Count a candidate as ended; once every candidate has, queue the summary step, once."""
    store = ctx.store
    store.mark_ended(comparison_id, label)
    emit_event(ctx, comparison_id, "candidate.finished", label=label)
    labels = store.spec(comparison_id).labels
    if store.status(comparison_id) is ComparisonStatus.cancelled:
        # The gateway cancels queued candidates and revokes their tasks, which then never run to
        # say that they ended: without this the summary step (which ends the parent run) never
        # came.
        _count_final_candidates_as_ended(ctx, comparison_id, labels)
    queue_finalize_when_done(ctx, comparison_id, labels)


def _count_final_candidates_as_ended(ctx: WorkerContext, comparison_id: str, labels: list[str]) -> None:
    for candidate in ctx.store.candidates(comparison_id, labels):
        if candidate.is_final:
            ctx.store.mark_ended(comparison_id, candidate.label)


def queue_finalize_when_done(ctx: WorkerContext, comparison_id: str, labels: list[str]) -> bool:
    """Queue the summary step if every candidate has ended and nobody queued it yet."""
    store = ctx.store
    if not set(labels) <= store.ended_labels(comparison_id) or not store.claim_finalize(comparison_id):
        return False
    try:
        dispatch_step(ctx, FINALIZE_COMPARISON, comparison_id, FINALIZE_STEP)
    except Exception:
        # Let a retry of this task queue it (if even this fails, the reconciler does).
        store.release_finalize_claim(comparison_id)
        raise
    return True


def finalize_comparison(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    if store.is_finalized(comparison_id):  # a redelivery, or a second copy the reconciler queued
        return store.status(comparison_id).value
    lease = Lease(
        store.r, store.lease_key(comparison_id, FINALIZE_STEP), ttl_s=ctx.settings.candidate_lease_s
    )
    if not lease.acquire():
        log.info("comparison.finalize_busy", comparison_id=comparison_id, holder=lease.holder())
        return "busy"
    with lease.kept_alive():
        record = store.get(comparison_id)
        _end_candidate_runs(ctx, store.candidates(comparison_id, record.labels))
        return _finalize_locked(ctx, comparison_id)


_RUN_STATUS = {
    CandidateState.succeeded: "FINISHED",
    CandidateState.failed: "FAILED",
    CandidateState.cancelled: "KILLED",
}


def _end_candidate_runs(ctx: WorkerContext, candidates: list[CandidateRecord]) -> None:
    """End candidate runs still RUNNING in MLflow: a candidate failed from outside its process
    (hard time limit, a worker that died too often) may not have reached the server then."""
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    for candidate in candidates:
        status = _RUN_STATUS.get(candidate.status)
        if candidate.run_id and status and client.get_run(candidate.run_id).info.status == "RUNNING":
            client.set_terminated(candidate.run_id, status=status)


def _finalize_locked(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    record = store.get(comparison_id)
    spec = record.spec
    labels = spec.labels
    candidates = store.candidates(comparison_id, labels)
    states = [c.status for c in candidates]
    succeeded = sum(s is CandidateState.succeeded for s in states)
    if succeeded == len(states):
        outcome = ComparisonStatus.succeeded
    elif succeeded:
        outcome = ComparisonStatus.partially_failed
    else:
        outcome = ComparisonStatus.failed
    failed_errors = [f"{c.label}: {c.error}" for c in candidates if c.status is CandidateState.failed]

    rows = store.rows(comparison_id)
    outputs = {label: store.outputs(comparison_id, label) for label in labels}
    pairwise = pairwise_statistics(spec.metrics, candidates, outputs, ctx.metric_info())
    store.set_fields(comparison_id, pairwise=json.dumps(pairwise))
    judge_ranking = None
    if spec.pairwise_judge:
        judge_ranking, unavailable = pairwise_judging(ctx, spec, rows, candidates, outputs)
        store.set_fields(
            comparison_id, judge_ranking=json.dumps(judge_ranking), judge_ranking_unavailable=unavailable
        )
        if unavailable and record.parent_run_id:
            tracking.client(ctx.settings.mlflow_tracking_uri).set_tag(
                record.parent_run_id, "llm_compare.judge_ranking_unavailable", unavailable[:5000]
            )
    summary = build_summary(
        comparison_id=comparison_id,
        spec=spec,
        rows=rows,
        candidates=candidates,
        outputs=outputs,
        registry=ctx.metric_info(),
        pairwise=pairwise,
        judge_ranking=judge_ranking,
    )
    parent_run_id = record.parent_run_id
    if parent_run_id:
        client = tracking.client(ctx.settings.mlflow_tracking_uri)
        client.log_dict(parent_run_id, summary, "comparison_summary.json")
        client.log_text(parent_run_id, render_html(summary), "comparison_summary.html")
        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(f"{c.label}/{name}", float(value), now_ms, 0)
            for c in candidates
            for name, value in c.metrics.items()
            if value is not None
        ]
        if metrics:
            client.log_batch(parent_run_id, metrics=metrics)
        final_status = store.status(comparison_id)
        run_status = (
            "KILLED"
            if final_status is ComparisonStatus.cancelled
            else ("FINISHED" if outcome is not ComparisonStatus.failed else "FAILED")
        )
        client.set_terminated(parent_run_id, status=run_status)
    # A cancelled comparison keeps its status; anything else takes the outcome.
    store.transition(comparison_id, outcome, allowed_from=[ComparisonStatus.running, ComparisonStatus.queued])
    # An error the start step recorded (fail_comparison) says more than the candidates' echoes.
    if failed_errors and outcome is not ComparisonStatus.succeeded and not record.error:
        store.set_fields(comparison_id, error="; ".join(failed_errors)[:2000])
    _emit_finished(ctx, comparison_id, labels)
    store.mark_finalized(comparison_id)
    final = store.status(comparison_id)
    log.info("comparison.finished", comparison_id=comparison_id, status=final.value)
    return final.value


def pairwise_statistics(
    metric_names: Sequence[str],
    candidates: list[CandidateRecord],
    outputs: dict[str, list[dict[str, Any]] | None],
    registry: dict[str, MetricInfo],
) -> list[dict[str, Any]]:
    """Paired comparisons of every two succeeded candidates on every registry metric."""
    done = [c.label for c in candidates if c.status is CandidateState.succeeded and outputs.get(c.label)]
    results = []
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            for metric in metric_names:
                info = registry.get(metric)
                if info is None:
                    continue
                result = paired_compare(
                    metric=metric,
                    a=a,
                    b=b,
                    scores_a=[row["scores"].get(metric) for row in outputs[a] or []],
                    scores_b=[row["scores"].get(metric) for row in outputs[b] or []],
                    greater_is_better=info.greater_is_better,
                    binary=info.binary,
                )
                if result is not None:
                    results.append(result.as_dict())
    return results


def pairwise_judging(
    ctx: WorkerContext,
    spec: ComparisonSpec,
    rows: list[dict[str, Any]],
    candidates: list[CandidateRecord],
    outputs: dict[str, list[dict[str, Any]] | None],
) -> tuple[dict[str, Any] | None, str | None]:
    """The judge's row-by-row preferences between every two succeeded candidates, and a
    Bradley-Terry ranking resting on them; or None and why there is none. A judge that fails
    leaves the ranking out, never the comparison (whose candidates have all ended by now)."""
    done = [c.label for c in candidates if c.status is CandidateState.succeeded and outputs.get(c.label)]
    if len(done) < 2:
        return None, f"pairwise judging needs two succeeded candidates with outputs; {len(done)} did"
    try:
        judge = judge_from_settings(ctx.settings)
    except JudgeError as exc:
        return None, f"the judge is misconfigured on this worker: {exc}"
    if judge is None:
        return None, _NO_JUDGE
    try:
        return _judge_every_pair(judge, rows, done, outputs), None
    except JudgeError as exc:
        log.warning("comparison.judge_ranking_unavailable", judge=judge.name, error=str(exc))
        return None, str(exc)


def _judge_every_pair(
    judge: Judge, rows: list[dict[str, Any]], done: list[str], outputs: dict[str, list[dict[str, Any]] | None]
) -> dict[str, Any]:
    questions = [row["input"] for row in rows]
    references = [None if row.get("reference") is None else str(row["reference"]) for row in rows]
    verdicts: list[tuple[str, str, str]] = []
    per_row: list[dict[str, Any]] = []
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            for verdict in judge_pairs(
                judge,
                a=a,
                b=b,
                questions=questions,
                outputs_a=[o["output"] for o in outputs[a] or []],
                outputs_b=[o["output"] for o in outputs[b] or []],
                references=references,
            ):
                verdicts.append((a, b, verdict.winner))
                per_row.append(
                    {
                        "row": verdict.row,
                        "a": a,
                        "b": b,
                        "winner": verdict.winner,
                        "a_first": verdict.first_order,
                        "b_first": verdict.swapped_order,
                    }
                )
    strengths = bradley_terry(done, verdicts)
    ordered = sorted(done, key=lambda label: -strengths[label])
    ranking = []
    for rank, label in enumerate(ordered, start=1):
        involved = [v for v in verdicts if label in (v[0], v[1])]
        wins = sum(v[2] == label for v in involved)
        ties = sum(v[2] == "tie" for v in involved)
        ranking.append(
            {
                "label": label,
                "rank": rank,
                "strength": strengths[label],
                "wins": wins,
                "ties": ties,
                "losses": len(involved) - wins - ties,
            }
        )
    return {"judge": judge.name, "verdicts": len(verdicts), "ranking": ranking, "rows": per_row}


def fail_comparison(ctx: WorkerContext, comparison_id: str, message: str) -> None:
    """The start step gave up (e.g. MLflow unreachable after retries): fail every candidate it
    did not queue, and let the summary step end the comparison and its parent run, if any.
    Candidates it did queue end by themselves."""
    store = ctx.store
    if store.status(comparison_id) not in (ComparisonStatus.queued, ComparisonStatus.running):
        return
    store.set_fields(comparison_id, error=message)
    store.mark_open(comparison_id)
    labels = store.spec(comparison_id).labels
    queued = store.task_ids(comparison_id)
    for label in labels:
        if label not in queued:
            fail_candidate(ctx, comparison_id, label, f"comparison could not start: {message}")
    _count_final_candidates_as_ended(ctx, comparison_id, labels)
    queue_finalize_when_done(ctx, comparison_id, labels)


def fail_finalize(ctx: WorkerContext, comparison_id: str, message: str) -> None:
    """The summary step gave up: end the comparison as failed (unless it was cancelled) and its
    parent run with it. Raises TrackingUnavailable while MLflow cannot be reached, so that the
    reconciler tries again later."""
    store = ctx.store
    store.transition(
        comparison_id,
        ComparisonStatus.failed,
        allowed_from=[ComparisonStatus.queued, ComparisonStatus.running],
    )
    record = store.get(comparison_id)
    if not record.error:
        store.set_fields(comparison_id, error=message[:2000])
    parent_run_id = record.parent_run_id
    if parent_run_id:
        status = "KILLED" if record.status is ComparisonStatus.cancelled else "FAILED"
        client = tracking.client(ctx.settings.mlflow_tracking_uri)
        try:
            client.set_tag(parent_run_id, "llm_compare.error", message[:5000])
            client.set_terminated(parent_run_id, status=status)
        except TrackingUnavailable:
            raise
        except MlflowException as exc:
            # The run or its experiment was deleted meanwhile: nothing left to end.
            log.warning("comparison.parent_run_not_ended", comparison_id=comparison_id, error=str(exc))
    _emit_finished(ctx, comparison_id, store.spec(comparison_id).labels)
    store.mark_finalized(comparison_id)
    log.warning("comparison.finished", comparison_id=comparison_id, status=store.status(comparison_id).value)


def _emit_finished(ctx: WorkerContext, comparison_id: str, labels: list[str]) -> None:
    """The verdict is in. Before it, candidate.finished for every candidate that had none (one
    cancelled before it started, or failed by the reconciler, never ran to say so); before
    mark_finalized, so that a summary step cut short emits again on its redelivery."""
    for label in labels:
        emit_event(ctx, comparison_id, "candidate.finished", label=label)
    emit_event(ctx, comparison_id, "comparison.finished")
