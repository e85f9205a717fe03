"""The web pages under /ui: thin handlers that build a page context and render a template."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.api import service
from services.api.deps import PublisherDep, SettingsDep, StoreDep
from services.api.errors import ApiError, FieldProblem, InvalidComparison, problems_from_errors
from services.api.web import views
from services.api.web.charts import fmt
from services.api.web.forms import (
    FormState,
    add_candidate,
    attach_problems,
    control_id,
    remove_candidate,
    rows_as_jsonl,
    spec_from_state,
    state_from_form,
)
from shared.schemas import ComparisonCreate, ComparisonStatus

WEB = Path(__file__).resolve().parent
STATIC = WEB / "static"

templates = Jinja2Templates(directory=str(WEB / "templates"))
templates.env.filters.update(fmt=fmt, when=views.when, eta=views.eta)
templates.env.globals.update(control_id=control_id, duration=views.duration)


def _static_version() -> str:
    """A hash of the static files, appended to their URLs so a new release is never served stale."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.rglob("*")):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


templates.env.globals["static_version"] = _static_version()

router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    settings = request.app.state.settings
    return templates.TemplateResponse(
        request, name, {**views.page_settings(settings), **context}, status_code=status_code
    )


def _not_found(request: Request, message: str) -> HTMLResponse:
    return _page(request, "not_found.html", {"message": message, "title": "Not found"}, status_code=404)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def comparisons_page(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    status: ComparisonStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 25,
    offset: Annotated[int, Query(ge=0)] = 0,
    fragment: bool = False,
) -> HTMLResponse:
    page = service.list_comparisons(store=store, settings=settings, status=status, limit=limit, offset=offset)
    context = {
        "title": "Comparisons",
        "page": page,
        "status": status.value if status else None,
        "statuses": [s.value for s in ComparisonStatus],
        "active": any(item.status in views.ACTIVE for item in page.items),
    }
    # The list refreshes itself by fetching just its table while something runs.
    return _page(request, "_comparison_table.html" if fragment else "comparisons.html", context)


def _form_page(request: Request, store: Any, state: FormState, status_code: int = 200) -> HTMLResponse:
    reg = views.registry(store)
    return _page(
        request,
        "new.html",
        {
            "title": "New comparison",
            "state": state,
            "metric_groups": views.metric_groups(reg),
            "models": views.models_for_picker(),
        },
        status_code=status_code,
    )


@router.get("/ui/new")
def new_comparison_page(
    request: Request, store: StoreDep, from_: Annotated[str | None, Query(alias="from")] = None
) -> HTMLResponse:
    state = views.rerun_state(store, from_) if from_ else views.example_state()
    return _form_page(request, store, state)


@router.post("/ui/new")
async def submit_comparison_form(
    request: Request, store: StoreDep, publisher: PublisherDep, settings: SettingsDep
) -> Response:
    form = await request.form()
    state = state_from_form(form)
    action = str(form.get("action") or "submit")
    if action == "add_candidate":
        add_candidate(state)
        return _form_page(request, store, state)
    if action.startswith("remove_candidate:"):
        index = action.split(":", 1)[1]
        remove_candidate(state, int(index) if index.isdigit() else -1)
        return _form_page(request, store, state)
    upload_field = form.get("file")
    upload = None
    if isinstance(upload_field, UploadFile) and upload_field.filename:
        upload = (upload_field.filename, await upload_field.read())
    try:
        data = spec_from_state(state, upload)
        if upload is not None:
            # The browser cannot refill a file input: keep the uploaded rows in the text box.
            state.values["dataset"] = rows_as_jsonl(data["dataset"]["rows"])
        try:
            spec = ComparisonCreate.model_validate(data)
        except ValidationError as exc:
            raise InvalidComparison(problems_from_errors(exc.errors())) from None
        created = await run_in_threadpool(
            service.submit_comparison, spec=spec, store=store, publisher=publisher, settings=settings
        )
    except InvalidComparison as exc:
        attach_problems(state, exc.fields, state.metrics)
        return _form_page(request, store, state, status_code=422)
    except ApiError as exc:
        attach_problems(state, [FieldProblem("form", exc.message)], state.metrics)
        return _form_page(request, store, state, status_code=exc.status_code)
    return RedirectResponse(f"/ui/comparisons/{created.id}", status_code=303)


@router.get("/ui/comparisons/{comparison_id}")
def comparison_page(
    request: Request, comparison_id: str, store: StoreDep, settings: SettingsDep
) -> HTMLResponse:
    try:
        comparison = service.read_comparison(comparison_id=comparison_id, store=store, settings=settings)
    except ApiError:
        return _not_found(request, f"No comparison with id {comparison_id!r}; it may have expired.")
    reg = views.registry(store)
    decided, undecided = views.verdicts(comparison)
    return _page(
        request,
        "comparison.html",
        {
            "title": comparison.name,
            "c": comparison,
            "charts": views.charts(comparison, reg),
            "decided": decided,
            "undecided": undecided,
            "grid": views.grid_context(
                comparison_id=comparison_id, store=store, comparison=comparison, reg=reg
            ),
            "arena_ready": views.arena_ready(comparison),
            "active": comparison.status in views.ACTIVE,
        },
    )


@router.post("/ui/comparisons/{comparison_id}/cancel")
def cancel_from_page(
    request: Request, comparison_id: str, store: StoreDep, publisher: PublisherDep, settings: SettingsDep
) -> Response:
    try:
        service.cancel_comparison(
            comparison_id=comparison_id, store=store, publisher=publisher, settings=settings
        )
    except ApiError as exc:
        if exc.status_code == 404:
            return _not_found(request, exc.message)
        # Already ended: the page shows the final state, which says so.
    return RedirectResponse(f"/ui/comparisons/{comparison_id}", status_code=303)


@router.get("/ui/comparisons/{comparison_id}/arena")
def arena_page(request: Request, comparison_id: str, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    try:
        comparison = service.read_comparison(comparison_id=comparison_id, store=store, settings=settings)
    except ApiError:
        return _not_found(request, f"No comparison with id {comparison_id!r}; it may have expired.")
    return _page(
        request,
        "arena.html",
        {
            "title": f"Arena · {comparison.name}",
            "c": comparison,
            "arena_ready": views.arena_ready(comparison),
        },
    )
