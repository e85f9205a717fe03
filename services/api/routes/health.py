"""Liveness and readiness."""

from __future__ import annotations

import httpx
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from services.api.deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["redis"] = "ok"
    except (RedisError, OSError) as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        reply = httpx.get(f"{settings.mlflow_tracking_uri.rstrip('/')}/health", timeout=2.0)
        checks["mlflow"] = "ok" if reply.status_code == 200 else f"unhealthy: HTTP {reply.status_code}"
    except httpx.HTTPError as exc:
        checks["mlflow"] = f"unreachable: {exc}"
    failing = [name for name, state in checks.items() if state != "ok"]
    body = {"status": "ready" if not failing else "not ready", "checks": checks, "failing": failing}
    return JSONResponse(body, status_code=503 if failing else 200)
