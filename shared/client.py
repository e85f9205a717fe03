"""Typed HTTP client of the llm-compare API, for other services, scripts and the ``llm-compare``
command.

    with ComparisonClient("http://127.0.0.1:8000", api_key=key) as client:
        created = client.submit(spec)                     # ComparisonRead, status queued
        final = client.wait(created.id, timeout=600, on_update=print)
        table = client.results(created.id)                # ComparisonResults
        frame = client.results_frame(created.id)          # a pandas DataFrame (pandas needed)

``AsyncComparisonClient`` has the same methods as coroutines. Answers are the API's own response
models from ``shared.schemas``, so client and server read one contract. An answer of 400 or more
raises ``ApiError`` (status, error code, message, field problems); a network failure that
outlives the retries raises httpx's ``TransportError``. 429 and 503 are retried as
``RetryPolicy`` says, honouring ``Retry-After``; ``submit`` sends an ``Idempotency-Key`` of its
own, the same on every retry, so a retried submission is queued once.

This module imports only httpx, pydantic and the standard library (pandas when a DataFrame is
asked for), so a service can install it without the gateway's or the workers' dependencies.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import itertools
import json
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.backoff import backoff_seconds, parse_retry_after
from shared.results import result_columns
from shared.schemas import (
    AuditRead,
    ComparisonCreate,
    ComparisonPage,
    ComparisonRead,
    ComparisonResults,
    ComparisonStatus,
    DeliveriesRead,
    ErrorRead,
    FieldErrorRead,
    MatchupRead,
    MetricRead,
    ModelRead,
    RatingRead,
    RatingsRead,
    VoteRead,
    VotesRead,
    VoteWinner,
    WebhookSecretRead,
)
from shared.webhook_signing import WebhookVerificationError
from shared.webhook_signing import verify as verify_webhook

if TYPE_CHECKING:
    import pandas

__all__ = [
    "FINAL_STATUSES",
    "ApiError",
    "AsyncComparisonClient",
    "ComparisonClient",
    "RetryPolicy",
    "WebhookVerificationError",
    "parse_sse",
    "results_dataframe",
    "verify_webhook",
]

FINAL_STATUSES = {status.value for status in ComparisonStatus if status.is_final}

# The server sends a comment at least every 15 s; a stream silent for this long is dead.
STREAM_READ_TIMEOUT_S = 60.0

T = TypeVar("T")
Spec = ComparisonCreate | Mapping[str, Any]
# A dataset file: a path (its name tells .jsonl from .csv), or (file name, content).
DataFile = str | PathLike[str] | tuple[str, bytes]
OnUpdate = Callable[[ComparisonRead], object]


# ---------------------------------------------------------------- errors and retries


class ApiError(RuntimeError):
    """An answer of 400 or more from the API.

    ``status_code``; ``code``, the body's ``error`` (invalid_request, unauthorized, forbidden,
    not_found, conflict, rate_limited, payload_too_large, unavailable…, or ``http_error`` when
    the body is not the API's error JSON, e.g. from a proxy); ``message``; ``fields``, the
    problems of a refused request (``FieldErrorRead``: ``field`` and ``message``);
    ``retry_after`` in seconds when the answer said; ``body``, the decoded body as sent."""

    def __init__(self, response: httpx.Response):
        self.status_code = response.status_code
        try:
            self.body: Any = response.json()
        except ValueError:
            self.body = response.text
        error: ErrorRead | None = None
        if isinstance(self.body, dict):
            with contextlib.suppress(ValidationError):
                error = ErrorRead.model_validate(self.body)
        self.code = error.error if error else "http_error"
        self.message = error.message if error else (response.text[:500] or response.reason_phrase)
        self.fields: list[FieldErrorRead] = error.fields if error else []
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        super().__init__(f"HTTP {response.status_code}: {self.message}")


@dataclass(frozen=True)
class RetryPolicy:
    """When a request is sent again, and after how long.

    An answer with a status in ``statuses`` (429 and 503: nothing was done) is retried after its
    ``Retry-After`` plus up to ``backoff_s`` of jitter, or, without one, after an exponential
    back-off with jitter (``backoff_s``, doubling, capped at ``max_backoff_s``). A
    ``Retry-After`` longer than ``max_retry_after_s`` is not waited for: the ApiError is raised
    at once, carrying it. Network failures are retried too when ``transport_errors`` is true:
    a connection that was never made, for any request; any failure, for requests whose effect
    happens at most once (reads, and submissions, which carry an Idempotency-Key). No other
    4xx is retried. ``attempts`` counts every try, the first included: 1 turns retrying off.
    """

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0
    statuses: frozenset[int] = frozenset({429, 503})
    transport_errors: bool = True

    def backoff(self, attempt: int) -> float:
        """The pause after failed try number ``attempt`` (1-based): half the exponential step,
        plus a random part up to the other half, so that clients refused together spread out."""
        return backoff_seconds(attempt - 1, base_s=self.backoff_s, max_s=self.max_backoff_s)

    def delay_after_response(
        self, attempt: int, response: httpx.Response, *, idempotent: bool
    ) -> float | None:
        if attempt >= self.attempts:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        retryable = response.status_code in self.statuses
        # A submission whose Idempotency-Key is still being processed by an earlier try (its
        # answer was lost) gets 409 with Retry-After: waiting for it is what makes the retry
        # safe, so this is the one 4xx besides 429 that is retried.
        retryable = retryable or (response.status_code == 409 and idempotent and retry_after is not None)
        if not retryable:
            return None
        if retry_after is None:
            return self.backoff(attempt)
        if retry_after > self.max_retry_after_s:
            return None
        return retry_after + random.uniform(0, self.backoff_s)

    def delay_after_error(
        self, attempt: int, error: httpx.TransportError, *, idempotent: bool
    ) -> float | None:
        if attempt >= self.attempts or not self.transport_errors:
            return None
        never_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
        return self.backoff(attempt) if never_sent or idempotent else None


# ---------------------------------------------------------------- Server-Sent Events


class _SseParser:
    """Server-Sent Events, one line (without its line ending) at a time."""

    def __init__(self) -> None:
        self.event = ""
        self.data: builtins.list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            item = (self.event or "message", "\n".join(self.data)) if self.data else None
            self.event, self.data = "", []
            return item
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) for each event in a Server-Sent Events stream, given its lines without line
    endings. Comments (the server's ``: keep-alive``) and events without data are skipped; ``id``
    and ``retry`` are ignored, since callers fall back to polling instead of reconnecting."""
    parser = _SseParser()
    for line in lines:
        item = parser.feed(line)
        if item is not None:
            yield item


