"""Webhooks: events emitted where they happen, delivered signed by the I/O workers.

emit        (model workers, from pipeline.py) -> one delivery per callback subscribed to the
            event, stored once per webhook id, then a ``webhook.deliver`` task on the I/O queue
deliver     (I/O workers) -> one attempt of a due delivery: the target checked again (allowlist,
            DNS, address rules), the request sent to exactly the address checked, signed with the
            submitting key's secret(s); the attempt recorded and the next one scheduled
sweep_due   (a thread in each I/O worker) -> a ``webhook.deliver`` task for each delivery whose
            next attempt is due

Delivery is at least once: a delivery's ``webhook-id`` never changes, an attempt holds a lock,
and a task that finds its delivery delivered, failed or not yet due does nothing, so a task sent
twice (a retry, the sweep, a redelivered message) costs at most one extra attempt. Waits between
attempts are kept in Redis's due set, never as broker countdowns.

This module imports neither torch, transformers nor mlflow: the I/O workers load it.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin

import httpcore
import httpx
import structlog

from services.worker.locks import Lease
from services.worker.step_task import Dispatch
from shared.records import DeliveryAttempt, DeliveryRecord
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import DELIVER_WEBHOOK
from shared.webhook_signing import signed_headers
from shared.webhook_store import WebhookStore
from shared.webhook_targets import Resolver, Target, TargetRefused, check_target, system_resolve
from shared.webhooks import event_body, webhook_id

log = structlog.get_logger()

# target, deadline (time.monotonic()) -> the transport one attempt sends through.
TransportFactory = Callable[[Target, float], httpx.BaseTransport]

USER_AGENT = "llm-compare-webhooks/1"
# Deliveries the sweep claims per round trip.
SWEEP_BATCH = 100
_MAX_ERROR_CHARS = 500


# ------------------------------------------------------------------------------- the transport
class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the attempt's deadline: per-read timeouts
    alone let a receiver that drips a byte at a time hold an I/O thread for hours."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self.inner = inner
        self.deadline = deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error("the attempt ran past WEBHOOK_TIMEOUT_S")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = self._left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, left), self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the address the check returned, never to a fresh DNS answer: a name that
    resolves elsewhere by the time of the request (DNS rebinding) still reaches the checked
    address. TLS still verifies the certificate against the URL's host name."""

    def __init__(self, target: Target, deadline: float):
        self.target = target
        self.deadline = deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        if not _same_host(host, self.target.host) or port != self.target.port:
            raise httpcore.ConnectError(f"{host}:{port} is not the checked target")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the attempt ran past WEBHOOK_TIMEOUT_S")
        stream = self._backend.connect_tcp(
            self.target.address,
            port,
            timeout=left if timeout is None else min(timeout, left),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are never sent over a Unix socket")


class PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport, its connection pool connecting through _PinnedBackend. No proxy
    from the environment (it would resolve the name itself), one connection, no keep-alive."""

    def __init__(self, target: Target, deadline: float):
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=1,
            max_keepalive_connections=0,
            network_backend=_PinnedBackend(target, deadline),
        )


def pinned_transport(target: Target, deadline: float) -> httpx.BaseTransport:
    return PinnedTransport(target, deadline)


# ----------------------------------------------------------------------------------- context
@dataclass
class WebhookContext:
    settings: Settings
    store: ComparisonStore
    # Sends a task by name with kwargs and a task id chosen by the caller.
    dispatch: Dispatch
    transport: TransportFactory = pinned_transport
    resolve: Resolver = system_resolve
    clock: Callable[[], float] = time.time
    hooks: WebhookStore = field(init=False)

    def __post_init__(self) -> None:
        self.hooks = WebhookStore(self.store)


def attempt_budget_s(settings: Settings) -> float:
    """How long one attempt may take on the network, every redirect hop included."""
    return settings.webhook_timeout_s * (settings.webhook_max_redirects + 1)


def attempt_window_s(settings: Settings) -> float:
    """An attempt's budget with room to record it: while it runs the due set holds the delivery
    this far ahead, and its lock lasts as long."""
    return attempt_budget_s(settings) + 30


# ---------------------------------------------------------------------------------------- emit
def emit(
    store: ComparisonStore,
    settings: Settings,
    dispatch: Dispatch,
    comparison_id: str,
    event: str,
    *,
    label: str | None = None,
) -> list[str]:
    """Record the event for every callback subscribed to it and send the first attempts.
    Returns the webhook ids of the deliveries this call created (none when it was emitted before)."""
    hooks = WebhookStore(store)
    key_id, callbacks = hooks.callbacks(comparison_id)
    subscribed = [(i, callback) for i, callback in enumerate(callbacks) if event in callback["events"]]
    if not subscribed:
        return []
    record = store.get(comparison_id)
    candidates = store.candidates(comparison_id, record.labels)
    if label is not None and not any(c.label == label and c.is_final for c in candidates):
        return []  # candidate.finished only once the candidate has ended
    at = datetime.now(UTC)
    body = event_body(event, record=record, candidates=candidates, settings=settings, at=at, label=label)
    first_delay = settings.webhook_retry_schedule_s[0]
    created = []
    for index, callback in subscribed:
        delivery = DeliveryRecord(
            webhook_id=webhook_id(comparison_id, event, index, label),
            comparison_id=comparison_id,
            event=event,
            label=label,
            callback=index,
            url=callback["url"],
            key_id=key_id,
            body=body,
            created_at=at,
            next_attempt_at=at + timedelta(seconds=first_delay),
        )
        # An immediate attempt goes out as a task now; the due set holds the delivery a window
        # ahead, so that the sweep sends it should that task be lost.
        due = at.timestamp() + (first_delay or attempt_window_s(settings))
        if hooks.create_delivery(delivery, due_at=due):
            created.append(delivery.webhook_id)
    if first_delay == 0:
        for created_id in created:
            try:
                dispatch(
                    DELIVER_WEBHOOK,
                    {"comparison_id": comparison_id, "webhook_id": created_id},
                    uuid.uuid4().hex,
                )
            except Exception as exc:  # noqa: BLE001 - the due set has it; the sweep sends it
                log.warning("webhook.dispatch_failed", comparison_id=comparison_id, error=repr(exc))
    if created:
        log.info(
            "webhook.emitted",
            comparison_id=comparison_id,
            event_type=event,
            label=label,
            deliveries=len(created),
        )
    return created


def emit_safely(
    store: ComparisonStore,
    settings: Settings,
    dispatch: Dispatch,
    comparison_id: str,
    event: str,
    *,
    label: str | None = None,
) -> list[str]:
    """emit, never raising: a receiver's bookkeeping must not fail the comparison it reports on."""
    try:
        return emit(store, settings, dispatch, comparison_id, event, label=label)
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "webhook.emit_failed", comparison_id=comparison_id, event_type=event, label=label, error=repr(exc)
        )
        return []


