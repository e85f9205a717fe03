"""App factory for the gateway: ``uvicorn services.api.main:create_app --factory``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.errors import PayloadTooLarge, install_error_handlers
from services.api.queue import Publisher
from services.api.routes import catalog, comparisons, feedback, health
from services.api.web import routes as web
from shared.schemas import ComparisonCreate
from shared.settings import Settings, get_settings
from shared.store import ComparisonStore


class BodySizeLimit:
    """Refuse bodies whose declared length exceeds the limit before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    error = PayloadTooLarge(
                        f"The request body is {int(value)} bytes; the limit is {self.max_bytes} "
                        "(setting MAX_BODY_BYTES): split the dataset"
                    )
                    await JSONResponse(error.body(), status_code=413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = ComparisonStore.from_url(
            settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
        )
        app.state.publisher = Publisher(settings)
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
    async def _redis_down(_: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse(
            {
                "error": "unavailable",
                "message": f"The state store (Redis) is unavailable; retry later ({exc})",
                "fields": [],
            },
            status_code=503,
        )

    app.include_router(health.router)
    app.include_router(catalog.router)
    app.include_router(comparisons.router)
    app.include_router(feedback.router)
    # The web pages: same process, same origin, no second server.
    app.include_router(web.router)
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
