"""What the gateway does for webhooks besides checking callbacks at submit time (validation.py):
shows and rotates a key's signing secret, and lists a comparison's deliveries. The I/O workers
send the deliveries (services/worker/webhooks.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from services.api.auth import Principal
from services.api.service import load_owned
from shared.records import WebhookSecretRecord
from shared.schemas import DeliveriesRead, DeliveryRead, WebhookSecretRead
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.webhook_store import WebhookStore

log = structlog.get_logger()


def _secret_read(key_id: str, record: WebhookSecretRecord) -> WebhookSecretRead:
    expires = record.previous_expires_at
    return WebhookSecretRead(
        key_id=key_id,
        secret=record.secret,
        created_at=record.created_at,
        previous_expires_at=expires if expires and expires > datetime.now(UTC) else None,
    )


def read_secret(*, store: ComparisonStore, principal: Principal) -> WebhookSecretRead:
    """The caller's key's signing secret (created on first read)."""
    return _secret_read(principal.key_id, WebhookStore(store).secret(principal.key_id))


def rotate_secret(*, store: ComparisonStore, settings: Settings, principal: Principal) -> WebhookSecretRead:
    """A new secret for the caller's key; the old one keeps signing too for WEBHOOK_SECRET_GRACE_S."""
    record = WebhookStore(store).rotate_secret(principal.key_id, grace_s=settings.webhook_secret_grace_s)
    log.info("webhook.secret_rotated", key_id=principal.key_id, by=principal.name)
    return _secret_read(principal.key_id, record)


def list_deliveries(*, comparison_id: str, store: ComparisonStore, principal: Principal) -> DeliveriesRead:
    load_owned(store, comparison_id, principal)
    # Read field by field from the records: what only the workers need (the body, the key) stays out.
    return DeliveriesRead(
        deliveries=[
            DeliveryRead.model_validate(d, from_attributes=True)
            for d in WebhookStore(store).deliveries(comparison_id)
        ]
    )
