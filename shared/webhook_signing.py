"""Standard Webhooks signatures (https://www.standardwebhooks.com), standard library only.

A delivery carries three headers:

- ``webhook-id``: the message id, the same on every retry of one event to one callback;
- ``webhook-timestamp``: when this attempt was signed, in whole seconds since the epoch;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per
  secret, separated by spaces (two while a rotated-out secret is still in its grace period).

A secret reads ``whsec_<base64 of 32 random bytes>``; the HMAC key is the decoded bytes.

``verify`` is a pure function of the body, the headers and the secret(s) (and the time), so the
HTTP client, the example receiver and any service can check a delivery without this package's
other modules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
# Receivers refuse a timestamp further than this from their own clock (the scheme's default):
# a captured delivery cannot be replayed later.
DEFAULT_TOLERANCE_S = 5 * 60

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


class WebhookVerificationError(ValueError):
    """The delivery is not authentic or not fresh; the message says which check failed."""


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (the prefix is optional)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        # Tolerate unpadded base64, as the scheme's reference libraries do.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookVerificationError("the secret is not base64 after 'whsec_'") from exc
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``{msg_id}.{timestamp}.{body}``."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signed_headers(
    signing_secrets: Sequence[str], *, msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers, with one signature per secret (newest first)."""
    if not signing_secrets:
        raise ValueError("at least one secret is needed to sign")
    signatures = " ".join(sign(s, msg_id=msg_id, timestamp=timestamp, body=body) for s in signing_secrets)
    return {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(timestamp), HEADER_SIGNATURE: signatures}


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """Check a delivery and return its JSON body; raise WebhookVerificationError otherwise.

    ``body`` must be the raw bytes as received (re-encoding parsed JSON changes them).
    ``headers`` is looked up case-insensitively. ``secret`` may be several secrets (a receiver
    that rotates its own copy); one matching signature from any of them is enough. The timestamp
    must lie within ``tolerance_s`` of ``now`` (default: this machine's clock).
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get(HEADER_ID)
    raw_timestamp = lowered.get(HEADER_TIMESTAMP)
    signatures = lowered.get(HEADER_SIGNATURE)
    if not (msg_id and raw_timestamp and signatures):
        raise WebhookVerificationError(
            f"missing header: send {HEADER_ID}, {HEADER_TIMESTAMP} and {HEADER_SIGNATURE}"
        )
    try:
        timestamp = int(raw_timestamp)
    except ValueError as exc:
        raise WebhookVerificationError(f"{HEADER_TIMESTAMP} is not whole seconds since the epoch") from exc
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("the timestamp is too old (a replayed or delayed delivery)")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("the timestamp is too far in the future (check the clocks)")
    candidates = [secret] if isinstance(secret, str) else list(secret)
    expected = [
        base64.b64decode(sign(s, msg_id=msg_id, timestamp=timestamp, body=body).split(",", 1)[1])
        for s in candidates
    ]
    for entry in signatures.split(" "):
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION or not encoded:
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, e) for e in expected):
            try:
                return json.loads(body)
            except ValueError as exc:
                raise WebhookVerificationError("the signature matches but the body is not JSON") from exc
    raise WebhookVerificationError("no signature matches the secret")
