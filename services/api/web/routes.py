"""The web pages under /ui: thin handlers that build a page context and render a template."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from services.api import quotas, service
from services.api.auth import COOKIE, Principal, identify
from services.api.deps import PublisherDep, SettingsDep, StoreDep, get_settings
from services.api.errors import ApiError, FieldProblem, InvalidComparison
from services.api.uploads import validated_spec
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
from shared.apikeys import Role, matches, parse_key_id
from shared.schemas import ComparisonStatus

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


class SignInRequired(Exception):
    """A page was asked for without a valid key: the handler sends the browser to sign in."""

    def __init__(self, next_url: str):
        super().__init__(next_url)
        self.next_url = next_url


def page_principal(request: Request) -> Principal:
    principal = identify(
        request, request.app.state.store, auth_disabled=request.app.state.settings.auth_disabled
    )
    if principal is None:
        query = f"?{request.url.query}" if request.url.query else ""
        raise SignInRequired(f"{request.url.path}{query}")
    return principal


PageUser = Annotated[Principal, Depends(page_principal)]


async def send_to_sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return RedirectResponse(f"/ui/login?{urlencode({'next': exc.next_url})}", status_code=303)


def _safe_next(next_url: str | None) -> str:
    """Only paths of this site's pages: never an absolute URL (no open redirect)."""
    if next_url and next_url.startswith("/ui") and not next_url.startswith("//"):
        return next_url
    return "/ui"


def _page(
    request: Request,
    name: str,
    context: dict[str, Any],
    status_code: int = 200,
    principal: Principal | None = None,
) -> HTMLResponse:
    settings = request.app.state.settings
    return templates.TemplateResponse(
        request,
        name,
        {
            **views.page_settings(settings),
            "user": principal,
            "can_submit": principal is not None and principal.role.allows(Role.submitter),
            **context,
        },
        status_code=status_code,
    )


def _not_found(request: Request, message: str, user: Principal | None = None) -> HTMLResponse:
    return _page(
        request, "not_found.html", {"message": message, "title": "Not found"}, status_code=404, principal=user
    )


def _read_only(request: Request, user: Principal) -> HTMLResponse:
    return _page(
        request,
        "not_found.html",
        {
            "title": "Read-only key",
            "message": f"Your key ({user.name}, {user.role.value}) can read comparisons but not start "
            "or change them; ask an operator for a submitter key.",
        },
        status_code=403,
        principal=user,
    )


