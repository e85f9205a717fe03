"""App factory for the gateway: ``uvicorn services.api.main:create_app --factory``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import PayloadTooLarge, install_error_handlers
from services.api.queue import Publisher
from services.api.routes import catalog, comparisons, feedback, health, webhooks
from services.api.web import routes as web
from shared.schemas import ComparisonCreate
from shared.settings import Settings, get_settings
from shared.store import ComparisonStore

log = structlog.get_logger()


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passes the limit; BodySizeLimit turns it into a 413."""


class BodySizeLimit:
    """Answer 413 as soon as a request body passes ``max_bytes``.

    A declared Content-Length over the limit is refused before anything is read. Otherwise the
    bytes are counted as they arrive, chunked or not, so a 60 MiB chunked body or a 120 MiB
    upload costs at most ``max_bytes`` of reading, never the whole body. Whatever the app
    answers after the limit was passed (a parser's own error, say) is dropped for the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, size: str) -> JSONResponse:
        error = PayloadTooLarge(
            f"The request body is {size}; the limit is {self.max_bytes} bytes "
            "(setting MAX_BODY_BYTES): split the dataset"
        )
        return JSONResponse(error.body(), status_code=error.status_code, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refusal(f"{int(value)} bytes")(scope, receive, send)
                return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refusal(f"over {self.max_bytes} bytes")(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = ComparisonStore.from_url(
            settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
        )
        app.state.publisher = Publisher(settings)
        if settings.auth_disabled:
            log.warning("auth.disabled", note="AUTH_DISABLED is set: anyone who reaches this API can use it")
        yield
        app.state.publisher.close()
        app.state.store.r.close()

    app = FastAPI(
        title="llm-compare",
        version="0.1.0",
        description="Compare large language models side by side: submit candidates × prompts × "
        "metrics, read outputs and metrics here and in MLflow.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        # Redis's own text names hosts, ports and sometimes keys: it stays in the log.
        log.warning("redis.unavailable", path=request.url.path, error=repr(exc))
        return JSONResponse(
            {
                "error": "unavailable",
                "message": "The state store (Redis) is unavailable; retry later",
                "fields": [],
            },
            status_code=503,
        )

    app.include_router(health.router)
    app.include_router(catalog.router)
    app.include_router(comparisons.router)
    app.include_router(feedback.router)
    app.include_router(webhooks.router)
    # The web pages: same process, same origin, no second server.
    app.include_router(web.router)
    app.add_exception_handler(web.SignInRequired, web.send_to_sign_in)
    app.mount("/ui/static", StaticFiles(directory=web.STATIC), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _document_submission_schema(app)
    return app


def _document_submission_schema(app: FastAPI) -> None:
    """The submit route reads its body itself (JSON or multipart), so FastAPI cannot see the
    request model; add ComparisonCreate and its parts to the OpenAPI components by hand."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        body = ComparisonCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ComparisonCreate"] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
