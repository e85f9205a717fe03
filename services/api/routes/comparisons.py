"""Comparison endpoints: thin adapters from HTTP to ``services.api.service``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from services.api import quotas, service, webhooks
from services.api.auth import AUTH_RESPONSES, ReaderDep, SubmitterDep
from services.api.deps import PublisherDep, SettingsDep, StoreDep
from services.api.errors import FieldProblem, InvalidComparison, UnsupportedMediaType, refusing_route
from services.api.events import comparison_events
from services.api.uploads import parse_json_submission, parse_upload_submission
from shared.schemas import (
    AuditRead,
    ComparisonCreate,
    ComparisonPage,
    ComparisonRead,
    ComparisonResults,
    ComparisonStatus,
    DeliveriesRead,
    ErrorRead,
)
from shared.settings import Settings

router = APIRouter(
    prefix="/v1/comparisons",
    tags=["comparisons"],
    route_class=refusing_route(InvalidComparison),
    responses={
        **AUTH_RESPONSES,
        404: {"model": ErrorRead, "description": "No such comparison"},
        409: {"model": ErrorRead, "description": "Cancel: the comparison has already ended"},
        413: {"model": ErrorRead, "description": "The body is over MAX_BODY_BYTES"},
        415: {"model": ErrorRead, "description": "Neither application/json nor multipart/form-data"},
        422: {"model": ErrorRead, "description": "Invalid request: every offending field, with the fix"},
        429: {"model": ErrorRead, "description": "Over the key's rate or running-comparisons quota"},
        503: {"model": ErrorRead, "description": "Redis or the queue is unavailable; nothing was queued"},
    },
)

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ComparisonCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec", "file"],
                    "properties": {
                        "spec": {
                            "type": "string",
                            "description": "The comparison as JSON, without 'dataset'.",
                        },
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Dataset as .jsonl (one object per line) or .csv with a header; "
                            "columns 'input', optional 'reference', any others are kept.",
                        },
                    },
                }
            },
        },
    }
}


async def _read_submission(request: Request, settings: Settings) -> ComparisonCreate:
    """Read the body (capped at MAX_BODY_BYTES while it streams in, by the app's middleware),
    then parse and validate it in the thread pool: a 10 MiB body takes a moment of CPU, and
    /healthz must not wait for it."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            # One spec field and one file; the spec may be as long as the body may.
            form = await request.form(max_files=1, max_fields=1, max_part_size=settings.max_body_bytes)
        except HTTPException as exc:  # python-multipart's refusal of a malformed or oversized form
            raise InvalidComparison(
                [FieldProblem("body", f"{exc.detail} Send one field 'spec' and one file 'file'.")]
            ) from None
        raw_spec, upload = form.get("spec"), form.get("file")
        unknown = sorted(set(form.keys()) - {"spec", "file"})
        if unknown:
            raise InvalidComparison(
                [FieldProblem(unknown[0], "unknown form field: send only 'spec' and 'file'")]
            )
        if not isinstance(raw_spec, str):
            raise InvalidComparison(
                [FieldProblem("spec", "send the comparison as a form field 'spec' holding JSON")]
            )
        if not isinstance(upload, UploadFile):
            raise InvalidComparison(
                [FieldProblem("file", "attach the dataset as a file field 'file' (.jsonl or .csv)")]
            )
        content = await upload.read()
        return await run_in_threadpool(
            parse_upload_submission, raw_spec, upload.filename or "", content, settings
        )
    if media_type == "application/json" or media_type.endswith("+json"):
        body = await request.body()
        return await run_in_threadpool(parse_json_submission, body, settings)
    raise UnsupportedMediaType(
        "Send the comparison as JSON or as a multipart form",
        fields=[
            FieldProblem(
                "content-type",
                f"unsupported {media_type[:100]!r}: use application/json, or multipart/form-data "
                "with a 'spec' field and a 'file'",
            )
        ],
    )


@router.post(
    "",
    status_code=202,
    response_model=ComparisonRead,
    openapi_extra=_SUBMIT_BODY,
    summary="Submit a comparison (JSON body, or multipart with a dataset file)",
)
async def create_comparison(
    request: Request,
    response: Response,
    store: StoreDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    principal: SubmitterDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Send the same key with the same body again (within 24 h) to get the first "
            "comparison back (200) instead of a second one",
        ),
    ] = None,
) -> ComparisonRead:
    # Before the body is read: a flood costs a Redis round trip each, not a parse.
    await run_in_threadpool(quotas.check_rate, principal, store=store, settings=settings)
    spec = await _read_submission(request, settings)
    created, replayed = await run_in_threadpool(
        service.submit_once,
        spec=spec,
        store=store,
        publisher=publisher,
        settings=settings,
        principal=principal,
        idempotency_key=idempotency_key,
    )
    if replayed:
        response.status_code = 200
    response.headers["Location"] = f"/v1/comparisons/{created.id}"
    return created


