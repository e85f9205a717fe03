"""When to try an HTTP request again: a server's ``Retry-After`` and exponential back-off with
jitter. One rule for the client (shared/client.py), the judge and the endpoint requests, in the
standard library alone so that the client stays installable with httpx and pydantic only."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, or None when there is none or it is unreadable.
    RFC 9110 allows whole seconds or an HTTP date; fractional seconds, which some servers send,
    are read too. A date in the past, or a negative number, means now."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_seconds(attempt: int, *, base_s: float, max_s: float) -> float:
    """The pause before retry number ``attempt + 1`` (``attempt`` counts from 0): half of
    base * 2^attempt (capped at ``max_s``) plus a random part of the other half, so that many
    callers refused together do not come back together."""
    ceiling = min(max_s, base_s * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_wait(attempt: int, retry_after_s: float | None, *, base_s: float, max_s: float) -> float | None:
    """The pause before retrying after failed try ``attempt`` (from 0): the back-off, or the
    server's Retry-After when that is longer; None when the server asked for more than ``max_s``
    (waiting that long is giving up)."""
    if retry_after_s is not None and retry_after_s > max_s:
        return None
    wait = backoff_seconds(attempt, base_s=base_s, max_s=max_s)
    return wait if retry_after_s is None else max(wait, retry_after_s)