# ---------------------------------------------------------------- results as a DataFrame


def _import_pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(
            "results_frame() needs pandas, which is not installed: `pip install pandas`, or read "
            "the results typed with results() or as CSV with results_csv()"
        ) from exc
    return pandas


def results_dataframe(results: ComparisonResults) -> pandas.DataFrame:
    """One row per dataset row, indexed by ``row``: ``input``, ``reference`` and the dataset's
    other columns, then per candidate its output (a column named by its label), one
    ``<label>/<metric>`` column per score (NaN where unscored), ``<label>/error`` when one of its
    rows has no output because its request failed, ``<label>/thumbs_up``, ``<label>/thumbs_down``
    and ``<label>/comments`` (a list of {rater, rating, comment}): the columns of ``?format=csv``,
    with numbers as numbers and missing values as missing."""
    pd = _import_pandas()
    layout = result_columns(results)
    columns = ["input", "reference", *layout.extra]
    for label in results.candidates:
        columns += layout.of_candidate(label)
    records = []
    for row in results.rows:
        extras = row.model_extra or {}
        record: dict[str, Any] = {"input": row.input, "reference": row.reference}
        record.update((column, extras.get(column)) for column in layout.extra)
        for label in results.candidates:
            out = row.outputs.get(label)
            record[label] = out.output if out else None
            for metric in layout.scores[label]:
                value = out.scores.get(metric) if out else None
                record[f"{label}/{metric}"] = float("nan") if value is None else value
            if label in layout.with_errors:
                record[f"{label}/error"] = out.error if out else None
            record[f"{label}/thumbs_up"] = out.ratings.up if out else 0
            record[f"{label}/thumbs_down"] = out.ratings.down if out else 0
            record[f"{label}/comments"] = [c.model_dump() for c in out.ratings.comments] if out else []
        records.append(record)
    index = pd.Index([row.index for row in results.rows], name="row")
    return pd.DataFrame.from_records(records, index=index, columns=columns)


