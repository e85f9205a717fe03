"""Leases in Redis, so that two deliveries of one step of a comparison never run side by side.

With ``acks_late`` a task whose worker died is delivered again, and the reconciler may queue a
step whose task was lost. The lease tells a new delivery whether an earlier one is still alive:
while a step runs, a heartbeat thread renews its lease every third of its time to live, so a
lease that has expired belongs to a process that died (or stalled for that long) and may be
taken over.

The lease's value (``token``) also fences writes: the store's fenced writes check it in the same
script as the write, so a process that lost its lease (it stalled, the lease lapsed, another
delivery took over) can no longer overwrite what the new holder writes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import structlog

if TYPE_CHECKING:
    from shared.schemas import CandidateState
    from shared.store import ComparisonStore

log = structlog.get_logger()

# KEYS[1] lease key, ARGV[1] token, ARGV[2] ttl seconds
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(Exception):
    """This process no longer holds the lease: another delivery owns the step now."""


class Lease:
    def __init__(self, client: redis.Redis, key: str, *, ttl_s: int):
        self.r: Any = client  # decode_responses=True: replies are str
        self.key = key
        self.ttl_s = ttl_s
        # Who holds it, readable in `redis-cli GET`: host, process and a nonce for this delivery.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def owner(self) -> str:
        return self.token

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, ex=self.ttl_s))

    def renew(self) -> bool:
        held = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_s]))
        if not held:
            self.lost.set()
        return held

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def holder(self) -> str | None:
        return self.r.get(self.key)

    def seconds_left(self) -> float:
        """How long until the current holder's lease lapses unless renewed (0 when free)."""
        ms = self.r.pttl(self.key)
        return max(0.0, ms / 1000) if ms and ms > 0 else 0.0

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.key} was lost")

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Lease]:
        """Renew the lease from a daemon thread while the body runs, whatever the body does
        (loading a model, a long batch, mlflow.evaluate); release it afterwards."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        log.warning("lease.lost", key=self.key, token=self.token)
                        return
                except redis.RedisError as exc:
                    # Keep trying: a short Redis outage must not hand the step to another worker.
                    log.warning("lease.renew_failed", key=self.key, error=str(exc))

        thread = threading.Thread(target=beat, name=f"lease-{self.key}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                self.release()


@dataclass
class CandidateWriter:
    """A candidate's writes while holding its lease: each is refused (LeaseLost) once another
    delivery has taken the lease over, in the same Redis round trip as the write."""

    store: ComparisonStore
    comparison_id: str
    label: str
    lease: Lease

    def fields(self, **fields: Any) -> None:
        self.store.fenced_set_candidate_fields(
            self.comparison_id, self.label, lease_key=self.lease.key, token=self.lease.token, **fields
        )

    def progress(self, **progress: Any) -> None:
        self.store.fenced_set_progress(
            self.comparison_id, self.label, lease_key=self.lease.key, token=self.lease.token, **progress
        )

    def outputs(self, outputs: list[dict[str, Any]]) -> None:
        self.store.fenced_save_outputs(
            self.comparison_id, self.label, outputs, lease_key=self.lease.key, token=self.lease.token
        )

    def generation(self, record: dict[str, Any]) -> None:
        """An endpoint candidate's generated rows (or why there are none), for its scoring step."""
        self.store.fenced_save_remote_generation(
            self.comparison_id, self.label, record, lease_key=self.lease.key, token=self.lease.token
        )

    def transition(self, new: CandidateState, *, allowed_from: list[CandidateState], **fields: Any) -> bool:
        return self.store.fenced_transition_candidate(
            self.comparison_id,
            self.label,
            new,
            allowed_from=allowed_from,
            lease_key=self.lease.key,
            token=self.lease.token,
            **fields,
        )
