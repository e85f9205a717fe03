"""What the gateway does, as plain functions the routes call and tests can call directly."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import uuid
from typing import Any

import structlog

from services.api import quotas
from services.api.auth import Principal
from services.api.errors import Conflict, FieldProblem, InvalidComparison, NotFound, ServiceUnavailable
from services.api.queue import Publisher, QueueUnavailable
from services.api.validation import validate_comparison
from shared.metrics import metric_registry
from shared.records import CandidateRecord, ComparisonRecord
from shared.results import result_columns, side_by_side
from shared.schemas import (
    AuditRead,
    CandidateState,
    CandidateStatus,
    ComparisonCreate,
    ComparisonPage,
    ComparisonRead,
    ComparisonResults,
    ComparisonStatus,
    MlflowLinks,
    Progress,
    ResultRow,
)
from shared.settings import Settings
from shared.store import ComparisonNotFound, ComparisonStore

log = structlog.get_logger()


def submit_comparison(
    *,
    spec: ComparisonCreate,
    store: ComparisonStore,
    publisher: Publisher,
    settings: Settings,
    principal: Principal,
) -> ComparisonRead:
    registry = metric_registry(store)
    metrics = validate_comparison(spec, settings, registry)
    quotas.check_size(spec, metrics=metrics, registry=registry, settings=settings)
    quotas.check_running(principal, store=store, settings=settings)
    comparison_id = uuid.uuid4().hex
    experiment = spec.experiment or settings.default_experiment
    record, candidates = store.create(
        comparison_id=comparison_id,
        spec=spec,
        experiment=experiment,
        metrics=metrics,
        owner=principal.name,
        key_id=principal.key_id,
    )
    try:
        publisher.start_comparison(comparison_id)
    except QueueUnavailable as exc:
        # Nothing was queued: end the record at once so no client waits on a job that never runs.
        # The broker's own error names hosts and ports: it goes to the log, not to the client.
        log.warning("comparison.queue_unavailable", comparison_id=comparison_id, error=str(exc))
        store.transition(comparison_id, ComparisonStatus.failed, allowed_from=[ComparisonStatus.queued])
        store.set_fields(comparison_id, error="the job queue was unavailable; nothing was queued")
        raise ServiceUnavailable("The job queue is unavailable, nothing was queued; retry later") from exc
    log.info(
        "comparison.queued",
        comparison_id=comparison_id,
        owner=principal.name,
        key_id=principal.key_id,
        candidates=len(spec.candidates),
        rows=len(spec.dataset.rows),
        metrics=metrics,
    )
    store.audit(comparison_id, actor=principal.name, action="submitted", key_id=principal.key_id)
    return _to_read(record, candidates, settings, principal)


def load_owned(store: ComparisonStore, comparison_id: str, principal: Principal) -> ComparisonRecord:
    """The comparison's record when the caller may see it. Someone else's is "not found", not
    "forbidden": a key learns nothing about ids that are not its own."""
    try:
        record = store.get(comparison_id)
    except ComparisonNotFound:
        record = None
    if record is None or not principal.owns(record.owner):
        raise NotFound(f"No comparison with id {comparison_id!r}")
    return record


def read_comparison(
    *, comparison_id: str, store: ComparisonStore, settings: Settings, principal: Principal
) -> ComparisonRead:
    record = load_owned(store, comparison_id, principal)
    return _to_read(record, store.candidates(comparison_id, record.labels), settings, principal)


def _to_read(
    record: ComparisonRecord, stored: list[CandidateRecord], settings: Settings, principal: Principal
) -> ComparisonRead:
    spec = record.spec
    experiment_id = record.experiment_id
    candidates = []
    for cand in stored:
        run_id = cand.run_id
        candidates.append(
            CandidateStatus(
                label=cand.label,
                model=cand.model,
                status=cand.status,
                progress=Progress(
                    done=cand.done,
                    total=cand.total,
                    tokens_per_second=cand.tokens_per_second,
                    eta_s=cand.eta_s,
                    cache_hits=cand.cache_hits,
                ),
                metrics=cand.metrics,
                metrics_unavailable=cand.metrics_unavailable,
                aggregates=cand.aggregates,
                mlflow_run_id=run_id,
                mlflow_run_url=settings.mlflow_link(experiment_id, run_id) if run_id else None,
                error=cand.error,
                rows_failed=cand.rows_failed,
                totals=cand.totals,
                # Host names and process ids are the operators' business.
                worker=cand.worker if principal.is_admin else None,
                started_at=cand.started_at,
                generation_started_at=cand.generation_started_at,
                finished_at=cand.finished_at,
            )
        )
    url = settings.mlflow_link(experiment_id, record.parent_run_id)
    return ComparisonRead(
        id=record.id,
        name=spec.name,
        status=record.status,
        experiment=spec.experiment,
        model_type=spec.model_type,
        metrics=spec.metrics,
        tags=spec.tags,
        rows=record.rows,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        mlflow=MlflowLinks(experiment_id=experiment_id, parent_run_id=record.parent_run_id, url=url),
        candidates=candidates,
        pairwise=record.pairwise,
        judge_ranking=record.judge_ranking,
        judge_ranking_unavailable=record.judge_ranking_unavailable,
        error=record.error,
        owner=record.owner,
    )


def list_comparisons(
    *,
    store: ComparisonStore,
    settings: Settings,
    status: ComparisonStatus | None,
    limit: int,
    offset: int,
    principal: Principal,
) -> ComparisonPage:
    if principal.is_admin:
        ids, total = store.list_ids(status=status, limit=limit, offset=offset)
    else:
        ids, total = store.list_owned_ids(owner=principal.name, status=status, limit=limit, offset=offset)
    items = [_to_read(record, candidates, settings, principal) for record, candidates in store.many(ids)]
    return ComparisonPage(items=items, total=total, limit=limit, offset=offset)


def cancel_comparison(
    *,
    comparison_id: str,
    store: ComparisonStore,
    publisher: Publisher,
    settings: Settings,
    principal: Principal,
) -> ComparisonRead:
    record = load_owned(store, comparison_id, principal)
    cancelled = store.transition(
        comparison_id,
        ComparisonStatus.cancelled,
        allowed_from=[ComparisonStatus.queued, ComparisonStatus.running],
    )
    if not cancelled:
        status = store.status(comparison_id)
        raise Conflict(f"Comparison {comparison_id} has already ended ({status.value}); nothing to cancel")
    # Candidates that have not started are cancelled here; running ones notice between batches.
    for label in record.labels:
        store.transition_candidate(
            comparison_id, label, CandidateState.cancelled, allowed_from=[CandidateState.queued]
        )
    publisher.revoke(list(store.task_ids(comparison_id).values()))
    log.info("comparison.cancelled", comparison_id=comparison_id, by=principal.name, key_id=principal.key_id)
    store.audit(comparison_id, actor=principal.name, action="cancelled", key_id=principal.key_id)
    # Ownership was checked above: read the final state without checking it again.
    ended = store.get(comparison_id)
    return _to_read(ended, store.candidates(comparison_id, record.labels), settings, principal)


def comparison_results(
    *, comparison_id: str, store: ComparisonStore, principal: Principal
) -> ComparisonResults:
    record = load_owned(store, comparison_id, principal)
    return results_of(store, comparison_id, record.status, record.labels, store.ratings(comparison_id))


def results_of(
    store: ComparisonStore,
    comparison_id: str,
    status: ComparisonStatus,
    labels: list[str],
    ratings: list[dict[str, Any]],
) -> ComparisonResults:
    """Every row with each candidate's output, scores and ``ratings`` (``store.ratings``), for a
    comparison whose ownership the caller has checked."""
    table = side_by_side(
        store.rows(comparison_id),
        labels,
        {label: store.outputs(comparison_id, label) for label in labels},
        ratings=ratings,
    )
    return ComparisonResults(
        id=comparison_id,
        status=status,
        candidates=labels,
        rows=[ResultRow.model_validate(row) for row in table],
    )


def results_csv(results: ComparisonResults) -> str:
    """One CSV row per dataset row: input, reference, extra columns, then per candidate its output,
    its scores, ``<label>/error`` when one of its rows has no output because its request failed
    (the same rule as the client's DataFrame) and people's ratings (thumbs up, thumbs down,
    comments as "rater: text" lines)."""
    columns = result_columns(results)
    header = ["index", "input", "reference", *columns.extra]
    for label in results.candidates:
        header += columns.of_candidate(label)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([_csv_safe(name) for name in header])
    for row in results.rows:
        extras = row.model_extra or {}
        line: list[Any] = [
            row.index,
            row.input,
            row.reference or "",
            *(extras.get(c, "") for c in columns.extra),
        ]
        for label in results.candidates:
            out = row.outputs[label]
            line.append(out.output if out.output is not None else "")
            line += [_blank_none(out.scores.get(metric)) for metric in columns.scores[label]]
            line += [out.error or ""] if label in columns.with_errors else []
            line += [
                out.ratings.up,
                out.ratings.down,
                "\n".join(f"{c.rater or 'anonymous'}: {c.comment}" for c in out.ratings.comments),
            ]
        writer.writerow([_csv_safe(cell) for cell in line])
    return buffer.getvalue()


def _blank_none(value: Any) -> Any:
    return "" if value is None else value


# Spreadsheets run a cell that starts with one of these as a formula (=HYPERLINK(...), +cmd|...).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _csv_safe(cell: Any) -> Any:
    """Neutralise CSV injection the OWASP way: text that a spreadsheet would read as a formula
    gets a leading single quote, shown as text. Numbers stay numbers, negative ones and text that
    is just a number ("-3") included: no formula starts that way."""
    if not isinstance(cell, str) or not cell.startswith(_FORMULA_STARTS):
        return cell
    if _PLAIN_NUMBER.fullmatch(cell):
        return cell
    return "'" + cell


def submit_once(
    *,
    spec: ComparisonCreate,
    store: ComparisonStore,
    publisher: Publisher,
    settings: Settings,
    principal: Principal,
    idempotency_key: str | None,
) -> tuple[ComparisonRead, bool]:
    """Submit, unless this key already submitted the same body with the same Idempotency-Key in
    the last 24 h: then return that comparison. Returns (comparison, True when it is the earlier one)."""
    if idempotency_key is None:
        return submit_comparison(
            spec=spec, store=store, publisher=publisher, settings=settings, principal=principal
        ), False
    body_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    state, earlier = store.claim_idempotency_key(principal.key_id, idempotency_key, body_hash)
    if state == "conflict":
        raise InvalidComparison(
            [
                FieldProblem(
                    "Idempotency-Key",
                    "this key was used with a different request body in the last 24 h; send a new key "
                    "for a new comparison",
                )
            ]
        )
    if state == "pending":
        raise Conflict(
            "A request with this Idempotency-Key is still being submitted; retry in a moment",
            headers={"Retry-After": "1"},
        )
    if state == "done":
        earlier_read = read_comparison(
            comparison_id=earlier, store=store, settings=settings, principal=principal
        )
        return earlier_read, True
    try:
        created = submit_comparison(
            spec=spec, store=store, publisher=publisher, settings=settings, principal=principal
        )
    except Exception:
        # Refused or not queued: the same key may be sent again with a corrected body.
        store.drop_idempotency_key(principal.key_id, idempotency_key)
        raise
    store.finish_idempotency_key(principal.key_id, idempotency_key, body_hash, created.id)
    return created, False


def audit_log(*, comparison_id: str, store: ComparisonStore, principal: Principal) -> AuditRead:
    load_owned(store, comparison_id, principal)
    return AuditRead(events=store.audit_log(comparison_id))
