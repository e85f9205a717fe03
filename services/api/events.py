"""Server-Sent Events for one comparison: its state whenever it changes, until it ends.

The stream polls Redis rather than subscribing: workers write progress with plain HSETs (no
pub/sub), and one read of two keys every half second per open page is cheap next to a browser
polling the whole JSON itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.concurrency import run_in_threadpool

from services.api import service
from services.api.auth import Principal
from shared.settings import Settings
from shared.store import ComparisonStore

# Browsers reconnect after this many milliseconds when a stream drops.
RECONNECT_MS = 2000


def sse_message(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n"


async def comparison_events(
    *,
    comparison_id: str,
    store: ComparisonStore,
    settings: Settings,
    principal: Principal,
    is_disconnected: Callable[[], Awaitable[bool]],
    poll_s: float = 0.5,
    keepalive_s: float = 15.0,
) -> AsyncIterator[str]:
    """``comparison`` events with the full ComparisonRead JSON on connect and on every change,
    then one ``end`` event with the final state; comments keep idle proxies from closing it."""
    yield f"retry: {RECONNECT_MS}\n\n"
    last_payload = None
    last_sent = time.monotonic()
    while True:
        state = await run_in_threadpool(
            service.read_comparison,
            comparison_id=comparison_id,
            store=store,
            settings=settings,
            principal=principal,
        )
        payload = state.model_dump_json()
        if state.status.is_final:
            yield sse_message("end", payload)
            return
        if payload != last_payload:
            yield sse_message("comparison", payload)
            last_payload, last_sent = payload, time.monotonic()
        elif time.monotonic() - last_sent >= keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await is_disconnected():
            return
        await asyncio.sleep(poll_s)