@router.get("/ui/login")
def sign_in_page(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query name
    if request.app.state.settings.auth_disabled:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(request, "login.html", {"title": "Sign in", "next": _safe_next(next), "error": None})


@router.post("/ui/login")
def sign_in(
    request: Request,
    store: StoreDep,
    key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui",  # noqa: A002 - the form field's name
) -> Response:
    key = key.strip()
    key_id = parse_key_id(key)
    record = store.api_key(key_id) if key_id else None
    if record is None or not record.active or not matches(record, key):
        return _page(
            request,
            "login.html",
            {
                "title": "Sign in",
                "next": _safe_next(next),
                "error": "That key is not valid: check it was copied whole, or ask an operator for a new one",
            },
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    # The page scripts call the API with this cookie; HttpOnly keeps scripts from reading the key,
    # SameSite=Strict keeps other sites from sending it.
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=30 * 24 * 3600,
        path="/",
    )
    return response


@router.post("/ui/logout")
def sign_out() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def comparisons_page(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    user: PageUser,
    status: ComparisonStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 25,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    fragment: bool = False,
) -> HTMLResponse:
    page = service.list_comparisons(
        store=store, settings=settings, status=status, limit=limit, offset=offset, principal=user
    )
    context = {
        "title": "Comparisons",
        "page": page,
        "status": status.value if status else None,
        "statuses": [s.value for s in ComparisonStatus],
        "active": any(item.status in views.ACTIVE for item in page.items),
    }
    # The list refreshes itself by fetching just its table while something runs.
    template = "_comparison_table.html" if fragment else "comparisons.html"
    return _page(request, template, context, principal=user)


def _form_page(
    request: Request, store: Any, state: FormState, user: Principal, status_code: int = 200
) -> HTMLResponse:
    reg = views.registry(store)
    endpoints = get_settings(request).endpoints
    return _page(
        request,
        "new.html",
        {
            "title": "New comparison",
            "state": state,
            "metric_groups": views.metric_groups(reg),
            "models": views.models_for_picker(endpoints),
            "has_endpoints": bool(endpoints),
        },
        status_code=status_code,
        principal=user,
    )


@router.get("/ui/new")
def new_comparison_page(
    request: Request,
    store: StoreDep,
    user: PageUser,
    from_: Annotated[str | None, Query(alias="from")] = None,
) -> HTMLResponse:
    if not user.role.allows(Role.submitter):
        return _read_only(request, user)
    state = views.rerun_state(store, from_, user) if from_ else views.example_state()
    return _form_page(request, store, state, user)


@router.post("/ui/new")
async def submit_comparison_form(
    request: Request, store: StoreDep, publisher: PublisherDep, settings: SettingsDep, user: PageUser
) -> Response:
    if not user.role.allows(Role.submitter):
        return _read_only(request, user)
    form = await request.form()
    state = state_from_form(form)
    action = str(form.get("action") or "submit")
    if action == "add_candidate":
        add_candidate(state)
        return _form_page(request, store, state, user)
    if action.startswith("remove_candidate:"):
        index = action.split(":", 1)[1]
        remove_candidate(state, int(index) if index.isdigit() else -1)
        return _form_page(request, store, state, user)
    upload_field = form.get("file")
    upload = None
    if isinstance(upload_field, UploadFile) and upload_field.filename:
        upload = (upload_field.filename, await upload_field.read())
    try:
        # Before the dataset is parsed, as for the API: a flood costs a Redis round trip each.
        await run_in_threadpool(quotas.check_rate, user, store=store, settings=settings)
        # Parsing a pasted or uploaded dataset is CPU work: off the event loop, within the limits.
        data = await run_in_threadpool(
            spec_from_state, state, upload, max_rows=settings.max_rows, max_columns=settings.max_columns
        )
        if upload is not None:
            # The browser cannot refill a file input: keep the uploaded rows in the text box.
            state.values["dataset"] = rows_as_jsonl(data["dataset"]["rows"])
        spec = validated_spec(data)
        created = await run_in_threadpool(
            service.submit_comparison,
            spec=spec,
            store=store,
            publisher=publisher,
            settings=settings,
            principal=user,
        )
    except InvalidComparison as exc:
        attach_problems(state, exc.fields, state.metrics)
        return _form_page(request, store, state, user, status_code=422)
    except ApiError as exc:
        attach_problems(state, [FieldProblem("form", exc.message)], state.metrics)
        return _form_page(request, store, state, user, status_code=exc.status_code)
    return RedirectResponse(f"/ui/comparisons/{created.id}", status_code=303)


@router.get("/ui/comparisons/{comparison_id}")
def comparison_page(
    request: Request, comparison_id: str, store: StoreDep, settings: SettingsDep, user: PageUser
) -> HTMLResponse:
    try:
        comparison = service.read_comparison(
            comparison_id=comparison_id, store=store, settings=settings, principal=user
        )
    except ApiError:
        return _not_found(request, f"No comparison with id {comparison_id!r}; it may have expired.", user)
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
                comparison_id=comparison_id, store=store, comparison=comparison, reg=reg, principal=user
            ),
            "arena_ready": views.arena_ready(comparison),
            "active": comparison.status in views.ACTIVE,
        },
        principal=user,
    )


@router.post("/ui/comparisons/{comparison_id}/cancel")
def cancel_from_page(
    request: Request,
    comparison_id: str,
    store: StoreDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    user: PageUser,
) -> Response:
    if not user.role.allows(Role.submitter):
        return _read_only(request, user)
    try:
        service.cancel_comparison(
            comparison_id=comparison_id, store=store, publisher=publisher, settings=settings, principal=user
        )
    except ApiError as exc:
        if exc.status_code == 404:
            return _not_found(request, exc.message, user)
        # Already ended: the page shows the final state, which says so.
    return RedirectResponse(f"/ui/comparisons/{comparison_id}", status_code=303)


@router.get("/ui/comparisons/{comparison_id}/arena")
def arena_page(
    request: Request, comparison_id: str, store: StoreDep, settings: SettingsDep, user: PageUser
) -> HTMLResponse:
    try:
        comparison = service.read_comparison(
            comparison_id=comparison_id, store=store, settings=settings, principal=user
        )
    except ApiError:
        return _not_found(request, f"No comparison with id {comparison_id!r}; it may have expired.", user)
    return _page(
        request,
        "arena.html",
        {
            "title": f"Arena · {comparison.name}",
            "c": comparison,
            "arena_ready": views.arena_ready(comparison),
        },
        principal=user,
    )
