"""Comparison endpoints: thin adapters from HTTP to ``services.api.service``."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.api import service
from services.api.deps import PublisherDep, SettingsDep, StoreDep
from services.api.errors import FieldProblem, InvalidComparison, PayloadTooLarge
from services.api.events import comparison_events
from services.api.uploads import parse_dataset_file
from shared.schemas import (
    ComparisonCreate,
    ComparisonPage,
    ComparisonRead,
    ComparisonResults,
    ComparisonStatus,
    ErrorRead,
)

router = APIRouter(
    prefix="/v1/comparisons",
    tags=["comparisons"],
    responses={
        404: {"model": ErrorRead, "description": "No such comparison"},
        422: {"model": ErrorRead, "description": "Invalid request: every offending field, with the fix"},
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


async def _read_submission(request: Request, max_bytes: int) -> ComparisonCreate:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        raw_spec, upload = form.get("spec"), form.get("file")
        if not isinstance(raw_spec, str):
            raise InvalidComparison(
                [FieldProblem("spec", "send the comparison as a form field 'spec' holding JSON")]
            )
        if not isinstance(upload, UploadFile):
            raise InvalidComparison(
                [FieldProblem("file", "attach the dataset as a file field 'file' (.jsonl or .csv)")]
            )
        content = await upload.read()
        if len(content) > max_bytes:
            raise PayloadTooLarge(f"The dataset file is {len(content)} bytes; the limit is {max_bytes}")
        try:
            data: Any = json.loads(raw_spec)
        except json.JSONDecodeError as exc:
            raise InvalidComparison([FieldProblem("spec", f"not valid JSON ({exc.msg})")]) from None
        if not isinstance(data, dict):
            raise InvalidComparison([FieldProblem("spec", "must be a JSON object")])
        if "dataset" in data:
            raise InvalidComparison(
                [
                    FieldProblem(
                        "spec.dataset", "give the dataset either inline or as the uploaded file, not both"
                    )
                ]
            )
        data["dataset"] = {"rows": parse_dataset_file(upload.filename or "", content)}
        return _parse(data)
    body = await request.body()
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"The request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        return ComparisonCreate.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _parse(data: dict[str, Any]) -> ComparisonCreate:
    try:
        return ComparisonCreate.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


@router.post(
    "",
    status_code=202,
    response_model=ComparisonRead,
    openapi_extra=_SUBMIT_BODY,
    summary="Submit a comparison (JSON body, or multipart with a dataset file)",
)
async def create_comparison(
    request: Request, response: Response, store: StoreDep, publisher: PublisherDep, settings: SettingsDep
) -> ComparisonRead:
    spec = await _read_submission(request, settings.max_body_bytes)
    created = await run_in_threadpool(
        service.submit_comparison, spec=spec, store=store, publisher=publisher, settings=settings
    )
    response.headers["Location"] = f"/v1/comparisons/{created.id}"
    return created


@router.get("", response_model=ComparisonPage, summary="List comparisons, newest first")
def list_comparisons(
    store: StoreDep,
    settings: SettingsDep,
    status: ComparisonStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ComparisonPage:
    return service.list_comparisons(store=store, settings=settings, status=status, limit=limit, offset=offset)


@router.get("/{comparison_id}", response_model=ComparisonRead)
def get_comparison(comparison_id: str, store: StoreDep, settings: SettingsDep) -> ComparisonRead:
    return service.read_comparison(comparison_id=comparison_id, store=store, settings=settings)


@router.get(
    "/{comparison_id}/results",
    response_model=ComparisonResults,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Side-by-side outputs with scores and ratings; ?format=csv for one CSV row per dataset row",
)
def get_results(
    comparison_id: str,
    store: StoreDep,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    download: Annotated[bool, Query(description="Send as a file to save (JSON; CSV always is)")] = False,
) -> Any:
    results = service.comparison_results(comparison_id=comparison_id, store=store)
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
    comparison_id: str, store: StoreDep, publisher: PublisherDep, settings: SettingsDep
) -> ComparisonRead:
    return service.cancel_comparison(
        comparison_id=comparison_id, store=store, publisher=publisher, settings=settings
    )


@router.get(
    "/{comparison_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Server-Sent Events: the comparison's state on every change, then 'end'",
)
def stream_events(comparison_id: str, request: Request, store: StoreDep, settings: SettingsDep) -> Any:
    # Read once before streaming, so an unknown id is a plain 404 rather than a broken stream.
    service.read_comparison(comparison_id=comparison_id, store=store, settings=settings)
    return StreamingResponse(
        comparison_events(
            comparison_id=comparison_id,
            store=store,
            settings=settings,
            is_disconnected=request.is_disconnected,
        ),
        media_type="text/event-stream",
        # Proxies (nginx) must pass each event on at once instead of buffering the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