# ---------------------------------------------------------------- the calls, shared by both clients


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request of the API and how its answer is read."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    form: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, bytes]] | None = None
    headers: Mapping[str, str] | None = None
    # Sending it twice has the effect of sending it once: a read, or a submission with its key.
    idempotent: bool = False


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: model.model_validate_json(response.content)


_MODEL_LIST = TypeAdapter(builtins.list[ModelRead])
_METRIC_LIST = TypeAdapter(builtins.list[MetricRead])


def _comparison_path(comparison_id: str, *rest: str) -> str:
    if not comparison_id:
        raise ValueError("comparison_id is empty")
    # Quoted whole, dots too: httpx resolves a '..' segment, so an id of '..' (or holding '/')
    # would otherwise send the request to another route.
    return "/".join(["/v1/comparisons", quote(comparison_id, safe="").replace(".", "%2E"), *rest])


def _spec_body(spec: Spec) -> dict[str, Any]:
    if isinstance(spec, ComparisonCreate):
        # Only what the caller set: the server applies its own defaults, as for a JSON body.
        return spec.model_dump(mode="json", exclude_unset=True)
    return dict(spec)


def _read_data(data: DataFile) -> tuple[str, bytes]:
    if isinstance(data, tuple):
        return data
    path = Path(data)
    return path.name, path.read_bytes()