@router.get("", response_model=ComparisonPage, summary="List comparisons, newest first")
def list_comparisons(
    store: StoreDep,
    settings: SettingsDep,
    principal: ReaderDep,
    status: ComparisonStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    # Redis ranks are 64-bit: a bound keeps an absurd offset a 422 rather than a store error.
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ComparisonPage:
    return service.list_comparisons(
        store=store, settings=settings, status=status, limit=limit, offset=offset, principal=principal
    )


@router.get("/{comparison_id}", response_model=ComparisonRead)
def get_comparison(
    comparison_id: str, store: StoreDep, settings: SettingsDep, principal: ReaderDep
) -> ComparisonRead:
    return service.read_comparison(
        comparison_id=comparison_id, store=store, settings=settings, principal=principal
    )


@router.get(
    "/{comparison_id}/results",
    response_model=ComparisonResults,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Side-by-side outputs with scores and ratings; ?format=csv for one CSV row per dataset row",
)
def get_results(
    comparison_id: str,
    store: StoreDep,
    principal: ReaderDep,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    download: Annotated[bool, Query(description="Send as a file to save (JSON; CSV always is)")] = False,
) -> Any:
    results = service.comparison_results(comparison_id=comparison_id, store=store, principal=principal)
    if format == "json" and download:
        return Response(
            results.model_dump_json(indent=2),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{comparison_id}.json"'},
        )
    if format == "csv":
        return Response(
            service.results_csv(results),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{comparison_id}.csv"'},
        )
    return results


@router.post("/{comparison_id}/cancel", response_model=ComparisonRead)
def cancel_comparison(
    comparison_id: str,
    store: StoreDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    principal: SubmitterDep,
) -> ComparisonRead:
    return service.cancel_comparison(
        comparison_id=comparison_id, store=store, publisher=publisher, settings=settings, principal=principal
    )


@router.get(
    "/{comparison_id}/audit",
    response_model=AuditRead,
    summary="Who submitted, cancelled, voted on and rated the comparison, oldest first",
)
def read_audit(comparison_id: str, store: StoreDep, principal: ReaderDep) -> AuditRead:
    return service.audit_log(comparison_id=comparison_id, store=store, principal=principal)


@router.get(
    "/{comparison_id}/deliveries",
    response_model=DeliveriesRead,
    summary="Webhook deliveries: event, URL, webhook-id, state, every attempt and the next retry",
)
def read_deliveries(comparison_id: str, store: StoreDep, principal: ReaderDep) -> DeliveriesRead:
    return webhooks.list_deliveries(comparison_id=comparison_id, store=store, principal=principal)


@router.get(
    "/{comparison_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Server-Sent Events: the comparison's state on every change, then 'end'",
)
def stream_events(
    comparison_id: str, request: Request, store: StoreDep, settings: SettingsDep, principal: ReaderDep
) -> Any:
    # Read once before streaming, so an unknown id is a plain 404 rather than a broken stream.
    service.load_owned(store, comparison_id, principal)
    return StreamingResponse(
        comparison_events(
            comparison_id=comparison_id,
            store=store,
            settings=settings,
            principal=principal,
            is_disconnected=request.is_disconnected,
        ),
        media_type="text/event-stream",
        # Proxies (nginx) must pass each event on at once instead of buffering the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