# ------------------------------------------------------------------------------------- deliver
def deliver(ctx: WebhookContext, comparison_id: str, webhook_id: str) -> str:
    """One attempt of the delivery, if it is pending and due. Returns its state afterwards, or
    why nothing was sent (busy, not_due, gone)."""
    window = attempt_window_s(ctx.settings)
    lease = Lease(ctx.store.r, ctx.hooks.lock_key(webhook_id), ttl_s=math.ceil(window))
    if not lease.acquire():
        return "busy"  # another attempt is running; if its worker dies, the due set brings it back
    try:
        return _deliver_locked(ctx, comparison_id, webhook_id, window)
    finally:
        lease.release()


def _deliver_locked(ctx: WebhookContext, comparison_id: str, webhook_id: str, window: float) -> str:
    hooks = ctx.hooks
    record = hooks.delivery(comparison_id, webhook_id)
    if record is None:  # expired with its comparison
        hooks.unschedule(comparison_id, webhook_id)
        return "gone"
    if record.state != "pending":
        hooks.unschedule(comparison_id, webhook_id)
        return record.state
    now = ctx.clock()
    if record.next_attempt_at is not None and record.next_attempt_at.timestamp() > now + 1:
        # A stale task (sent twice, or a message redelivered late): the record knows when the
        # next attempt is due; make sure the due set does too.
        hooks.schedule(comparison_id, webhook_id, at=record.next_attempt_at.timestamp())
        return "not_due"
    hooks.schedule(comparison_id, webhook_id, at=now + window)
    attempt = attempt_delivery(ctx, record)
    attempts = (*record.attempts, attempt)
    schedule = ctx.settings.webhook_retry_schedule_s
    finished = ctx.clock()
    if attempt.error is None:
        updated = replace(record, attempts=attempts, state="delivered", next_attempt_at=None)
    elif len(attempts) < len(schedule):
        next_at = finished + schedule[len(attempts)]
        updated = replace(
            record,
            attempts=attempts,
            state="pending",
            next_attempt_at=datetime.fromtimestamp(next_at, UTC),
        )
    else:
        updated = replace(record, attempts=attempts, state="failed", next_attempt_at=None)
    hooks.save_delivery(updated)
    if updated.next_attempt_at is not None:
        hooks.schedule(comparison_id, webhook_id, at=updated.next_attempt_at.timestamp())
    else:
        hooks.unschedule(comparison_id, webhook_id)
    log.info(
        "webhook.attempted",
        comparison_id=comparison_id,
        webhook_id=webhook_id,
        event_type=record.event,
        attempt=len(attempts),
        status_code=attempt.status_code,
        error=attempt.error,
        state=updated.state,
    )
    return updated.state


