"""What the worker does for a comparison, as plain functions the Celery tasks call.

start_comparison   -> creates the MLflow parent run, fans out one task per candidate
run_candidate      -> loads the model, generates, runs mlflow.evaluate() in a nested run
finalize_comparison-> once every candidate has ended, writes the summary on the parent run
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import structlog
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from services.worker import tracking
from services.worker.custom_metrics import CustomMetric
from services.worker.errors import is_transient
from services.worker.evaluation import evaluate_outputs
from services.worker.generation import (
    Generated,
    GenerationCancelled,
    generate_outputs,
    render_prompt,
    wants_chat_template,
)
from services.worker.judge import Judge, bradley_terry, judge_from_settings, judge_pairs
from services.worker.locks import Lease
from services.worker.models import ModelCache, ModelLoadError
from services.worker.response_cache import ResponseCache, cache_keys
from services.worker.stats import paired_compare
from services.worker.summary import build_summary, render_html
from shared.metrics import METRICS, MetricInfo
from shared.schemas import (
    FINAL_CANDIDATE_STATES,
    CandidateSpec,
    CandidateState,
    ComparisonStatus,
)
from shared.settings import Settings
from shared.store import ComparisonStore, utcnow
from shared.tasks import FINALIZE_COMPARISON, RUN_CANDIDATE

log = structlog.get_logger()

Dispatch = Callable[[str, dict[str, Any], str], None]
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
        return "skipped"
    if store.transition(comparison_id, ComparisonStatus.running, allowed_from=[ComparisonStatus.queued]):
        store.set_fields(comparison_id, started_at=utcnow())
    record = store.get(comparison_id)
    spec = record["spec"]
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    experiment_id = tracking.ensure_experiment(client, spec["experiment"])
    parent_run_id = tracking.ensure_parent_run(
        client, experiment_id=experiment_id, comparison_id=comparison_id, name=spec["name"], tags=spec["tags"]
    )
    store.set_fields(comparison_id, experiment_id=experiment_id, parent_run_id=parent_run_id)
    _log_params(
        client,
        parent_run_id,
        {
            "name": spec["name"],
            "model_type": spec.get("model_type"),
            "metrics": ",".join(spec["metrics"]),
            "rows": record["rows"],
            "candidates": ",".join(c["label"] for c in spec["candidates"]),
        },
    )
    client.log_dict(parent_run_id, {"rows": store.rows(comparison_id)}, "dataset.json")
    client.log_dict(parent_run_id, spec, "comparison_spec.json")

    already = store.task_ids(comparison_id)
    for candidate in spec["candidates"]:
        label = candidate["label"]
        if label in already:  # a redelivered start task: that candidate is already queued
            continue
        task_id = uuid.uuid4().hex
        store.record_task(comparison_id, label, task_id)
        ctx.dispatch(RUN_CANDIDATE, {"comparison_id": comparison_id, "label": label}, task_id)
    log.info(
        "comparison.started",
        comparison_id=comparison_id,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
    )
    return "started"


# ------------------------------------------------------------------------------------ candidate
class CandidateBusy(Exception):
    """Another delivery of this candidate holds its lease and is alive: try again later."""


def run_candidate(ctx: WorkerContext, comparison_id: str, label: str) -> str:
    store = ctx.store
    lease = Lease(
        store.r, f"{store.prefix}:lease:{comparison_id}:{label}", ttl_s=ctx.settings.candidate_lease_s
    )
    if not lease.acquire():
        state = CandidateState(store.candidate(comparison_id, label)["status"])
        if state in FINAL_CANDIDATE_STATES:
            candidate_ended(ctx, comparison_id, label)
            return state.value
        raise CandidateBusy(f"candidate {label} is held by {lease.holder()}")
    try:
        outcome = _run_candidate_locked(ctx, comparison_id, label, lease)
    finally:
        lease.release()
    candidate_ended(ctx, comparison_id, label)
    return outcome


def _run_candidate_locked(ctx: WorkerContext, comparison_id: str, label: str, lease: Lease) -> str:
    store = ctx.store
    state = CandidateState(store.candidate(comparison_id, label)["status"])
    if state in FINAL_CANDIDATE_STATES:
        return state.value
    if store.status(comparison_id) is ComparisonStatus.cancelled:
        store.transition_candidate(
            comparison_id,
            label,
            CandidateState.cancelled,
            allowed_from=[CandidateState.queued, CandidateState.running],
        )
        return "cancelled"
    store.transition_candidate(
        comparison_id,
        label,
        CandidateState.running,
        allowed_from=[CandidateState.queued, CandidateState.running],
    )
    record = store.get(comparison_id)
    spec = record["spec"]
    candidate = CandidateSpec.model_validate(next(c for c in spec["candidates"] if c["label"] == label))
    rows = store.rows(comparison_id)
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    run_id = tracking.ensure_candidate_run(
        client,
        experiment_id=record["experiment_id"],
        parent_run_id=record["parent_run_id"],
        comparison_id=comparison_id,
        label=label,
    )
    store.set_candidate_fields(
        comparison_id, label, run_id=run_id, worker=f"{socket.gethostname()}:{os.getpid()}"
    )
    log.info(
        "candidate.started", comparison_id=comparison_id, label=label, model=candidate.model, run_id=run_id
    )
    try:
        scored = _generate_and_evaluate(
            ctx,
            comparison_id=comparison_id,
            candidate=candidate,
            rows=rows,
            spec=spec,
            run_id=run_id,
            experiment_id=record["experiment_id"],
            lease=lease,
        )
    except GenerationCancelled:
        store.transition_candidate(
            comparison_id, label, CandidateState.cancelled, allowed_from=[CandidateState.running]
        )
        client.set_terminated(run_id, status="KILLED")
        log.info("candidate.cancelled", comparison_id=comparison_id, label=label)
        return "cancelled"
    except Exception as exc:  # noqa: BLE001
        if is_transient(exc):
            raise  # the task retries with back-off
        # Whatever went wrong with this candidate (missing weights, out of memory, a template
        # the tokenizer rejects) ends it with a readable error; the other candidates go on.
        message = _describe(exc)
        fail_candidate(ctx, comparison_id, label, message)
        client.set_tag(run_id, "llm_compare.error", message[:5000])
        client.set_terminated(run_id, status="FAILED")
        log.warning("candidate.failed", comparison_id=comparison_id, label=label, error=message)
        return "failed"
    store.set_candidate_fields(
        comparison_id, label, metrics=scored["metrics"], aggregates=scored["aggregates"]
    )
    store.transition_candidate(
        comparison_id, label, CandidateState.succeeded, allowed_from=[CandidateState.running]
    )
    client.set_terminated(run_id, status="FINISHED")
    log.info(
        "candidate.finished",
        comparison_id=comparison_id,
        label=label,
        rows=len(rows),
        metrics=scored["metrics"],
    )
    return "succeeded"


def fail_candidate(ctx: WorkerContext, comparison_id: str, label: str, message: str) -> None:
    ctx.store.transition_candidate(
        comparison_id,
        label,
        CandidateState.failed,
        allowed_from=[CandidateState.queued, CandidateState.running],
        error=message,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ModelLoadError):
        return str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return f"out of memory while generating: {exc}; lower GENERATION_BATCH_SIZE or max_new_tokens"
    return f"{name}: {exc}"


def _generate_and_evaluate(
    ctx: WorkerContext,
    *,
    comparison_id: str,
    candidate: CandidateSpec,
    rows: list[dict[str, Any]],
    spec: dict[str, Any],
    run_id: str,
    experiment_id: str,
    lease: Lease,
) -> dict[str, Any]:
    store = ctx.store
    label = candidate.label
    started = time.perf_counter()
    loaded = ctx.models.get(candidate.model, revision=candidate.revision, settings=ctx.settings)
    load_seconds = time.perf_counter() - started
    chat = wants_chat_template(candidate, loaded)
    prompts = [render_prompt(candidate, loaded, row, chat=chat) for row in rows]

    cache = ResponseCache(store.r, prefix=store.prefix, ttl_s=ctx.settings.result_ttl_s)
    keys = cache_keys(candidate=candidate, loaded=loaded, prompts=prompts, chat=chat)
    use_cache = spec.get("cache", True)
    cached = cache.get_many(keys) if use_cache else [None] * len(prompts)
    missing = [i for i, hit in enumerate(cached) if hit is None]
    hits = len(prompts) - len(missing)
    store.set_progress(comparison_id, label, done=hits, total=len(rows))
    if missing:
        store.set_candidate_fields(comparison_id, label, generation_started_at=utcnow())
    started = time.perf_counter()

    def on_progress(done: int, tokens: int, fraction: float) -> None:
        # Also inside long batches: the lease must outlive no batch, and a cancel lands mid-batch.
        lease.renew()
        elapsed = time.perf_counter() - started
        store.set_progress(
            comparison_id,
            label,
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
    cache.put_many({keys[i]: g for i, g in zip(missing, fresh, strict=True)})
    generated: list[Generated] = [hit for hit in cached]  # type: ignore[misc]
    for i, g in zip(missing, fresh, strict=True):
        generated[i] = g
    store.set_candidate_fields(comparison_id, label, cache_hits=hits)
    lease.renew()
    # Outputs are kept even if scoring fails below, so /results can still show them.
    store.save_outputs(comparison_id, label, [{"output": g.output, "scores": {}} for g in generated])

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
        "model_type": spec.get("model_type"),
        **{f"generation.{k}": v for k, v in candidate.generation.model_dump().items()},
        **loaded.params,
    }
    client = tracking.client(ctx.settings.mlflow_tracking_uri)
    _log_params(client, run_id, params)
    total_tokens = sum(g.output_tokens for g in fresh)
    now_ms = int(time.time() * 1000)
    run_metrics = {
        "cache_hits": hits,
        "cache_misses": len(missing),
        "load_seconds": load_seconds,
        "generation_seconds": generation_seconds,
        "generation_tokens_per_second": total_tokens / generation_seconds if generation_seconds else 0.0,
    }
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in run_metrics.items()])

    mlflow.set_tracking_uri(ctx.settings.mlflow_tracking_uri)
    scored = evaluate_outputs(
        run_id=run_id,
        experiment_id=experiment_id,
        rows=rows,
        prompts=prompts,
        generated=generated,
        metric_names=spec["metrics"],
        model_type=spec.get("model_type"),
        options={
            "regex": spec.get("regex"),
            "judge_rubric": spec.get("judge_rubric"),
            "judge": _judge_if_needed(ctx, spec["metrics"]),
        },
        custom=ctx.custom_metrics,
    )
    if scored["skipped_builtins"]:
        _log_params(client, run_id, {"model_type_metrics_skipped": ",".join(scored["skipped_builtins"])})
    store.save_outputs(
        comparison_id,
        label,
        [{"output": g.output, "scores": s} for g, s in zip(generated, scored["row_scores"], strict=True)],
    )
    return scored


def _judge_if_needed(ctx: WorkerContext, metric_names: list[str]) -> Judge | None:
    registry = ctx.metric_info()
    if any(registry[name].needs_judge for name in metric_names if name in registry):
        return judge_from_settings(ctx.settings)
    return None


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
    """Count a candidate as ended; the last one to end queues the summary step, exactly once."""
    spec = ctx.store.spec(comparison_id)
    newly, count = ctx.store.mark_ended(comparison_id, label)
    if newly and count >= len(spec["candidates"]):
        ctx.dispatch(FINALIZE_COMPARISON, {"comparison_id": comparison_id}, uuid.uuid4().hex)


def finalize_comparison(ctx: WorkerContext, comparison_id: str) -> str:
    store = ctx.store
    record = store.get(comparison_id)
    spec = record["spec"]
    labels = [c["label"] for c in spec["candidates"]]
    candidates = store.candidates(comparison_id, labels)
    states = [CandidateState(c["status"]) for c in candidates]
    succeeded = sum(s is CandidateState.succeeded for s in states)
    if succeeded == len(states):
        outcome = ComparisonStatus.succeeded
    elif succeeded:
        outcome = ComparisonStatus.partially_failed
    else:
        outcome = ComparisonStatus.failed
    failed_errors = [
        f"{c['label']}: {c.get('error')}" for c in candidates if c["status"] == CandidateState.failed.value
    ]

    rows = store.rows(comparison_id)
    outputs = {label: store.outputs(comparison_id, label) for label in labels}
    pairwise = pairwise_statistics(spec["metrics"], candidates, outputs, ctx.metric_info())
    store.set_fields(comparison_id, pairwise=json.dumps(pairwise))
    judge_ranking = None
    if spec.get("pairwise_judge"):
        judge_ranking = pairwise_judging(ctx, spec, rows, candidates, outputs)
        store.set_fields(comparison_id, judge_ranking=json.dumps(judge_ranking))
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
    parent_run_id = record.get("parent_run_id")
    if parent_run_id:
        client = tracking.client(ctx.settings.mlflow_tracking_uri)
        client.log_dict(parent_run_id, summary, "comparison_summary.json")
        client.log_text(parent_run_id, render_html(summary), "comparison_summary.html")
        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(f"{c['label']}/{name}", float(value), now_ms, 0)
            for c in candidates
            for name, value in (c.get("metrics") or {}).items()
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
    if failed_errors and outcome is not ComparisonStatus.succeeded:
        store.set_fields(comparison_id, error="; ".join(failed_errors)[:2000])
    final = store.status(comparison_id)
    log.info("comparison.finished", comparison_id=comparison_id, status=final.value)
    return final.value


def pairwise_statistics(
    metric_names: list[str],
    candidates: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]] | None],
    registry: dict[str, MetricInfo],
) -> list[dict[str, Any]]:
    """Paired comparisons of every two succeeded candidates on every registry metric."""
    done = [
        c["label"]
        for c in candidates
        if c["status"] == CandidateState.succeeded.value and outputs.get(c["label"])
    ]
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
    spec: dict[str, Any],
    rows: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]] | None],
) -> dict[str, Any] | None:
    """The judge's row-by-row preferences between every two succeeded candidates, and a
    Bradley-Terry ranking resting on them."""
    judge = judge_from_settings(ctx.settings)
    done = [
        c["label"]
        for c in candidates
        if c["status"] == CandidateState.succeeded.value and outputs.get(c["label"])
    ]
    if judge is None or len(done) < 2:
        return None
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
    """The start step could not run (e.g. MLflow unreachable after retries): end it visibly."""
    store = ctx.store
    if store.transition(
        comparison_id,
        ComparisonStatus.failed,
        allowed_from=[ComparisonStatus.queued, ComparisonStatus.running],
    ):
        store.set_fields(comparison_id, error=message)
        for candidate in store.spec(comparison_id)["candidates"]:
            fail_candidate(ctx, comparison_id, candidate["label"], f"comparison could not start: {message}")
