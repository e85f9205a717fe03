"""What the gateway does, as plain functions the routes call and tests can call directly."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import structlog

from services.api.errors import Conflict, NotFound, ServiceUnavailable
from services.api.queue import Publisher, QueueUnavailable
from services.api.validation import validate_comparison
from shared.metrics import metric_registry
from shared.results import side_by_side
from shared.schemas import (
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
    *, spec: ComparisonCreate, store: ComparisonStore, publisher: Publisher, settings: Settings
) -> ComparisonRead:
    metrics = validate_comparison(spec, settings, metric_registry(store.r, store.prefix))
    comparison_id = uuid.uuid4().hex
    experiment = spec.experiment or settings.default_experiment
    record, candidates = store.create(
        comparison_id=comparison_id, spec=spec, experiment=experiment, metrics=metrics
    )
    try:
        publisher.start_comparison(comparison_id)
    except QueueUnavailable as exc:
        # Nothing was queued: end the record at once so no client waits on a job that never runs.
        store.transition(comparison_id, ComparisonStatus.failed, allowed_from=[ComparisonStatus.queued])
        store.set_fields(comparison_id, error=f"queue unavailable: {exc}")
        raise ServiceUnavailable(
            f"The job queue is unavailable, nothing was queued; retry later ({exc})"
        ) from exc
    log.info(
        "comparison.queued",
        comparison_id=comparison_id,
        candidates=len(spec.candidates),
        rows=len(spec.dataset.rows),
        metrics=metrics,
    )
    return _to_read(record, candidates, settings)


def _load(store: ComparisonStore, comparison_id: str) -> dict[str, Any]:
    try:
        return store.get(comparison_id)
    except ComparisonNotFound:
        raise NotFound(f"No comparison with id {comparison_id!r}") from None


def read_comparison(*, comparison_id: str, store: ComparisonStore, settings: Settings) -> ComparisonRead:
    record = _load(store, comparison_id)
    labels = [c["label"] for c in record["spec"]["candidates"]]
    return _to_read(record, store.candidates(comparison_id, labels), settings)


def _to_read(record: dict[str, Any], stored: list[dict[str, Any]], settings: Settings) -> ComparisonRead:
    spec = record["spec"]
    ui = settings.mlflow_ui_url
    experiment_id = record.get("experiment_id")
    candidates = []
    for cand in stored:
        run_id = cand.get("run_id")
        candidates.append(
            CandidateStatus(
                label=cand["label"],
                model=cand["model"],
                status=CandidateState(cand["status"]),
                progress=Progress(
                    done=cand["done"],
                    total=cand["total"],
                    tokens_per_second=cand["tokens_per_second"],
                    eta_s=cand["eta_s"],
                    cache_hits=cand["cache_hits"],
                ),
                metrics=cand["metrics"],
                aggregates=cand["aggregates"],
                mlflow_run_id=run_id,
                mlflow_run_url=f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"
                if run_id and experiment_id
                else None,
                error=cand.get("error"),
                worker=cand.get("worker"),
                started_at=cand.get("started_at"),
                generation_started_at=cand.get("generation_started_at"),
                finished_at=cand.get("finished_at"),
            )
        )
    parent = record.get("parent_run_id")
    url = None
    if experiment_id:
        url = f"{ui}/#/experiments/{experiment_id}" + (f"/runs/{parent}" if parent else "")
    return ComparisonRead(
        id=record["id"],
        name=spec["name"],
        status=ComparisonStatus(record["status"]),
        experiment=spec["experiment"],
        model_type=spec.get("model_type"),
        metrics=spec["metrics"],
        tags=spec.get("tags") or {},
        rows=record["rows"],
        created_at=record["created_at"],
        started_at=record.get("started_at"),
        finished_at=record.get("finished_at"),
        mlflow=MlflowLinks(experiment_id=experiment_id, parent_run_id=parent, url=url),
        candidates=candidates,
        pairwise=record["pairwise"],
        judge_ranking=record["judge_ranking"],
        error=record.get("error"),
    )


def list_comparisons(
    *, store: ComparisonStore, settings: Settings, status: ComparisonStatus | None, limit: int, offset: int
) -> ComparisonPage:
    ids, total = store.list_ids(status=status, limit=limit, offset=offset)
    items = []
    for comparison_id in ids:
        try:
            record = store.get(comparison_id)
            labels = [c["label"] for c in record["spec"]["candidates"]]
            items.append(_to_read(record, store.candidates(comparison_id, labels), settings))
        except ComparisonNotFound:  # expired between the index read and now
            continue
    return ComparisonPage(items=items, total=total, limit=limit, offset=offset)


def cancel_comparison(
    *, comparison_id: str, store: ComparisonStore, publisher: Publisher, settings: Settings
) -> ComparisonRead:
    record = _load(store, comparison_id)
    cancelled = store.transition(
        comparison_id,
        ComparisonStatus.cancelled,
        allowed_from=[ComparisonStatus.queued, ComparisonStatus.running],
    )
    if not cancelled:
        status = store.status(comparison_id)
        raise Conflict(f"Comparison {comparison_id} has already ended ({status.value}); nothing to cancel")
    labels = [c["label"] for c in record["spec"]["candidates"]]
    # Candidates that have not started are cancelled here; running ones notice between batches.
    for label in labels:
        store.transition_candidate(
            comparison_id, label, CandidateState.cancelled, allowed_from=[CandidateState.queued]
        )
    publisher.revoke(list(store.task_ids(comparison_id).values()))
    log.info("comparison.cancelled", comparison_id=comparison_id)
    return read_comparison(comparison_id=comparison_id, store=store, settings=settings)


def comparison_results(*, comparison_id: str, store: ComparisonStore) -> ComparisonResults:
    record = _load(store, comparison_id)
    labels = [c["label"] for c in record["spec"]["candidates"]]
    table = side_by_side(
        store.rows(comparison_id),
        labels,
        {label: store.outputs(comparison_id, label) for label in labels},
        ratings=store.ratings(comparison_id),
    )
    return ComparisonResults(
        id=comparison_id,
        status=ComparisonStatus(record["status"]),
        candidates=labels,
        rows=[ResultRow.model_validate(row) for row in table],
    )


def results_csv(results: ComparisonResults) -> str:
    """One CSV row per dataset row: input, reference, extra columns, then per candidate its output,
    its scores and people's ratings (thumbs up, thumbs down, comments as "rater: text" lines)."""
    extra_columns: list[str] = []
    for row in results.rows:
        for key in row.model_extra or {}:
            if key not in extra_columns:
                extra_columns.append(key)
    score_names: dict[str, list[str]] = {label: [] for label in results.candidates}
    for row in results.rows:
        for label, out in row.outputs.items():
            for metric in out.scores:
                if metric not in score_names[label]:
                    score_names[label].append(metric)
    header = ["index", "input", "reference", *extra_columns]
    for label in results.candidates:
        header.append(label)
        header += [f"{label}/{metric}" for metric in score_names[label]]
        header += [f"{label}/thumbs_up", f"{label}/thumbs_down", f"{label}/comments"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in results.rows:
        extras = row.model_extra or {}
        line: list[Any] = [
            row.index,
            row.input,
            row.reference or "",
            *(extras.get(c, "") for c in extra_columns),
        ]
        for label in results.candidates:
            out = row.outputs[label]
            line.append(out.output if out.output is not None else "")
            line += [_blank_none(out.scores.get(metric)) for metric in score_names[label]]
            line += [
                out.ratings.up,
                out.ratings.down,
                "\n".join(f"{c.rater or 'anonymous'}: {c.comment}" for c in out.ratings.comments),
            ]
        writer.writerow(line)
    return buffer.getvalue()


def _blank_none(value: Any) -> Any:
    return "" if value is None else value
