"""Liveness and readiness."""

from __future__ import annotations

import httpx
import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from services.api.deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])
log = structlog.get_logger()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {"description": "Redis and MLflow answer"},
        503: {"description": "Not ready: `failing` names the dependency that does not answer"},
    },
)
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    # Each check says only "ok", "unreachable" or the status code: the exception text (hosts,
    # ports, addresses inside the deployment) goes to the log, not to whoever asks.
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["redis"] = "ok"
    except (RedisError, OSError) as exc:
        log.warning("readyz.redis_unreachable", error=repr(exc))
        checks["redis"] = "unreachable"
    try:
        reply = httpx.get(f"{settings.mlflow_tracking_uri.rstrip('/')}/health", timeout=2.0)
        checks["mlflow"] = "ok" if reply.status_code == 200 else f"unhealthy: HTTP {reply.status_code}"
    except httpx.HTTPError as exc:
        log.warning("readyz.mlflow_unreachable", error=repr(exc))
        checks["mlflow"] = "unreachable"
    failing = [name for name, state in checks.items() if state != "ok"]
    body = {"status": "ready" if not failing else "not ready", "checks": checks, "failing": failing}
    return JSONResponse(body, status_code=503 if failing else 200)
