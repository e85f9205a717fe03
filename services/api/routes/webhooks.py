"""Webhook signing secrets: each API key reads and rotates its own (``local`` with auth off)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.api import webhooks
from services.api.auth import AUTH_RESPONSES, ReaderDep
from services.api.deps import SettingsDep, StoreDep
from shared.schemas import WebhookSecretRead

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses={**AUTH_RESPONSES})

# A secret must not linger in a shared cache or a browser's history of responses.
_NO_STORE = {"Cache-Control": "no-store"}


@router.get(
    "/secret",
    response_model=WebhookSecretRead,
    summary="This key's webhook signing secret (whsec_...), created on first read",
)
def read_secret(response: Response, store: StoreDep, principal: ReaderDep) -> WebhookSecretRead:
    response.headers.update(_NO_STORE)
    return webhooks.read_secret(store=store, principal=principal)


@router.post(
    "/secret/rotate",
    response_model=WebhookSecretRead,
    summary="A new signing secret; the old one also signs deliveries for WEBHOOK_SECRET_GRACE_S",
)
def rotate_secret(
    response: Response, store: StoreDep, settings: SettingsDep, principal: ReaderDep
) -> WebhookSecretRead:
    response.headers.update(_NO_STORE)
    return webhooks.rotate_secret(store=store, settings=settings, principal=principal)
