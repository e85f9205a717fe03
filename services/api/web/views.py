"""What each page shows, built from the same service functions the API routes call."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from services.api import service
from services.api.auth import Principal
from services.api.errors import NotFound
from services.api.validation import resolve_metrics
from services.api.web.charts import MetricChart, metric_chart
from services.api.web.forms import FormState, state_from_spec
from shared.apikeys import Role
from shared.catalog import CATALOG
from shared.endpoints import EndpointConfig
from shared.metrics import DEFAULT_METRICS, MetricInfo, metric_registry
from shared.results import has_reference
from shared.schemas import CandidateState, ComparisonCreate, ComparisonRead, ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonNotFound, ComparisonStore

# The bundled demo comparison opens the form, so a first visit can run something that works.
EXAMPLE_SPEC = Path(__file__).resolve().parents[3] / "demo" / "comparison.json"

ACTIVE = (ComparisonStatus.queued, ComparisonStatus.running)


def registry(store: ComparisonStore) -> dict[str, MetricInfo]:
    return metric_registry(store)


def example_state() -> FormState:
    try:
        spec = json.loads(EXAMPLE_SPEC.read_text())
        if spec.get("metrics") is None:
            # Show the metrics the API would pick, so what is checked is what will run.
            spec["metrics"] = resolve_metrics(ComparisonCreate.model_validate(spec))
    except (OSError, ValueError):
        spec = {"candidates": [{"label": "a"}, {"label": "b"}], "metrics": DEFAULT_METRICS}
    return state_from_spec(spec)


def rerun_state(store: ComparisonStore, comparison_id: str, principal: Principal) -> FormState:
    """The form filled with an earlier comparison's spec and rows, to run again with changes
    (the example when that comparison is not the caller's to see)."""
    try:
        service.load_owned(store, comparison_id, principal)
        spec = store.spec(comparison_id)
        rows = store.rows(comparison_id)
    except (ComparisonNotFound, NotFound):
        return example_state()
    state = state_from_spec(spec.model_dump(mode="json"), rows)
    state.values["name"] = f"{spec.name} (again)"
    return state


def metric_groups(reg: dict[str, MetricInfo]) -> list[tuple[str, list[MetricInfo]]]:
    groups: dict[str, list[MetricInfo]] = {}
    for info in reg.values():
        groups.setdefault(info.group, []).append(info)
    return list(groups.items())


def models_for_picker(endpoints: Mapping[str, EndpointConfig]) -> list[dict[str, str]]:
    """The catalog, then one ``endpoint:<name>/`` stem per configured endpoint: the browser
    completes the stem and the user types the model id the endpoint serves."""
    catalog = [{"name": e.name, "description": e.description} for e in CATALOG.values()]
    remote = [
        {
            "name": f"endpoint:{e.name}/",
            "description": f"{e.name}: remote {e.api} endpoint; type the model id after /",
        }
        for e in endpoints.values()
    ]
    return catalog + remote


def charts(comparison: ComparisonRead, reg: dict[str, MetricInfo]) -> list[MetricChart]:
    candidates = [c.model_dump() for c in comparison.candidates]
    out: list[MetricChart] = []
    for name in comparison.metrics + [
        m for c in comparison.candidates for m in c.aggregates if m not in comparison.metrics
    ]:
        chart = metric_chart(name, reg.get(name), candidates)
        if chart is not None and all(c.name != name for c in out):
            out.append(chart)
    return out


def verdicts(comparison: ComparisonRead) -> tuple[list[Any], list[Any]]:
    decided = [p for p in comparison.pairwise if p.better]
    undecided = [p for p in comparison.pairwise if not p.better]
    return decided, undecided


def arena_ready(comparison: ComparisonRead) -> bool:
    succeeded = [c for c in comparison.candidates if c.status is CandidateState.succeeded]
    return comparison.status in (ComparisonStatus.succeeded, ComparisonStatus.partially_failed) and (
        len(succeeded) >= 2
    )


def grid_context(
    *,
    comparison_id: str,
    store: ComparisonStore,
    comparison: ComparisonRead,
    reg: dict[str, MetricInfo],
    principal: Principal,
) -> dict[str, Any] | None:
    """The side-by-side table and what its controls need, or None before any output exists."""
    # The page has read the comparison (and checked who may see it): read the ratings once.
    stored_ratings = store.ratings(comparison_id)
    labels = [c.label for c in comparison.candidates]
    results = service.results_of(store, comparison_id, comparison.status, labels, stored_ratings)
    if not any(out.output is not None for row in results.rows for out in row.outputs.values()):
        return None
    scored = list(
        dict.fromkeys(name for row in results.rows for out in row.outputs.values() for name in out.scores)
    )
    metric_info = {
        name: {
            "greater_is_better": reg[name].greater_is_better if name in reg else True,
            "description": reg[name].description if name in reg else "",
            "scale": getattr(reg.get(name), "scale", None),
        }
        for name in scored
    }
    extra_columns = list(dict.fromkeys(k for row in results.rows for k in (row.model_extra or {})))
    first_reference_metric = next(
        (m for m in comparison.metrics if m in scored and reg.get(m) and reg[m].needs_reference),
        scored[0] if scored else None,
    )
    ratings = {
        f"{row.index}:{label}": out.ratings.model_dump()
        for row in results.rows
        for label, out in row.outputs.items()
        if out.ratings.up or out.ratings.down or out.ratings.comments
    }
    # People rate outputs of candidates that succeeded, once the comparison has ended.
    succeeded = [
        c.label
        for c in comparison.candidates
        if c.status is CandidateState.succeeded
        and comparison.status in (ComparisonStatus.succeeded, ComparisonStatus.partially_failed)
        and principal.role.allows(Role.submitter)
    ]
    return {
        "results": results,
        "ratings": ratings,
        # What the page's script needs beyond the cells it reads from the table itself.
        "data": {
            "comparison": comparison_id,
            "labels": results.candidates,
            "metrics": metric_info,
            "ratings": stored_ratings,
            "succeeded": succeeded,
        },
        "labels": results.candidates,
        "metrics": scored,
        "metric_info": metric_info,
        "extra_columns": extra_columns,
        "default_metric": first_reference_metric,
        "has_reference": any(has_reference(row.model_dump()) for row in results.rows),
        "succeeded": succeeded,
    }


def when(value: datetime | str | None) -> str:
    """A timestamp as a person reads it (UTC; the page's script shows it in local time)."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def page_settings(settings: Settings) -> dict[str, Any]:
    return {
        "mlflow_url": settings.mlflow_ui_url,
        "judge_configured": settings.judge_configured,
        "auth_disabled": settings.auth_disabled,
    }
