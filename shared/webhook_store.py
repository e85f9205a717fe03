"""Webhook state in Redis: a comparison's callbacks and deliveries, the set of deliveries whose
next attempt is due, the lock an attempt holds, and each API key's signing secret.

Keys (see the layout in shared/store.py) are built here only. Long waits between attempts live
in the due set, never in the broker: with the Redis transport a countdown longer than the
visibility timeout is delivered again early, and a retry 10 h away would be.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.records import DeliveryAttempt, DeliveryRecord, WebhookSecretRecord
from shared.store import ComparisonNotFound, ComparisonStore
from shared.webhook_signing import new_secret

# KEYS[1] deliveries hash, KEYS[2] due set; ARGV[1] webhook id, ARGV[2] record JSON, ARGV[3] due
# member, ARGV[4] due score, ARGV[5] ttl (0: none). Returns 1 when the delivery is new.
_CREATE_SCRIPT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5])) end
return 1
"""
# KEYS[1] due set; ARGV[1] now, ARGV[2] the score claimed members move to, ARGV[3] how many.
_CLAIM_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""
# KEYS[1] secret hash; ARGV[1] new secret, ARGV[2] now, ARGV[3] when the replaced one stops signing.
_ROTATE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'secret')
if current then
  redis.call('HSET', KEYS[1], 'previous', current, 'previous_expires_at', ARGV[3])