def _without_none(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class _Calls:
    """Every endpoint as a ``_Call``; the clients only send them."""

    @staticmethod
    def submit(spec: Spec, *, idempotency_key: str | None, data: DataFile | None) -> _Call[ComparisonRead]:
        # One key per logical submission, generated here so that every retry carries the same.
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        decode = _model(ComparisonRead)
        if data is None:
            return _Call(
                "POST", "/v1/comparisons", decode, json=_spec_body(spec), headers=headers, idempotent=True
            )
        if isinstance(spec, ComparisonCreate):
            raise ValueError(
                "a ComparisonCreate carries its dataset: with data=, pass the spec as a dict "
                "without 'dataset'"
            )
        filename, content = _read_data(data)
        return _Call(
            "POST",
            "/v1/comparisons",
            decode,
            form={"spec": json.dumps(_spec_body(spec))},
            files={"file": (filename, content)},
            headers=headers,
            idempotent=True,
        )

    @staticmethod
    def get(comparison_id: str) -> _Call[ComparisonRead]:
        return _Call("GET", _comparison_path(comparison_id), _model(ComparisonRead), idempotent=True)

    @staticmethod
    def list(status: ComparisonStatus | str | None, limit: int, offset: int) -> _Call[ComparisonPage]:
        params = _without_none(
            status=ComparisonStatus(status).value if status else None, limit=limit, offset=offset
        )
        return _Call("GET", "/v1/comparisons", _model(ComparisonPage), params=params, idempotent=True)

    @staticmethod
    def results(comparison_id: str) -> _Call[ComparisonResults]:
        return _Call(
            "GET", _comparison_path(comparison_id, "results"), _model(ComparisonResults), idempotent=True
        )

    @staticmethod
    def results_csv(comparison_id: str) -> _Call[str]:
        path = _comparison_path(comparison_id, "results")
        return _Call("GET", path, lambda r: r.text, params={"format": "csv"}, idempotent=True)

    @staticmethod
    def cancel(comparison_id: str) -> _Call[ComparisonRead]:
        return _Call("POST", _comparison_path(comparison_id, "cancel"), _model(ComparisonRead))

    @staticmethod
    def votes(comparison_id: str) -> _Call[VotesRead]:
        return _Call("GET", _comparison_path(comparison_id, "votes"), _model(VotesRead), idempotent=True)

    @staticmethod
    def vote(comparison_id: str, body: dict[str, Any]) -> _Call[VoteRead]:
        return _Call("POST", _comparison_path(comparison_id, "votes"), _model(VoteRead), json=body)

    @staticmethod
    def matchup(comparison_id: str, voter: str | None) -> _Call[MatchupRead]:
        path = _comparison_path(comparison_id, "arena", "matchups")
        return _Call("POST", path, _model(MatchupRead), json=_without_none(voter=voter))

    @staticmethod
    def ratings(comparison_id: str) -> _Call[RatingsRead]:
        return _Call("GET", _comparison_path(comparison_id, "ratings"), _model(RatingsRead), idempotent=True)

    @staticmethod
    def rate(comparison_id: str, body: dict[str, Any]) -> _Call[RatingRead]:
        # A rater's rating of a cell is replaced, not added to: sending it twice is harmless.
        return _Call(
            "POST", _comparison_path(comparison_id, "ratings"), _model(RatingRead), json=body, idempotent=True
        )

    @staticmethod
    def audit(comparison_id: str) -> _Call[AuditRead]:
        return _Call("GET", _comparison_path(comparison_id, "audit"), _model(AuditRead), idempotent=True)

    @staticmethod
    def deliveries(comparison_id: str) -> _Call[DeliveriesRead]:
        path = _comparison_path(comparison_id, "deliveries")
        return _Call("GET", path, _model(DeliveriesRead), idempotent=True)

    @staticmethod
    def webhook_secret() -> _Call[WebhookSecretRead]:
        return _Call("GET", "/v1/webhooks/secret", _model(WebhookSecretRead), idempotent=True)

    @staticmethod
    def rotate_webhook_secret() -> _Call[WebhookSecretRead]:
        return _Call("POST", "/v1/webhooks/secret/rotate", _model(WebhookSecretRead))

    @staticmethod
    def models() -> _Call[builtins.list[ModelRead]]:
        return _Call("GET", "/v1/models", lambda r: _MODEL_LIST.validate_json(r.content), idempotent=True)

    @staticmethod
    def metrics() -> _Call[builtins.list[MetricRead]]:
        return _Call("GET", "/v1/metrics", lambda r: _METRIC_LIST.validate_json(r.content), idempotent=True)


def _vote_body(
    *,
    winner: VoteWinner,
    row: int | None,
    a: str | None,
    b: str | None,
    matchup: str | None,
    voter: str | None,
) -> dict[str, Any]:
    return _without_none(row=row, a=a, b=b, matchup=matchup, winner=winner, voter=voter)


def _rating_body(
    *, row: int, label: str, rating: Literal["up", "down"] | None, comment: str | None, rater: str | None
) -> dict[str, Any]:
    return {"row": row, "label": label, "rating": rating, **_without_none(comment=comment, rater=rater)}


def _timed_out(comparison_id: str, last: ComparisonRead | None, timeout: float | None) -> TimeoutError:
    status = last.status.value if last else "unknown"
    return TimeoutError(f"comparison {comparison_id} still {status} after {timeout or 0:g}s")


class _ClientBase:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retry: RetryPolicy,
        headers: Mapping[str, str] | None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self._headers = {"User-Agent": "llm-compare-client", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def _stream_timeout(self, base: httpx.Timeout, read: float) -> httpx.Timeout:
        return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


# ---------------------------------------------------------------- the sync client


class ComparisonClient(_ClientBase):
    """The API over HTTP, blocking. ``api_key`` is sent as ``Authorization: Bearer``;
    ``timeout`` (seconds, or an ``httpx.Timeout``) bounds each request; ``retry`` says what is
    retried (``RetryPolicy(attempts=1)`` turns it off). ``transport`` replaces httpx's own, e.g.
    ``httpx.WSGITransport``. Use it as a context manager, or call ``close()``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, headers=headers)
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=self._headers, transport=transport
        )

    def __enter__(self) -> ComparisonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    data=call.form,
                    files=call.files,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                delay = self.retry.delay_after_error(attempt, exc, idempotent=call.idempotent)
                if delay is None:
                    raise
            else:
                if response.status_code < 400:
                    return call.decode(response)
                delay = self.retry.delay_after_response(attempt, response, idempotent=call.idempotent)
                if delay is None:
                    raise ApiError(response)
            time.sleep(delay)

    # ------------------------------------------------------------ comparisons

    def submit(
        self, spec: Spec, *, idempotency_key: str | None = None, data: DataFile | None = None
    ) -> ComparisonRead:
        """Queue a comparison: ``spec`` as a dict or a ``ComparisonCreate``; with ``data`` (a
        .jsonl or .csv path, or (file name, content)), the dataset as a file and the spec as a
        dict without ``dataset``. An ``Idempotency-Key`` is sent, ``idempotency_key`` or a fresh
        one, the same on every retry: sending the same key and spec again within 24 h (say after
        a timeout) returns the first comparison instead of queueing a second."""
        return self._call(_Calls.submit(spec, idempotency_key=idempotency_key, data=data))

    def submit_file(
        self, spec: Mapping[str, Any], filename: str, content: bytes, *, idempotency_key: str | None = None
    ) -> ComparisonRead:
        """``submit`` with the dataset as the file ``filename`` holding ``content``."""
        return self.submit(spec, idempotency_key=idempotency_key, data=(filename, content))

    def get(self, comparison_id: str) -> ComparisonRead:
        return self._call(_Calls.get(comparison_id))

    def list(
        self, *, status: ComparisonStatus | str | None = None, limit: int = 20, offset: int = 0
    ) -> ComparisonPage:
        """Comparisons this key may read, newest first."""
        return self._call(_Calls.list(status, limit, offset))

    def results(self, comparison_id: str) -> ComparisonResults:
        """Every dataset row with every candidate's output, scores and ratings."""
        return self._call(_Calls.results(comparison_id))

    def results_frame(self, comparison_id: str) -> pandas.DataFrame:
        """The results as a pandas DataFrame (see ``results_dataframe``); needs pandas."""
        _import_pandas()  # before the request: a missing pandas is said at once
        return results_dataframe(self.results(comparison_id))

    def results_csv(self, comparison_id: str) -> str:
        """The results as CSV text, one row per dataset row (what ``?format=csv`` sends)."""
        return self._call(_Calls.results_csv(comparison_id))

    def cancel(self, comparison_id: str) -> ComparisonRead:
        """Cancel a queued or running comparison; 409 once it has ended."""
        return self._call(_Calls.cancel(comparison_id))

    def audit(self, comparison_id: str) -> AuditRead:
        """Who submitted, cancelled, voted on and rated it, oldest first."""
        return self._call(_Calls.audit(comparison_id))

    def deliveries(self, comparison_id: str) -> DeliveriesRead:
        """Its webhook deliveries: event, URL, webhook-id, state and every attempt."""
        return self._call(_Calls.deliveries(comparison_id))

    def events(
        self,
        comparison_id: str,
        *,
        read_timeout: float = STREAM_READ_TIMEOUT_S,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[str, str]]:
        """The comparison's Server-Sent Events as (event, data): ``comparison`` with the full state
        JSON on connect and on every change, then ``end`` with the final state, after which the
        server closes the stream. The server sends a comment at least every 15 s, so a read that
        waits ``read_timeout`` seconds means the stream is dead (``httpx.ReadTimeout``). Once
        ``stop`` is set the stream ends at its next line, keep-alive comments included."""
        with self._event_stream(comparison_id, read_timeout) as response:
            lines = response.iter_lines()
            if stop is not None:
                lines = itertools.takewhile(lambda _: not stop.is_set(), lines)
            yield from parse_sse(lines)

    @contextlib.contextmanager
    def _event_stream(self, comparison_id: str, read_timeout: float) -> Iterator[httpx.Response]:
        with self.http.stream(
            "GET",
            _comparison_path(comparison_id, "events"),
            headers={"Accept": "text/event-stream"},
            timeout=self._stream_timeout(self.http.timeout, read_timeout),
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            yield response

    def wait(
        self,
        comparison_id: str,
        *,
        timeout: float | None = 1800,
        on_update: OnUpdate | None = None,
        poll_s: float = 1.0,
        stream: bool = True,
        on_fallback: Callable[[str], object] | None = None,
    ) -> ComparisonRead:
        """Block until the comparison ends and return its final state; ``TimeoutError`` after
        ``timeout`` seconds (None: no limit; it keeps running). ``on_update`` gets every state
        seen on the way. States come from the Server-Sent Events stream; when it is unavailable
        or breaks (an older API, a proxy that buffers), or with ``stream=False``, from polling
        every ``poll_s`` seconds, and ``on_fallback`` is told why."""
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        seen: builtins.list[ComparisonRead] = []

        def notify(state: ComparisonRead) -> None:
            seen[:] = [state]
            if on_update is not None:
                on_update(state)

        if stream:
            final = self._follow_stream(comparison_id, deadline, notify, on_fallback)
            if final is not None:
                return final
        while True:
            if time.monotonic() >= deadline:
                raise _timed_out(comparison_id, seen[-1] if seen else None, timeout)
            state = self.get(comparison_id)
            notify(state)
            if state.status.is_final:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(comparison_id, state, timeout)
            time.sleep(min(poll_s, remaining))

    def _follow_stream(
        self,
        comparison_id: str,
        deadline: float,
        notify: Callable[[ComparisonRead], None],
        on_fallback: Callable[[str], object] | None,
    ) -> ComparisonRead | None:
        """The final state from the stream; None when the stream fails or closes before the end
        (polling takes over; ``on_fallback`` is told why), or when the deadline passes (the
        caller raises)."""
        updates: queue.Queue[str | Exception | None] = queue.Queue()
        stop = threading.Event()
        # Read in a thread so that this one keeps the deadline while a read blocks between events.
        reader = threading.Thread(
            target=self._read_states,
            args=(comparison_id, updates, stop),
            name=f"llm-compare-events-{comparison_id}",
            daemon=True,
        )
        reader.start()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    # At most a second at a time: no deadline is too far for a queue's timeout.
                    item = updates.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    continue
                if not isinstance(item, str):
                    if on_fallback is not None:
                        on_fallback("the stream closed" if item is None else str(item) or type(item).__name__)
                    return None
                state = ComparisonRead.model_validate_json(item)
                notify(state)
                if state.status.is_final:
                    return state
        except ValidationError as exc:
            if on_fallback is not None:
                on_fallback(f"an event was not a comparison: {exc.error_count()} errors")
            return None
        finally:
            stop.set()

    def _read_states(self, comparison_id: str, updates: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            for event, data in self.events(comparison_id, stop=stop):
                if event in ("comparison", "end"):
                    updates.put(data)
            if not stop.is_set():
                updates.put(None)  # closed without an `end`: an API restart or a proxy's timeout
        except Exception as exc:  # noqa: BLE001 - any failure of the stream means polling instead
            updates.put(exc)

    # ------------------------------------------------------------ human evaluation

    def votes(self, comparison_id: str) -> VotesRead:
        """Every vote, the arena ranking and the agreement with the judge and the metrics."""
        return self._call(_Calls.votes(comparison_id))

    def vote(
        self,
        comparison_id: str,
        *,
        winner: VoteWinner,
        row: int | None = None,
        a: str | None = None,
        b: str | None = None,
        matchup: str | None = None,
        voter: str | None = None,
    ) -> VoteRead:
        """A pairwise vote on ``row`` between labels ``a`` and ``b``, or on a blind ``matchup``."""
        body = _vote_body(winner=winner, row=row, a=a, b=b, matchup=matchup, voter=voter)
        return self._call(_Calls.vote(comparison_id, body))

    def matchup(self, comparison_id: str, *, voter: str | None = None) -> MatchupRead:
        """Two candidates' outputs for one row, labels hidden, to vote on once."""
        return self._call(_Calls.matchup(comparison_id, voter))

    def ratings(self, comparison_id: str) -> RatingsRead:
        return self._call(_Calls.ratings(comparison_id))

    def rate(
        self,
        comparison_id: str,
        *,
        row: int,
        label: str,
        rating: Literal["up", "down"] | None,
        comment: str | None = None,
        rater: str | None = None,
    ) -> RatingRead:
        """Thumbs up or down (and a comment) on one output cell; None without a comment removes
        this rater's rating."""
        body = _rating_body(row=row, label=label, rating=rating, comment=comment, rater=rater)
        return self._call(_Calls.rate(comparison_id, body))

    # ------------------------------------------------------------ webhooks

    def webhook_secret(self) -> WebhookSecretRead:
        """This key's signing secret (created on first read), for ``verify_webhook``."""
        return self._call(_Calls.webhook_secret())

    def rotate_webhook_secret(self) -> WebhookSecretRead:
        """A new signing secret; the previous one keeps signing until ``previous_expires_at``."""
        return self._call(_Calls.rotate_webhook_secret())

    # ------------------------------------------------------------ catalog

    def models(self) -> builtins.list[ModelRead]:
        return self._call(_Calls.models())

    def metrics(self) -> builtins.list[MetricRead]:
        return self._call(_Calls.metrics())


# ---------------------------------------------------------------- the async client


class AsyncComparisonClient(_ClientBase):
    """``ComparisonClient``'s methods as coroutines, over ``httpx.AsyncClient``; ``events`` is an
    async iterator. Use it with ``async with``, or await ``close()``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, headers=headers)
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=self._headers, transport=transport
        )

    async def __aenter__(self) -> AsyncComparisonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    aclose = close

    async def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    data=call.form,
                    files=call.files,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                delay = self.retry.delay_after_error(attempt, exc, idempotent=call.idempotent)
                if delay is None:
                    raise
            else:
                if response.status_code < 400:
                    return call.decode(response)
                delay = self.retry.delay_after_response(attempt, response, idempotent=call.idempotent)
                if delay is None:
                    raise ApiError(response)
            await asyncio.sleep(delay)

    # ------------------------------------------------------------ comparisons

    async def submit(
        self, spec: Spec, *, idempotency_key: str | None = None, data: DataFile | None = None
    ) -> ComparisonRead:
        """See ``ComparisonClient.submit``."""
        return await self._call(_Calls.submit(spec, idempotency_key=idempotency_key, data=data))

    async def submit_file(
        self, spec: Mapping[str, Any], filename: str, content: bytes, *, idempotency_key: str | None = None
    ) -> ComparisonRead:
        return await self.submit(spec, idempotency_key=idempotency_key, data=(filename, content))

    async def get(self, comparison_id: str) -> ComparisonRead:
        return await self._call(_Calls.get(comparison_id))

    async def list(
        self, *, status: ComparisonStatus | str | None = None, limit: int = 20, offset: int = 0
    ) -> ComparisonPage:
        return await self._call(_Calls.list(status, limit, offset))

    async def results(self, comparison_id: str) -> ComparisonResults:
        return await self._call(_Calls.results(comparison_id))

    async def results_frame(self, comparison_id: str) -> pandas.DataFrame:
        _import_pandas()
        return results_dataframe(await self.results(comparison_id))

    async def results_csv(self, comparison_id: str) -> str:
        return await self._call(_Calls.results_csv(comparison_id))

    async def cancel(self, comparison_id: str) -> ComparisonRead:
        return await self._call(_Calls.cancel(comparison_id))

    async def audit(self, comparison_id: str) -> AuditRead:
        return await self._call(_Calls.audit(comparison_id))

    async def deliveries(self, comparison_id: str) -> DeliveriesRead:
        return await self._call(_Calls.deliveries(comparison_id))

    async def events(
        self, comparison_id: str, *, read_timeout: float = STREAM_READ_TIMEOUT_S
    ) -> AsyncGenerator[tuple[str, str], None]:
        """See ``ComparisonClient.events``."""
        async with self.http.stream(
            "GET",
            _comparison_path(comparison_id, "events"),
            headers={"Accept": "text/event-stream"},
            timeout=self._stream_timeout(self.http.timeout, read_timeout),
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise ApiError(response)
            parser = _SseParser()
            async for line in response.aiter_lines():
                item = parser.feed(line)
                if item is not None:
                    yield item

    async def wait(
        self,
        comparison_id: str,
        *,
        timeout: float | None = 1800,
        on_update: OnUpdate | None = None,
        poll_s: float = 1.0,
        stream: bool = True,
        on_fallback: Callable[[str], object] | None = None,
    ) -> ComparisonRead:
        """See ``ComparisonClient.wait``; ``on_update`` may also be a coroutine function."""
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        seen: builtins.list[ComparisonRead] = []

        async def notify(state: ComparisonRead) -> None:
            seen[:] = [state]
            if on_update is not None:
                result = on_update(state)
                if inspect.isawaitable(result):
                    await result

        def timed_out() -> TimeoutError:
            return _timed_out(comparison_id, seen[-1] if seen else None, timeout)

        if stream:
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(None if math.isinf(remaining) else remaining):
                    final = await self._follow_stream(comparison_id, notify, on_fallback)
            except TimeoutError:
                raise timed_out() from None
            if final is not None:
                return final
        while True:
            if time.monotonic() >= deadline:
                raise timed_out()
            state = await self.get(comparison_id)
            await notify(state)
            if state.status.is_final:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out()
            await asyncio.sleep(min(poll_s, remaining))

    async def _follow_stream(
        self,
        comparison_id: str,
        notify: Callable[[ComparisonRead], Any],
        on_fallback: Callable[[str], object] | None,
    ) -> ComparisonRead | None:
        try:
            async with contextlib.aclosing(self.events(comparison_id)) as events:
                async for event, data in events:
                    if event not in ("comparison", "end"):
                        continue
                    state = ComparisonRead.model_validate_json(data)
                    await notify(state)
                    if state.status.is_final:
                        return state
        except (httpx.HTTPError, ApiError, ValidationError) as exc:
            reason = str(exc) or type(exc).__name__  # the stream is unavailable or broke
        else:
            reason = "the stream closed"  # without an `end`
        if on_fallback is not None:
            on_fallback(reason)
        return None  # polling takes over

    # ------------------------------------------------------------ human evaluation

    async def votes(self, comparison_id: str) -> VotesRead:
        return await self._call(_Calls.votes(comparison_id))

    async def vote(
        self,
        comparison_id: str,
        *,
        winner: VoteWinner,
        row: int | None = None,
        a: str | None = None,
        b: str | None = None,
        matchup: str | None = None,
        voter: str | None = None,
    ) -> VoteRead:
        body = _vote_body(winner=winner, row=row, a=a, b=b, matchup=matchup, voter=voter)
        return await self._call(_Calls.vote(comparison_id, body))

    async def matchup(self, comparison_id: str, *, voter: str | None = None) -> MatchupRead:
        return await self._call(_Calls.matchup(comparison_id, voter))

    async def ratings(self, comparison_id: str) -> RatingsRead:
        return await self._call(_Calls.ratings(comparison_id))

    async def rate(
        self,
        comparison_id: str,
        *,
        row: int,
        label: str,
        rating: Literal["up", "down"] | None,
        comment: str | None = None,
        rater: str | None = None,
    ) -> RatingRead:
        body = _rating_body(row=row, label=label, rating=rating, comment=comment, rater=rater)
        return await self._call(_Calls.rate(comparison_id, body))

    # ------------------------------------------------------------ webhooks

    async def webhook_secret(self) -> WebhookSecretRead:
        return await self._call(_Calls.webhook_secret())

    async def rotate_webhook_secret(self) -> WebhookSecretRead:
        return await self._call(_Calls.rotate_webhook_secret())

    # ------------------------------------------------------------ catalog

    async def models(self) -> builtins.list[ModelRead]:
        return await self._call(_Calls.models())

    async def metrics(self) -> builtins.list[MetricRead]:
        return await self._call(_Calls.metrics())
