"""API keys: who may do what.

A key reads ``llmc_<id>_<secret>``. The id is public (it names the key in ``keys list`` and
``keys revoke``); only a SHA-256 of the whole key is stored, so a copy of Redis gives no usable
key. Keys are long random strings, not passwords, so a fast hash is the right one: there is
nothing to brute-force (this is how GitHub and Stripe store theirs).

The key's ``name`` is its owner, usually a team: every key named ``team-a`` sees ``team-a``'s
comparisons, whatever its role, and nobody else's unless it is an admin key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.store import ComparisonStore

KEY_PREFIX = "llmc"
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class Role(StrEnum):
    reader = "reader"
    submitter = "submitter"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.reader: 0, Role.submitter: 1, Role.admin: 2}


@dataclass(frozen=True)
class Quotas:
    """Limits a key may carry instead of the service-wide defaults (None: the default)."""

    submissions_per_minute: int | None = None
    max_running: int | None = None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    role: Role
    key_hash: str
    created_at: str
    revoked_at: str | None = None
    last_used_at: str | None = None
    quotas: Quotas = Quotas()

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_key() -> tuple[str, str]:
    """A fresh (id, whole key). The whole key is shown once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_id(key: str) -> str | None:
    """The id inside a well-formed key, else None (so a malformed one costs no Redis read)."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def matches(record: KeyRecord, key: str) -> bool:
    return hmac.compare_digest(record.key_hash, key_hash(key))


def issue_key(
    store: ComparisonStore, *, name: str, role: Role, quotas: Quotas | None = None
) -> tuple[KeyRecord, str]:
    """Create a key; returns its record and the whole key, which exists nowhere else after this."""
    if not re.match(OWNER_PATTERN, name):
        raise ValueError(
            f"name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    key_id, key = new_key()
    record = KeyRecord(
        id=key_id,
        name=name,
        role=role,
        key_hash=key_hash(key),
        created_at=datetime.now(UTC).isoformat(),
        quotas=quotas or Quotas(),
    )
    store.save_api_key(record)
    return record, key
