"""Domain errors that carry their HTTP status, and the handlers that render them.

Every error body has the same shape, so clients can show it without guessing:
``{"error": code, "message": summary, "fields": [{"field": "candidates[1].label", "message": ...}]}``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


@dataclass(frozen=True)
class FieldProblem:
    field: str
    message: str


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, fields: Sequence[FieldProblem] = ()):
        super().__init__(message)
        self.message = message
        self.fields = list(fields)

    def body(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "fields": [{"field": f.field, "message": f.message} for f in self.fields],
        }


class InvalidComparison(ApiError):
    status_code = 422
    code = "invalid_request"
    # What the refusal means for the client, before the first problems.
    outcome = "The comparison was not queued."

    def __init__(self, fields: Sequence[FieldProblem]):
        summary = "; ".join(f"{f.field}: {f.message}" for f in fields[:3])
        more = f" (and {len(fields) - 3} more)" if len(fields) > 3 else ""
        super().__init__(f"{self.outcome} {summary}{more}", fields=fields)


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "unavailable"


def format_loc(loc: Sequence[Any]) -> str:
    """("body", "candidates", 1, "label") -> "candidates[1].label"."""
    parts = [p for p in loc if p not in ("body", "query", "path", "form")]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


def _validation_message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "extra_forbidden":
        message = "unknown field: remove it (see /docs for the accepted fields)"
    elif error.get("type") == "missing":
        message = "this field is required"
    return message


def problems_from_errors(errors: Sequence[Mapping[str, Any]]) -> list[FieldProblem]:
    return [FieldProblem(format_loc(e.get("loc", ())), _validation_message(e)) for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = InvalidComparison(problems_from_errors(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": "http_error", "message": str(exc.detail), "fields": []},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
