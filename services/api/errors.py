"""Domain errors that carry their HTTP status, and the handlers that render them.

Every error body has the same shape, so clients can show it without guessing:
``{"error": code, "message": summary, "fields": [{"field": "candidates[1].label", "message": ...}]}``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger()

# A refusal lists at most this many problems: a hostile body can hold thousands, and the
# first ones are enough to fix a request.
MAX_PROBLEMS = 50
# Field names carry user text (tag keys, column names): keep them short in replies.
_MAX_FIELD_CHARS = 120
_MAX_MESSAGE_CHARS = 2000


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters and safe to encode as UTF-8: an unpaired surrogate
    from a JSON escape would make the reply itself fail."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class FieldProblem:
    field: str
    message: str


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, fields: Sequence[FieldProblem] = (), headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.fields = list(fields)
        # Response headers the status calls for (WWW-Authenticate on 401, Retry-After on 429).
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": printable(self.message, _MAX_MESSAGE_CHARS),
            "fields": [
                {
                    "field": printable(f.field, _MAX_FIELD_CHARS),
                    "message": printable(f.message, _MAX_MESSAGE_CHARS),
                }
                for f in self.fields[:MAX_PROBLEMS]
            ],
        }


class InvalidRequest(ApiError):
    status_code = 422
    code = "invalid_request"
    # What the refusal means for the client, before the first problems; a route whose requests
    # change something says what was not done (refusing_route).
    outcome = "The request was refused."

    def __init__(self, fields: Sequence[FieldProblem]):
        summary = "; ".join(
            f"{printable(f.field, _MAX_FIELD_CHARS)}: {printable(f.message, 300)}" for f in fields[:3]
        )
        more = f" (and {len(fields) - 3} more)" if len(fields) > 3 else ""
        if len(fields) > MAX_PROBLEMS:
            more += f"; the first {MAX_PROBLEMS} are listed"
        super().__init__(f"{self.outcome} {summary}{more}", fields=fields)


class InvalidComparison(InvalidRequest):
    outcome = "The comparison was not queued."


def refusing_route(refusal: type[InvalidRequest]) -> type[APIRoute]:
    """A route class whose malformed requests that change something (not GET or HEAD) are
    refused with ``refusal``, saying what was not done; others get the neutral InvalidRequest."""
    return type(f"{refusal.__name__}Route", (APIRoute,), {"refusal": refusal})


def _refusal(request: Request) -> type[InvalidRequest]:
    if request.method in ("GET", "HEAD"):
        return InvalidRequest
    return getattr(request.scope.get("route"), "refusal", InvalidRequest)


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"


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
            # Dict keys (tags, row columns) are the client's own text, of any length.
            part = printable(str(part), 60)
            text += f".{part}" if text else part
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


def _problem(error: Mapping[str, Any]) -> FieldProblem:
    if error.get("type") == "json_invalid":
        # FastAPI's refusal of a body that is not JSON locates it at the character it stopped on.
        return FieldProblem("body", "not valid JSON: send a JSON object")
    return FieldProblem(format_loc(error.get("loc", ())), _validation_message(error))


def problems_from_errors(errors: Sequence[Mapping[str, Any]]) -> list[FieldProblem]:
    if len(errors) <= MAX_PROBLEMS:
        return [_problem(e) for e in errors]
    shown = MAX_PROBLEMS - 1
    problems = [_problem(e) for e in errors[:shown]]
    problems.append(FieldProblem("body", f"{len(errors) - shown} more problems not listed"))
    return problems


_FASTAPI_BAD_JSON = "There was an error parsing the body"


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        path_regex = getattr(route, "path_regex", None)
        if path_regex is not None and path_regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _refusal(request)(problems_from_errors(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_BAD_JSON:
            # FastAPI's own answer to a body that is not JSON; every other refusal of a body is a
            # 422 naming the field, so this one is too.
            error = _refusal(request)([FieldProblem("body", "not valid JSON: send a JSON object")])
            return JSONResponse(error.body(), status_code=error.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; a path served by several
            # routes (GET and POST /v1/comparisons) allows all of theirs.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            {"error": "http_error", "message": printable(str(exc.detail), _MAX_MESSAGE_CHARS), "fields": []},
            status_code=exc.status_code,
            headers=headers or None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's doing: the details go to the log, never into the reply.
        log.error(
            "request.failed", method=request.method, path=request.url.path, error=repr(exc), exc_info=exc
        )
        return JSONResponse(
            {"error": "internal_error", "message": "The service failed to handle this request", "fields": []},
            status_code=500,
        )