class _Redirect(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def attempt_delivery(ctx: WebhookContext, record: DeliveryRecord) -> DeliveryAttempt:
    """Send the delivery once; never raises. The error says what a person would check."""
    started_at = datetime.now(UTC)
    started = time.monotonic()
    deadline = started + attempt_budget_s(ctx.settings)
    status: int | None = None
    error: str | None = None
    try:
        status = _post(ctx, record, deadline)
        if not 200 <= status < 300:
            error = f"the receiver answered {status}; a 2xx status acknowledges a delivery"
    except _Redirect as exc:
        status, error = exc.status, str(exc)
    except TargetRefused as exc:
        error = f"refused: {exc}"
    except httpx.TimeoutException:
        error = f"no complete answer within {ctx.settings.webhook_timeout_s:g} s (WEBHOOK_TIMEOUT_S)"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - recorded as a failed attempt and retried
        log.exception("webhook.attempt_error", webhook_id=record.webhook_id)
        error = f"{type(exc).__name__}: {exc}"
    return DeliveryAttempt(
        at=started_at,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
        status_code=status,
        error=error[:_MAX_ERROR_CHARS] if error else None,
    )


def _post(ctx: WebhookContext, record: DeliveryRecord, deadline: float) -> int:
    settings = ctx.settings
    body = record.body.encode()
    now = ctx.clock()
    signing = ctx.hooks.secret(record.key_id).signing_secrets(datetime.fromtimestamp(now, UTC))
    headers = signed_headers(signing, msg_id=record.webhook_id, timestamp=int(now), body=body)
    headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
    url = record.url
    for hop in range(settings.webhook_max_redirects + 1):
        # Every hop is checked as the callback was at submit time, with a fresh DNS answer.
        target = check_target(url, settings.webhook_allowlist, resolve=ctx.resolve)
        left = max(0.001, deadline - time.monotonic())
        with (
            httpx.Client(
                transport=ctx.transport(target, deadline),
                timeout=httpx.Timeout(min(settings.webhook_timeout_s, left)),
                follow_redirects=False,
                trust_env=False,
            ) as client,
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            _read_capped(response, settings.webhook_max_response_bytes)
            status = response.status_code
            location = response.headers.get("location")
        if not 300 <= status < 400:
            return status
        if status in (307, 308) and location and hop < settings.webhook_max_redirects:
            url = urljoin(url, location)
            continue
        raise _Redirect(
            status,
            f"the receiver answered {status} (a redirect), which is not followed"
            + ("" if status in (307, 308) else " (only 307 and 308 keep the POST)")
            + "; point the callback at the final URL",
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _read_capped(response: httpx.Response, limit: int) -> None:
    """Read at most ``limit`` bytes of the answer, then let the connection close."""
    if response.is_stream_consumed:  # a response built in memory (tests' transports)
        return
    read = 0
    for chunk in response.iter_raw():
        read += len(chunk)
        if read >= limit:
            break


# --------------------------------------------------------------------------------------- sweep
def sweep_due(ctx: WebhookContext, *, limit: int = SWEEP_BATCH) -> int:
    """Send a task for each delivery whose next attempt is due. Returns how many it claimed."""
    claimed = ctx.hooks.claim_due(now=ctx.clock(), hold_s=attempt_window_s(ctx.settings), limit=limit)
    for comparison_id, claimed_id in claimed:
        try:
            ctx.dispatch(
                DELIVER_WEBHOOK, {"comparison_id": comparison_id, "webhook_id": claimed_id}, uuid.uuid4().hex
            )
        except Exception as exc:  # noqa: BLE001 - claimed, it comes due again after the window
            log.warning("webhook.dispatch_failed", comparison_id=comparison_id, error=repr(exc))
    return len(claimed)


def start_sweeper(make_context: Callable[[], WebhookContext], *, interval_s: float) -> threading.Event:
    """Sweep the due set every ``interval_s`` in a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        ctx: WebhookContext | None = None
        while not stop.wait(interval_s):
            try:
                ctx = ctx or make_context()
                while sweep_due(ctx) >= SWEEP_BATCH and not stop.is_set():
                    pass
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("webhook.sweep_failed", error=repr(exc))

    threading.Thread(target=loop, name="webhook-sweep", daemon=True).start()
    log.info("webhook.sweep_started", interval_s=interval_s)
    return stop
