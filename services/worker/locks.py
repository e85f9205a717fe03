"""A per-candidate lease in Redis, so that two deliveries of one candidate never run side by side.

With ``acks_late`` a task whose worker died is delivered again. The lease tells the new delivery
whether the earlier one is still alive: its holder renews it after every batch, so a lease that
has expired belongs to a dead worker and may be taken over.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import redis

# KEYS[1] lease key, ARGV[1] owner, ARGV[2] ttl seconds
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


class Lease:
    def __init__(self, client: redis.Redis, key: str, *, ttl_s: int):
        self.r: Any = client  # decode_responses=True: replies are str
        self.key = key
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.owner, nx=True, ex=self.ttl_s))

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.owner, self.ttl_s]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.owner])

    def holder(self) -> str | None:
        return self.r.get(self.key)
