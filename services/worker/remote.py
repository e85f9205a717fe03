"""An endpoint candidate's outputs, generated on a remote OpenAI-compatible endpoint.

Runs on the I/O workers (services/worker/io_app.py), so it never imports torch, transformers or
mlflow. One task per candidate (``comparison.generate_remote``):

1. holds the candidate's lease (the same one its scoring step takes later), so that two
   deliveries never generate side by side, and fences its writes with it;
2. sends the first row alone: its reply names the model the server actually serves, which keys
   the response cache together with the endpoint, the model id, the settings and the prompt;
3. takes what it can from the cache and sends the other rows from a pool of threads, each request
   holding one of the endpoint's slots (a Redis semaphore shared by every I/O worker, at most
   ``max_concurrency`` minus what 429s took away: the adaptive limit halves on a 429 and grows
   back by one slot per limit-many successes);
4. retries a request answered 429 or 5xx, timed out or dropped, with exponential back-off and
   jitter, honouring ``Retry-After``; a row still failing is recorded as failed with its reason;
5. stores the rows with their usage, latency and time to first token, and hands the candidate
   to the model workers' queue (``comparison.run_candidate``), which scores the stored rows with
   mlflow.evaluate() in the candidate's MLflow run like any other candidate's.

The candidate's end (succeeded, failed, cancelled) is always decided by that scoring step, so
the I/O worker never needs MLflow: a generation that cannot go on (unknown endpoint, missing key,
a refusal, too many failed rows) is stored with its reason, and a cancelled one hands over
without rows.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import httpx
import structlog

from services.worker.cache_keys import row_keys
from services.worker.locks import CandidateWriter, Lease
from services.worker.step_task import Dispatch, HandOff, candidate_lease, dispatch_step
from shared.backoff import parse_retry_after, retry_wait
from shared.endpoints import EndpointConfig, parse_endpoint_model
from shared.prompts import render_user_text
from shared.schemas import CandidateSpec, CandidateState, ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore, utcnow
from shared.tasks import RUN_CANDIDATE

log = structlog.get_logger()


# Set when this I/O worker is shutting down: running generations stop sending and give their
# candidate back to the queue (rows already answered are in the response cache).
STOP = threading.Event()

# A completion is text; a reply far bigger than any max_tokens allows is not read into memory.
MAX_REPLY_BYTES = 8 * 1024 * 1024
# Request threads per generation task; the endpoint's slots bound what is in flight anyway.
MAX_THREADS = 64
# A slot is held at most the request's timeout plus this, then frees itself (a dead worker's).
SLOT_MARGIN_S = 10.0
# A thread waiting for a slot asks Redis again after a pause that doubles from MIN to MAX.
SLOT_POLL_MIN_S = 0.002
SLOT_POLL_MAX_S = 0.05
PROGRESS_EVERY_S = 1.0
# Statuses a server may answer a streaming request it cannot stream with: asked again without.
_NO_STREAM_STATUSES = {400, 415, 422, 501}
CACHE_KEY_VERSION = 1


# ------------------------------------------------------------------------------------- requests
def request_body(
    candidate: CandidateSpec, endpoint: EndpointConfig, model_id: str, row: dict[str, Any]
) -> dict[str, Any]:
    """The candidate's template, system prompt and generation settings as one request. The
    gateway refused what an endpoint cannot take (top_k, repetition_penalty, a chat template on
    the completions API), so nothing here is dropped."""
    gen = candidate.generation
    user_text = render_user_text(candidate.prompt_template, row)
    body: dict[str, Any] = {"model": model_id}
    if endpoint.api == "chat":
        messages = []
        if candidate.system_prompt:
            messages.append({"role": "system", "content": candidate.system_prompt})
        messages.append({"role": "user", "content": user_text})
        body["messages"] = messages
    else:
        body["prompt"] = f"{candidate.system_prompt}\n\n{user_text}" if candidate.system_prompt else user_text
    body["max_tokens"] = gen.max_new_tokens
    # Greedy decoding is temperature 0 on these APIs; top_p only means something when sampling.
    body["temperature"] = gen.temperature if gen.do_sample else 0
    if gen.do_sample:
        body["top_p"] = gen.top_p
    body["seed"] = gen.seed
    if gen.stop:
        body["stop"] = list(gen.stop)
    return body


def prompt_text(body: dict[str, Any]) -> str:
    """What the model was sent, as text for the eval table: the prompt, or the chat messages."""
    if "prompt" in body:
        return str(body["prompt"])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in body["messages"])


@dataclass
class Reply:
    output: str
    input_tokens: int | None
    output_tokens: int | None
    ttft_s: float | None
    served_model: str | None
    system_fingerprint: str | None


class Retryable(Exception):
    def __init__(self, message: str, *, retry_after_s: float | None = None, congested: bool = False):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.congested = congested


class RowFailed(Exception):
    """This row's request cannot succeed by asking again (a 400 for this prompt, say)."""


