"""LLM-as-judge: rubric scores (1-5 with a justification) and pairwise preferences.

A judge is either any OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI...: JUDGE_BASE_URL,
JUDGE_MODEL, JUDGE_API_KEY) or a local Hugging Face model the worker loads itself
(JUDGE_LOCAL_MODEL, any model string a candidate could use). Both answer many prompts at once:
the endpoint through a small thread pool, the local model through batched generation.

A judge is a service of its own and may be down, slow or rate-limited. Requests are retried on
429, 5xx, timeouts and dropped connections with exponential back-off and jitter (honouring
Retry-After), a bounded number of times, each bounded in time as a whole. A judge that stays
unavailable raises ``JudgeUnavailable`` and answers nothing more for that candidate: its judge
metrics are left unscored with the reason, never failing the candidate or the comparison.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog

# The fit lives in shared/ so the gateway ranks people's votes with the same code; re-exported
# here for the pairwise judging that uses it.
from shared.backoff import parse_retry_after, retry_wait
from shared.ranking import bradley_terry as bradley_terry
from shared.settings import Settings

Messages = list[dict[str, str]]

RUBRICS: dict[str, str] = {
    "correctness": (
        "Judge whether the answer is correct given the reference answer. 5: fully correct and "
        "consistent with the reference; 4: correct with minor omissions; 3: partly correct; "
        "2: mostly incorrect; 1: incorrect or unrelated."
    ),
    "helpfulness": (
        "Judge how helpful the answer is to the person who asked. 5: directly and completely "
        "addresses the question, clear and concise; 3: partly helpful or padded; 1: unhelpful, "
        "evasive or off-topic."
    ),
}

_SCORE_SYSTEM = (
    "You are a strict, fair evaluator of answers written by an AI assistant. Follow the rubric. "
    'Reply with JSON only: {"score": <integer 1-5>, "justification": "<one sentence>"}.'
)
_PAIR_SYSTEM = (
    "You compare two answers to the same question and pick the better one (correct, helpful, "
    'concise). Reply with JSON only: {"winner": "A" or "B" or "tie", "justification": "<one sentence>"}.'
)


log = structlog.get_logger()

# A chat completion with one short JSON verdict is a few hundred bytes; anything far bigger is
# not a judge's reply, and is not read into memory.
MAX_REPLY_BYTES = 1024 * 1024


class JudgeError(RuntimeError):
    """The judge could not give verdicts (misconfigured, refusing, or unreachable)."""


class JudgeUnavailable(JudgeError):
    """The judge stayed unavailable through every retry; later requests are not attempted."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Judge(Protocol):
    @property
    def name(self) -> str: ...

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]: ...