end
redis.call('HSET', KEYS[1], 'secret', ARGV[1], 'created_at', ARGV[2])
return 1
"""


class WebhookStore:
    def __init__(self, store: ComparisonStore):
        self.store = store
        self.r: Any = store.r
        self.prefix = store.prefix
        self._create = self.r.register_script(_CREATE_SCRIPT)
        self._claim = self.r.register_script(_CLAIM_SCRIPT)
        self._rotate = self.r.register_script(_ROTATE_SCRIPT)

    # ---- keys
    @property
    def _due(self) -> str:
        return f"{self.prefix}:webhooks:due"

    def _deliveries(self, comparison_id: str) -> str:
        return self.store._key(comparison_id, "deliveries")

    def lock_key(self, webhook_id: str) -> str:
        """The lease an attempt of the delivery holds (services/worker/locks.py Lease)."""
        return f"{self.prefix}:whlock:{webhook_id}"

    def _secret(self, key_id: str) -> str:
        return f"{self.prefix}:whsecret:{key_id}"

    @staticmethod
    def _member(comparison_id: str, webhook_id: str) -> str:
        return f"{comparison_id}/{webhook_id}"

    # ---- callbacks (written with the comparison by ComparisonStore.create)
    def callbacks(self, comparison_id: str) -> tuple[str, list[dict[str, Any]]]:
        """(the submitting key's id, the callbacks); no callbacks reads as ("", [])."""
        raw = self.r.get(self.store._key(comparison_id, "callbacks"))
        if raw is None:
            return "", []
        data = json.loads(raw)
        return str(data["key_id"]), list(data["callbacks"])

    # ---- deliveries
    def create_delivery(self, record: DeliveryRecord, *, due_at: float) -> bool:
        """Store a new delivery and put it in the due set; False (and nothing written) when a
        delivery with this webhook id exists already, whatever its state."""
        created = self._create(
            keys=[self._deliveries(record.comparison_id), self._due],
            args=[
                record.webhook_id,
                _encode_delivery(record),
                self._member(record.comparison_id, record.webhook_id),
                due_at,
                self.store.ttl_s or 0,
            ],
        )
        return bool(int(created))

    def delivery(self, comparison_id: str, webhook_id: str) -> DeliveryRecord | None:
        try:
            raw = self.r.hget(self._deliveries(comparison_id), webhook_id)
        except ComparisonNotFound:
            return None
        return _decode_delivery(raw) if raw else None

    def deliveries(self, comparison_id: str) -> list[DeliveryRecord]:
        """Every delivery of the comparison, oldest first."""
        records = [_decode_delivery(raw) for raw in self.r.hvals(self._deliveries(comparison_id))]
        return sorted(records, key=lambda d: (d.created_at, d.event, d.label or "", d.callback))

    def save_delivery(self, record: DeliveryRecord) -> None:
        self.r.hset(self._deliveries(record.comparison_id), record.webhook_id, _encode_delivery(record))

    def schedule(self, comparison_id: str, webhook_id: str, *, at: float) -> None:
        self.r.zadd(self._due, {self._member(comparison_id, webhook_id): at})

    def unschedule(self, comparison_id: str, webhook_id: str) -> None:
        self.r.zrem(self._due, self._member(comparison_id, webhook_id))

    def due_at(self, comparison_id: str, webhook_id: str) -> float | None:
        score = self.r.zscore(self._due, self._member(comparison_id, webhook_id))
        return None if score is None else float(score)

    def claim_due(self, *, now: float, hold_s: float, limit: int = 100) -> list[tuple[str, str]]:
        """Deliveries due by ``now``, moved ``hold_s`` ahead in the same script so that another
        sweep (another I/O worker) does not take them too; if the attempt never happens they
        come due again then."""
        members = self._claim(keys=[self._due], args=[now, now + hold_s, limit])
        claimed = []
        for member in members:
            comparison_id, _, webhook_id = str(member).partition("/")
            claimed.append((comparison_id, webhook_id))
        return claimed

    # ---- signing secrets, one per API key; they live as long as the key (no TTL)
    def secret(self, key_id: str) -> WebhookSecretRecord:
        """The key's secret, created on first use."""
        key = self._secret(key_id)
        data = self.r.hgetall(key)
        if not data.get("secret"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hsetnx(key, "secret", new_secret())
            pipe.hsetnx(key, "created_at", datetime.now(UTC).isoformat())
            pipe.hgetall(key)
            *_, data = pipe.execute()
        return _decode_secret(data)

    def rotate_secret(
        self, key_id: str, *, grace_s: float, now: datetime | None = None
    ) -> WebhookSecretRecord:
        """A new secret; the one it replaces keeps signing (as a second signature) for ``grace_s``.
        A rotation during the grace period of the last one drops the oldest secret at once."""
        now = now or datetime.now(UTC)
        self._rotate(
            keys=[self._secret(key_id)],
            args=[new_secret(), now.isoformat(), (now + timedelta(seconds=grace_s)).isoformat()],
        )
        return _decode_secret(self.r.hgetall(self._secret(key_id)))


def _encode_delivery(record: DeliveryRecord) -> str:
    return json.dumps(
        {
            "webhook_id": record.webhook_id,
            "comparison_id": record.comparison_id,
            "event": record.event,
            "label": record.label,
            "callback": record.callback,
            "url": record.url,
            "key_id": record.key_id,
            "body": record.body,
            "created_at": record.created_at.isoformat(),
            "state": record.state,
            "attempts": [
                {
                    "at": a.at.isoformat(),
                    "duration_ms": a.duration_ms,
                    "status_code": a.status_code,
                    "error": a.error,
                }
                for a in record.attempts
            ],
            "next_attempt_at": record.next_attempt_at.isoformat() if record.next_attempt_at else None,
        }
    )


def _decode_delivery(raw: str) -> DeliveryRecord:
    data = json.loads(raw)
    return DeliveryRecord(
        webhook_id=data["webhook_id"],
        comparison_id=data["comparison_id"],
        event=data["event"],
        label=data.get("label"),
        callback=int(data["callback"]),
        url=data["url"],
        key_id=data["key_id"],
        body=data["body"],
        created_at=datetime.fromisoformat(data["created_at"]),
        state=data["state"],
        attempts=tuple(
            DeliveryAttempt(
                at=datetime.fromisoformat(a["at"]),
                duration_ms=float(a["duration_ms"]),
                status_code=a.get("status_code"),
                error=a.get("error"),
            )
            for a in data.get("attempts", [])
        ),
        next_attempt_at=datetime.fromisoformat(data["next_attempt_at"])
        if data.get("next_attempt_at")
        else None,
    )


def _decode_secret(data: dict[str, str]) -> WebhookSecretRecord:
    expires = data.get("previous_expires_at")
    return WebhookSecretRecord(
        secret=data["secret"],
        created_at=datetime.fromisoformat(data["created_at"]),
        previous=data.get("previous") or None,
        previous_expires_at=datetime.fromisoformat(expires) if expires else None,
    )