class EndpointRefused(Exception):
    """The endpoint refuses every request (wrong key, unknown model): the candidate fails."""


class Stopped(Exception):
    """The generation was asked to stop (cancel, shutdown, another row's refusal)."""


def _usage(data: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def _text_of(choice: dict[str, Any], *, chat: bool, delta: bool) -> str:
    if chat:
        message = choice.get("delta" if delta else "message") or {}
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


def _error_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return " ".join(text.split())[:300]


def send_once(
    client: httpx.Client, endpoint: EndpointConfig, body: dict[str, Any], *, stream: bool
) -> tuple[Reply, float]:
    """One request; (its reply, seconds from sending it until the whole reply arrived). Raises
    Retryable, RowFailed or EndpointRefused. The whole reply must arrive within timeout_s."""
    chat = endpoint.api == "chat"
    payload = dict(body)
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    started = time.monotonic()
    deadline = started + endpoint.timeout_s
    try:
        with client.stream("POST", endpoint.path, json=payload) as response:
            status = response.status_code
            if status != 200:
                raw = _read_limited(response, 65536)
                _refuse(status, raw, response.headers.get("Retry-After"), endpoint, body, stream)
            content_type = response.headers.get("content-type", "")
            if "text/event-stream" in content_type:
                reply = _read_stream(response, chat=chat, started=started, deadline=deadline)
            else:
                reply = _read_json(response, chat=chat, deadline=deadline)
    except httpx.TimeoutException as exc:
        raise Retryable(f"no reply within {endpoint.timeout_s:g} s ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise Retryable(f"connection failed: {type(exc).__name__}: {exc}") from exc
    return reply, time.monotonic() - started


class _NoStream(Exception):
    """The server refused a streaming request; ask again without streaming."""


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """The start of an error reply: enough to say why, never a whole hostile body."""
    received = bytearray()
    for chunk in response.iter_bytes():
        received += chunk
        if len(received) >= limit:
            break
    return bytes(received[:limit])


def _refuse(
    status: int,
    raw: bytes,
    retry_after: str | None,
    endpoint: EndpointConfig,
    body: dict[str, Any],
    stream: bool,
) -> NoReturn:
    text = _error_text(raw)
    if status == 429:
        raise Retryable(f"HTTP 429: {text}", retry_after_s=parse_retry_after(retry_after), congested=True)
    if status >= 500 or status == 408:
        raise Retryable(f"HTTP {status}: {text}", retry_after_s=parse_retry_after(retry_after))
    if status in (401, 403):
        who = f"the key in {endpoint.api_key_env}" if endpoint.api_key_env else "requests without a key"
        raise EndpointRefused(f"endpoint {endpoint.name!r} refused {who}: HTTP {status}: {text}")
    if status == 404:
        raise EndpointRefused(
            f"endpoint {endpoint.name!r} answered HTTP 404 for model {body.get('model')!r} on "
            f"{endpoint.path} (api: {endpoint.api}): {text}"
        )
    if stream and status in _NO_STREAM_STATUSES:
        raise _NoStream(f"HTTP {status}: {text}")
    raise RowFailed(f"HTTP {status}: {text}")


def _read_json(response: httpx.Response, *, chat: bool, deadline: float) -> Reply:
    received = bytearray()
    for chunk in response.iter_bytes():
        received += chunk
        if len(received) > MAX_REPLY_BYTES:
            raise RowFailed(f"the reply is larger than {MAX_REPLY_BYTES} bytes")
        if time.monotonic() > deadline:
            raise Retryable("the reply did not complete within the timeout")
    try:
        data = json.loads(received)
        choice = data["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RowFailed(f"the reply is not a completion: {_error_text(bytes(received))}") from exc
    input_tokens, output_tokens = _usage(data)
    return Reply(
        output=_text_of(choice, chat=chat, delta=False),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_s=None,
        served_model=data.get("model") if isinstance(data.get("model"), str) else None,
        system_fingerprint=data.get("system_fingerprint")
        if isinstance(data.get("system_fingerprint"), str)
        else None,
    )


def _read_stream(response: httpx.Response, *, chat: bool, started: float, deadline: float) -> Reply:
    parts: list[str] = []
    size = 0
    ttft: float | None = None
    input_tokens = output_tokens = None
    served_model = fingerprint = None
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            raise Retryable("the streamed reply did not complete within the timeout")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise RowFailed(f"a streamed chunk is not JSON: {_error_text(payload)}") from exc
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            # vLLM and others report a failure that happens mid-stream as a chunk.
            raise Retryable(f"the server failed mid-stream: {_error_text(json.dumps(chunk['error']))}")
        served_model = chunk.get("model") if isinstance(chunk.get("model"), str) else served_model
        if isinstance(chunk.get("system_fingerprint"), str):
            fingerprint = chunk["system_fingerprint"]
        if chunk.get("usage"):
            input_tokens, output_tokens = _usage(chunk)
        for choice in chunk.get("choices") or []:
            text = _text_of(choice, chat=chat, delta=True)
            if text:
                if ttft is None:
                    ttft = time.monotonic() - started
                parts.append(text)
                size += len(text)
        if size > MAX_REPLY_BYTES:
            raise RowFailed(f"the reply is larger than {MAX_REPLY_BYTES} bytes")
    return Reply(
        output="".join(parts),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_s=ttft,
        served_model=served_model,
        system_fingerprint=fingerprint,
    )


# ----------------------------------------------------------------------------------------- rows
@dataclass
class RowResult:
    output: str | None
    error: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    cost: float | None = None
    served_model: str | None = None
    system_fingerprint: str | None = None
    attempts: int = 0
    cached: bool = False
    prompt: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def cache_entry(self) -> str:
        keep = ("output", "input_tokens", "output_tokens", "latency_s", "ttft_s", "served_model")
        return json.dumps(
            {k: v for k, v in asdict(self).items() if k in keep} | {"fp": self.system_fingerprint}
        )


# Per process and endpoint: at most max_concurrency of this process's request threads wait for a
# slot in Redis at once. The others (several candidates on one endpoint, each with its own pool)
# wait here, without polling Redis.
_LOCAL_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_LOCAL_SLOTS_LOCK = threading.Lock()


def _local_slots(endpoint: EndpointConfig) -> threading.BoundedSemaphore:
    key = (endpoint.name, endpoint.max_concurrency)
    with _LOCAL_SLOTS_LOCK:
        if key not in _LOCAL_SLOTS:
            _LOCAL_SLOTS[key] = threading.BoundedSemaphore(endpoint.max_concurrency)
        return _LOCAL_SLOTS[key]


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


@dataclass
class EndpointCaller:
    """Requests to one endpoint for one candidate: a slot each, retries, the streaming fallback."""

    store: ComparisonStore
    endpoint: EndpointConfig
    settings: Settings
    stop: threading.Event
    stops: list[str] = field(default_factory=list)
    api_key: str | None = None
    # Cleared once the server refused a streaming request and answered without.
    stream: bool = True
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> EndpointCaller:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.endpoint.timeout_s, connect=min(10.0, self.endpoint.timeout_s))
        limits = httpx.Limits(max_connections=min(self.endpoint.max_concurrency, MAX_THREADS))
        self._client = httpx.Client(
            base_url=self.endpoint.base_url, headers=headers, timeout=timeout, limits=limits
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()

    def _acquire(self) -> str:
        """One of the endpoint's slots (shared by every I/O worker through Redis); release it
        with _release."""
        local = _local_slots(self.endpoint)
        while not local.acquire(timeout=0.2):
            if self.stop.is_set():
                raise Stopped()
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        try:
            pause_s = SLOT_POLL_MIN_S
            while not self.store.endpoint_acquire(
                self.endpoint.name,
                token,
                max_concurrency=self.endpoint.max_concurrency,
                hold_s=self.endpoint.timeout_s + SLOT_MARGIN_S,
            ):
                if self.stop.is_set():
                    raise Stopped()
                # Polled with jitter, the pause doubling up to SLOT_POLL_MAX_S: a slot freed soon
                # is taken within milliseconds, and a limit cut by 429s is not met with a storm
                # of Redis calls from every waiting thread.
                time.sleep(random.uniform(pause_s / 2, pause_s))
                pause_s = min(pause_s * 2, SLOT_POLL_MAX_S)
        except BaseException:
            local.release()
            raise
        return token

    def _release(self, token: str) -> None:
        try:
            self.store.endpoint_release(self.endpoint.name, token)
        finally:
            _local_slots(self.endpoint).release()

    def _send(self, body: dict[str, Any]) -> tuple[Reply, float]:
        assert self._client is not None, "use EndpointCaller as a context manager"
        with self._lock:
            self.requests += 1
            stream = self.stream
        try:
            return send_once(self._client, self.endpoint, body, stream=stream)
        except _NoStream:
            with self._lock:
                self.requests += 1
            reply, seconds = send_once(self._client, self.endpoint, body, stream=False)
            if self.stream:
                log.info("endpoint.no_streaming", endpoint=self.endpoint.name)
                self.stream = False
            return reply, seconds

    def call(self, body: dict[str, Any]) -> RowResult:
        """One row: retried on 429, 5xx, timeouts and dropped connections; RowResult with the
        reason when it still fails. Raises Stopped or EndpointRefused."""
        attempts = self.settings.endpoint_max_retries + 1
        failure = ""
        for attempt in range(attempts):
            if self.stop.is_set():
                raise Stopped()
            token = self._acquire()
            try:
                reply, latency = self._send(body)
            except Retryable as exc:
                failure = str(exc)
                if exc.congested:
                    self.store.endpoint_congested(
                        self.endpoint.name, max_concurrency=self.endpoint.max_concurrency
                    )
                wait_s = retry_wait(
                    attempt,
                    exc.retry_after_s,
                    base_s=self.settings.endpoint_retry_base_s,
                    max_s=self.settings.endpoint_retry_max_s,
                )
                if wait_s is None:
                    return RowResult(
                        output=None,
                        error=f"{failure}; it asked to retry after {exc.retry_after_s:g} s, longer than "
                        f"ENDPOINT_RETRY_MAX_S ({self.settings.endpoint_retry_max_s:g} s)",
                        attempts=attempt + 1,
                    )
            except RowFailed as exc:
                return RowResult(output=None, error=str(exc), attempts=attempt + 1)
            else:
                self.store.endpoint_succeeded(
                    self.endpoint.name, max_concurrency=self.endpoint.max_concurrency
                )
                output = _cut_at_stop(reply.output, self.stops).strip()
                return RowResult(
                    output=output,
                    input_tokens=reply.input_tokens,
                    output_tokens=reply.output_tokens,
                    latency_s=latency,
                    ttft_s=reply.ttft_s,
                    cost=self.endpoint.cost(reply.input_tokens, reply.output_tokens),
                    served_model=reply.served_model,
                    system_fingerprint=reply.system_fingerprint,
                    attempts=attempt + 1,
                )
            finally:
                # Never held while waiting out a back-off: others may use the slot meanwhile.
                self._release(token)
            if attempt + 1 < attempts:
                with self._lock:
                    self.retries += 1
                log.info(
                    "endpoint.retry",
                    endpoint=self.endpoint.name,
                    attempt=attempt + 1,
                    wait_s=round(wait_s, 2),
                    error=failure,
                )
                if self.stop.wait(wait_s):
                    raise Stopped()
        return RowResult(
            output=None, error=f"{attempts} attempts failed, the last with {failure}", attempts=attempts
        )


def cache_keys(
    *,
    candidate: CandidateSpec,
    endpoint: EndpointConfig,
    model_id: str,
    served_model: str,
    prompts: list[str],
) -> list[str]:
    """Response-cache keys: the endpoint, the model id, the model the server said it served, the
    settings and the prompt (and, when sampling, which occurrence of the prompt the row is)."""
    base = {
        "v": CACHE_KEY_VERSION,
        "source": "endpoint",
        "endpoint": endpoint.name,
        "api": endpoint.api,
        "model_id": model_id,
        "served_model": served_model,
        "generation": candidate.generation.model_dump(),
        "template": candidate.prompt_template,
        "system_prompt": candidate.system_prompt,
    }
    return row_keys(base, prompts, do_sample=candidate.generation.do_sample)


def _from_cache(raw: str, endpoint: EndpointConfig, prompt: str) -> RowResult:
    data = json.loads(raw)
    return RowResult(
        output=data["output"],
        input_tokens=data.get("input_tokens"),
        output_tokens=data.get("output_tokens"),
        latency_s=data.get("latency_s"),
        ttft_s=data.get("ttft_s"),
        # Priced by today's table: the same tokens cost what the endpoint charges now.
        cost=endpoint.cost(data.get("input_tokens"), data.get("output_tokens")),
        served_model=data.get("served_model"),
        system_fingerprint=data.get("fp"),
        cached=True,
        prompt=prompt,
    )


# ------------------------------------------------------------------------------- the generation
@dataclass
class RemoteContext:
    settings: Settings
    store: ComparisonStore
    dispatch: Dispatch


def generate_remote(ctx: RemoteContext, comparison_id: str, label: str) -> str:
    """Generate an endpoint candidate's rows and hand it to its scoring step. Returns what happened."""
    lease = candidate_lease(ctx.store, ctx.settings, comparison_id, label)
    if not isinstance(lease, Lease):
        return lease.value
    with lease.kept_alive():
        outcome = _generate_locked(ctx, comparison_id, label, lease)
    # Once the lease is free, so that the scoring step finds it so. A process that dies right
    # here leaves the rows stored: the reconciler queues the scoring step (pipeline.queue_candidate).
    hand_to_scoring(ctx, comparison_id, label)
    return outcome


def hand_to_scoring(ctx: RemoteContext, comparison_id: str, label: str) -> str:
    """Queue the candidate's scoring step on the model workers' queue (which also ends it when it
    was cancelled or its generation failed), the way pipeline.queue_candidate does."""
    task_id = dispatch_step(ctx, RUN_CANDIDATE, comparison_id, label, {"label": label})
    ctx.store.record_task(comparison_id, label, task_id)
    return task_id


def give_up(ctx: RemoteContext, comparison_id: str, label: str, message: str) -> None:
    """The generation task failed for good: store why (unless another delivery holds the lease)
    and hand the candidate to its scoring step, which fails it with that reason."""
    store = ctx.store
    lease = Lease(store.r, store.lease_key(comparison_id, label), ttl_s=ctx.settings.candidate_lease_s)
    if not lease.acquire():
        log.info("remote.give_up_skipped", comparison_id=comparison_id, label=label, holder=lease.holder())
        return
    try:
        if not store.has_remote_generation(comparison_id, label):
            CandidateWriter(store, comparison_id, label, lease).generation({"error": message[:2000]})
    finally:
        lease.release()
    hand_to_scoring(ctx, comparison_id, label)


def _generate_locked(ctx: RemoteContext, comparison_id: str, label: str, lease: Lease) -> str:
    store, settings = ctx.store, ctx.settings
    writer = CandidateWriter(store, comparison_id, label, lease)
    if store.candidate(comparison_id, label).is_final:
        return "ended"
    if store.status(comparison_id) is ComparisonStatus.cancelled:
        return "cancelled"
    if store.has_remote_generation(comparison_id, label):
        return "generated"  # a redelivery after the rows were stored
    spec = store.spec(comparison_id)
    candidate = spec.candidate(label)
    parsed = parse_endpoint_model(candidate.model)
    endpoint = settings.endpoints.get(parsed[0]) if parsed else None
    if parsed is None or endpoint is None:
        configured = ", ".join(sorted(settings.endpoints)) or "none"
        writer.generation(
            {
                "error": f"{candidate.model!r} names no endpoint configured on the I/O workers "
                f"(ENDPOINTS_FILE; configured: {configured})"
            }
        )
        return "failed"
    api_key = None
    if endpoint.api_key_env:
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            writer.generation(
                {
                    "error": f"the environment variable {endpoint.api_key_env} (api_key_env of endpoint "
                    f"{endpoint.name!r}) is not set on the I/O workers"
                }
            )
            return "failed"
    if not writer.transition(
        CandidateState.running, allowed_from=[CandidateState.queued, CandidateState.running]
    ):
        return "ended"
    writer.fields(worker=f"{socket.gethostname()}:{os.getpid()}", generation_started_at=utcnow())
    rows = store.rows(comparison_id)
    model_id = parsed[1]
    log.info(
        "remote.started", comparison_id=comparison_id, label=label, endpoint=endpoint.name, rows=len(rows)
    )
    stop = threading.Event()
    with EndpointCaller(
        store=store,
        endpoint=endpoint,
        settings=settings,
        stop=stop,
        stops=list(candidate.generation.stop),
        api_key=api_key,
    ) as caller:
        run = _Run(
            ctx=ctx,
            comparison_id=comparison_id,
            candidate=candidate,
            endpoint=endpoint,
            model_id=model_id,
            rows=rows,
            caller=caller,
            writer=writer,
            use_cache=spec.cache,
        )
        return run.generate()


@dataclass
class _Run:
    ctx: RemoteContext
    comparison_id: str
    candidate: CandidateSpec
    endpoint: EndpointConfig
    model_id: str
    rows: list[dict[str, Any]]
    caller: EndpointCaller
    writer: CandidateWriter
    use_cache: bool

    def generate(self) -> str:
        started = time.monotonic()
        bodies = [request_body(self.candidate, self.endpoint, self.model_id, row) for row in self.rows]
        prompts = [prompt_text(body) for body in bodies]
        total = len(bodies)
        results: list[RowResult | None] = [None] * total
        self.writer.progress(done=0, total=total)
        try:
            # The first row alone: its reply names the model actually served (part of the cache
            # key), and one request rather than many finds out whether the server streams and
            # takes the key.
            first = self.caller.call(bodies[0]) if bodies else None
            if first is not None:
                first.prompt = prompts[0]
                results[0] = first
            served = first.served_model if first is not None and first.ok else None
            keys = (
                cache_keys(
                    candidate=self.candidate,
                    endpoint=self.endpoint,
                    model_id=self.model_id,
                    served_model=served,
                    prompts=prompts,
                )
                if self.use_cache and served
                else None
            )
            if keys is not None and first is not None and first.ok:
                self.ctx.store.cache_responses(
                    {keys[0]: first.cache_entry()}, ttl_s=self.ctx.settings.result_ttl_s
                )
            hits = 0
            if keys is not None and total > 1:
                for index, raw in enumerate(self.ctx.store.cached_responses(keys[1:]), start=1):
                    if raw is not None:
                        results[index] = _from_cache(raw, self.endpoint, prompts[index])
                        hits += 1
            self.writer.fields(cache_hits=hits)
            missing = [i for i in range(total) if results[i] is None]
            self._send_all(missing, bodies, prompts, keys, results, started)
        except Stopped:
            return self._stopped()
        except EndpointRefused as exc:
            self.caller.stop.set()
            self.writer.generation({"error": str(exc)})
            log.warning(
                "remote.refused", comparison_id=self.comparison_id, label=self.candidate.label, error=str(exc)
            )
            return "failed"
        done = [r for r in results if r is not None]
        assert len(done) == total
        return self._store(done, time.monotonic() - started)

    def _send_all(
        self,
        missing: list[int],
        bodies: list[dict[str, Any]],
        prompts: list[str],
        keys: list[str] | None,
        results: list[RowResult | None],
        started: float,
    ) -> None:
        if not missing:
            self._report(results, started)
            return

        def one(index: int) -> RowResult:
            result = self.caller.call(bodies[index])
            result.prompt = prompts[index]
            if keys is not None and result.ok:
                # Row by row: a generation handed back on shutdown resumes from here.
                self.ctx.store.cache_responses(
                    {keys[index]: result.cache_entry()}, ttl_s=self.ctx.settings.result_ttl_s
                )
            return result

        threads = max(1, min(self.endpoint.max_concurrency, len(missing), MAX_THREADS))
        with ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"remote-{self.endpoint.name}"
        ) as pool:
            pending: dict[Future[RowResult], int] = {pool.submit(one, i): i for i in missing}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
                    for future in finished:
                        results[pending.pop(future)] = future.result()
                    self._report(results, started)
                    self._check_stop()
            except BaseException:
                # Rows waiting for a slot or a back-off give up at once; requests in flight end
                # within their timeout.
                self.caller.stop.set()
                for future in pending:
                    future.cancel()
                raise

    def _check_stop(self) -> None:
        # A lost lease needs no check here: the progress write before this one is fenced by it.
        if STOP.is_set():
            raise Stopped()
        if self.ctx.store.status(self.comparison_id) is ComparisonStatus.cancelled:
            raise Stopped()

    def _report(self, results: list[RowResult | None], started: float) -> None:
        done = [r for r in results if r is not None]
        fresh = [r for r in done if not r.cached]
        elapsed = time.monotonic() - started
        tokens = sum(r.output_tokens or 0 for r in fresh)
        remaining = len(results) - len(done)
        self.writer.progress(
            done=len(done),
            total=len(results),
            tokens_per_second=tokens / elapsed if elapsed > 0 and tokens else None,
            eta_s=elapsed / len(fresh) * remaining
            if fresh and remaining
            else (0.0 if not remaining else None),
        )

    def _stopped(self) -> str:
        self.caller.stop.set()
        if STOP.is_set():
            log.info("remote.handed_off", comparison_id=self.comparison_id, label=self.candidate.label)
            raise HandOff()
        log.info("remote.cancelled", comparison_id=self.comparison_id, label=self.candidate.label)
        return "cancelled"

    def _store(self, results: list[RowResult], seconds: float) -> str:
        settings = self.ctx.settings
        failed = [r for r in results if not r.ok]
        fresh = [r for r in results if r.ok and not r.cached]
        ok = [r for r in results if r.ok]
        served = Counter(r.served_model for r in ok if r.served_model)
        fingerprints = Counter(r.system_fingerprint for r in ok if r.system_fingerprint)
        output_fresh = sum(r.output_tokens or 0 for r in fresh)
        costs = [r.cost for r in ok]
        totals: dict[str, float | None] = {
            "input_tokens": float(sum(r.input_tokens or 0 for r in ok)),
            "output_tokens": float(sum(r.output_tokens or 0 for r in ok)),
            "cost": float(sum(c for c in costs if c is not None))
            if any(c is not None for c in costs)
            else None,
            "generation_seconds": round(seconds, 3),
            "tokens_per_second": output_fresh / seconds if fresh and seconds > 0 else None,
            "requests": float(self.caller.requests),
            "retries": float(self.caller.retries),
        }
        record: dict[str, Any] = {
            "endpoint": self.endpoint.name,
            "api": self.endpoint.api,
            "model_id": self.model_id,
            "served_model": served.most_common(1)[0][0] if served else None,
            "served_models": sorted(served),
            "system_fingerprint": fingerprints.most_common(1)[0][0] if fingerprints else None,
            "streamed": self.caller.stream,
            "response_cache": "on" if self.use_cache else "off",
            "cache_hits": sum(r.cached for r in results),
            "rows_failed": len(failed),
            "totals": totals,
            "rows": [asdict(r) for r in results],
            "error": None,
        }
        rate = len(failed) / len(results) if results else 0.0
        if rate > settings.endpoint_max_error_rate:
            reasons = Counter(r.error for r in failed).most_common(3)
            record["error"] = (
                f"{len(failed)} of {len(results)} rows failed ({rate:.0%}), more than "
                f"ENDPOINT_MAX_ERROR_RATE ({settings.endpoint_max_error_rate:.0%}) of endpoint "
                f"{self.endpoint.name!r}; most common: "
                + "; ".join(f"{reason} (x{count})" for reason, count in reasons)
            )[:2000]
        self.writer.fields(rows_failed=len(failed), totals=totals)
        self._report(list(results), started=time.monotonic() - seconds)
        self.writer.generation(record)
        log.info(
            "remote.generated",
            comparison_id=self.comparison_id,
            label=self.candidate.label,
            rows=len(results),
            failed=len(failed),
            cache_hits=record["cache_hits"],
            seconds=round(seconds, 2),
            requests=self.caller.requests,
            retries=self.caller.retries,
        )
        return "failed" if record["error"] else "generated"