@dataclass
class EndpointJudge:
    """An OpenAI-compatible /chat/completions endpoint."""

    base_url: str
    model: str
    api_key: str | None = None
    # The whole reply of one request must arrive within this; retries come on top.
    timeout_s: float = 60.0
    concurrency: int = 8
    max_retries: int = 4
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0
    # Set once the judge stayed unavailable: nothing more is sent for this judge's candidate.
    unavailable: str | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def _post(self, client: httpx.Client, messages: Messages) -> str:
        """One request: its reply's text, or _Retryable / JudgeError."""
        deadline = time.monotonic() + self.timeout_s
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 256}
        try:
            with client.stream("POST", "/chat/completions", json=body) as response:
                received = bytearray()
                # httpx bounds each read; a server that trickles bytes is bounded here, in total.
                for chunk in response.iter_bytes():
                    received += chunk
                    if len(received) > MAX_REPLY_BYTES:
                        raise JudgeError(f"judge endpoint reply is larger than {MAX_REPLY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _Retryable(f"no complete reply within {self.timeout_s:g} s")
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except httpx.TimeoutException as exc:
            raise _Retryable(f"no reply within {self.timeout_s:g} s ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        text = received.decode("utf-8", "replace")
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {text[:300]}", retry_after)
        if status >= 400:
            # A refusal that retrying cannot change (a wrong key, an unknown model).
            raise JudgeError(f"judge endpoint answered HTTP {status}: {text[:300]}")
        try:
            return str(json.loads(text)["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise JudgeError(f"judge endpoint reply is not a chat completion: {text[:300]}") from exc

    def _complete(self, client: httpx.Client, messages: Messages) -> str:
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if self._stop.is_set():
                raise JudgeUnavailable(self.unavailable or "the judge is unavailable")
            try:
                return self._post(client, messages)
            except _Retryable as exc:
                failure = str(exc)
                wait = retry_wait(
                    attempt, exc.retry_after_s, base_s=self.retry_base_s, max_s=self.retry_max_s
                )
                if wait is None:
                    raise self._give_up(
                        f"it asked to retry after {exc.retry_after_s:g} s, longer than "
                        f"JUDGE_RETRY_MAX_S ({self.retry_max_s:g} s)"
                    ) from exc
            if attempt + 1 < attempts:
                log.info(
                    "judge.retry", judge=self.name, attempt=attempt + 1, wait_s=round(wait, 2), error=failure
                )
                # Wakes at once when another row gave up meanwhile.
                self._stop.wait(wait)
        raise self._give_up(f"{attempts} attempts failed, the last with {failure}")

    def _give_up(self, why: str) -> JudgeUnavailable:
        if self.unavailable is None:
            self.unavailable = f"judge {self.name} is unavailable: {why}"
            log.warning("judge.unavailable", judge=self.name, reason=self.unavailable)
        self._stop.set()
        return JudgeUnavailable(self.unavailable)

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        if self.unavailable is not None:
            raise JudgeUnavailable(self.unavailable)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        with (
            httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=timeout) as client,
            ThreadPoolExecutor(max_workers=self.concurrency) as pool,
        ):
            try:
                return list(pool.map(lambda m: self._complete(client, m), conversations))
            except JudgeError as exc:
                # Rows still queued or waiting give up at once instead of retrying on their own.
                self._stop.set()
                if self.unavailable is None:
                    self.unavailable = str(exc)
                raise


@dataclass
class UnavailableJudge:
    """Stands in for a judge that cannot be built (missing or broken configuration)."""

    reason: str

    @property
    def name(self) -> str:
        return "unavailable"

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        raise JudgeUnavailable(self.reason)


@dataclass
class LocalJudge:
    """A Hugging Face model loaded in this worker (cached like any candidate model)."""

    model: str
    settings: Settings
    max_new_tokens: int = 96

    @property
    def name(self) -> str:
        return f"local:{self.model}"

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        from services.worker.generation import generate_outputs
        from services.worker.models import ModelLoadError, shared_model_cache
        from shared.schemas import CandidateSpec

        try:
            loaded = shared_model_cache().get(self.model, revision=None, settings=self.settings)
        except ModelLoadError as exc:
            raise JudgeUnavailable(f"the local judge model could not be loaded: {exc}") from exc
        spec = CandidateSpec(
            label="judge", model=self.model, generation={"max_new_tokens": self.max_new_tokens}
        )
        try:
            prompts = [_render(loaded, messages) for messages in conversations]
            outputs = generate_outputs(
                candidate=spec,
                loaded=loaded,
                prompts=prompts,
                batch_size=self.settings.generation_batch_size,
                kv_cache_budget_bytes=self.settings.kv_cache_budget_bytes,
            )
        except (RuntimeError, ValueError) as exc:  # out of memory, a template the tokenizer rejects
            raise JudgeUnavailable(f"the local judge failed: {type(exc).__name__}: {exc}") from exc
        return [g.output for g in outputs]


def _render(loaded: Any, messages: Messages) -> str:
    if loaded.has_chat_template and not loaded.is_seq2seq:
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\nJSON:"


def judge_from_settings(settings: Settings) -> Judge | None:
    if settings.judge_base_url:
        if not settings.judge_model:
            raise JudgeError("JUDGE_BASE_URL is set but JUDGE_MODEL is not")
        return EndpointJudge(
            settings.judge_base_url,
            settings.judge_model,
            settings.judge_api_key,
            timeout_s=settings.judge_timeout_s,
            max_retries=settings.judge_max_retries,
            retry_base_s=settings.judge_retry_base_s,
            retry_max_s=settings.judge_retry_max_s,
        )
    if settings.judge_local_model:
        return LocalJudge(settings.judge_local_model, settings)
    return None


# ------------------------------------------------------------------------------------- scoring
def rubric_messages(rubric: str, question: str, answer: str, reference: str | None) -> Messages:
    parts = [f"Rubric: {rubric}", f"Question: {question}"]
    if reference is not None:
        parts.append(f"Reference answer: {reference}")
    parts.append(f"Answer to judge: {answer}")
    return [{"role": "system", "content": _SCORE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_SCORE_WORD = re.compile(r"score\W{0,5}([1-5])\b", re.IGNORECASE)


# A verdict is a short JSON object near the start (max_tokens 256); the scans below are
# quadratic on a reply of many unclosed "{", so a longer reply is only read this far.
_PARSED_CHARS = 8000


def _json_in(text: str) -> dict[str, Any] | None:
    for match in _JSON_OBJECT.finditer(text[:_PARSED_CHARS]):
        try:
            value = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_score(text: str) -> tuple[float | None, str]:
    """(score 1-5 or None when the reply holds none, justification)."""
    data = _json_in(text)
    if data is not None and "score" in data:
        try:
            score = float(data["score"])
        except (TypeError, ValueError):
            score = None
        if score is not None and 1 <= score <= 5:
            return score, str(data.get("justification", "")).strip()
    match = _SCORE_WORD.search(text)
    if match:
        return float(match.group(1)), text.strip()[:500]
    return None, f"unparseable judge reply: {text.strip()[:300]}"


def score_rows(
    judge: Judge,
    *,
    rubric: str,
    questions: Sequence[str],
    answers: Sequence[str],
    references: Sequence[str | None],
) -> tuple[list[float | None], list[str]]:
    replies = judge.complete_many(
        [rubric_messages(rubric, q, a, r) for q, a, r in zip(questions, answers, references, strict=True)]
    )
    parsed = [parse_score(reply) for reply in replies]
    return [p[0] for p in parsed], [p[1] for p in parsed]


# ------------------------------------------------------------------------------------ pairwise
def pair_messages(question: str, first: str, second: str, reference: str | None) -> Messages:
    parts = [f"Question: {question}"]
    if reference is not None:
        parts.append(f"Reference answer: {reference}")
    parts += [f"Answer A: {first}", f"Answer B: {second}"]
    return [{"role": "system", "content": _PAIR_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_winner(text: str) -> str | None:
    """ "A", "B", "tie", or None when the reply names no winner."""
    data = _json_in(text)
    value = str(data.get("winner", "")) if data else ""
    if not value:
        match = re.search(r"winner\W{0,5}(A|B|tie)\b", text, re.IGNORECASE)
        value = match.group(1) if match else ""
    value = value.strip().lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(value)


@dataclass(frozen=True)
class PairVerdict:
    row: int
    winner: str  # label of the better candidate, or "tie"
    first_order: str | None  # what the judge said with a shown first
    swapped_order: str | None  # with b shown first, mapped back to labels


def judge_pairs(
    judge: Judge,
    *,
    a: str,
    b: str,
    questions: Sequence[str],
    outputs_a: Sequence[str],
    outputs_b: Sequence[str],
    references: Sequence[str | None],
) -> list[PairVerdict]:
    """Ask for every row twice, with the order swapped to cancel position bias; a row where the
    two answers disagree (or either is unparseable) counts as a tie."""
    forward = [
        pair_messages(q, x, y, r)
        for q, x, y, r in zip(questions, outputs_a, outputs_b, references, strict=True)
    ]
    backward = [
        pair_messages(q, y, x, r)
        for q, x, y, r in zip(questions, outputs_a, outputs_b, references, strict=True)
    ]
    replies = judge.complete_many(forward + backward)
    verdicts = []
    for row in range(len(questions)):
        first = {"A": a, "B": b, "tie": "tie"}.get(parse_winner(replies[row]) or "")
        second = {"A": b, "B": a, "tie": "tie"}.get(parse_winner(replies[len(questions) + row]) or "")
        winner = first if first is not None and first == second else "tie"
        verdicts.append(PairVerdict(row=row, winner=winner, first_order=first, swapped_order=second))
    return verdicts
