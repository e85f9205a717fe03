"""LLM-as-judge: rubric scores (1-5 with a justification) and pairwise preferences.

A judge is either any OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI...: JUDGE_BASE_URL,
JUDGE_MODEL, JUDGE_API_KEY) or a local Hugging Face model the worker loads itself
(JUDGE_LOCAL_MODEL, any model string a candidate could use). Both answer many prompts at once:
the endpoint through a small thread pool, the local model through batched generation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

# The fit lives in shared/ so the gateway ranks people's votes with the same code; re-exported
# here for the pairwise judging that uses it.
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


class JudgeError(RuntimeError):
    pass


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
    timeout_s: float = 60.0
    concurrency: int = 8

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def _complete(self, client: httpx.Client, messages: Messages) -> str:
        response = client.post(
            "/chat/completions",
            json={"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 256},
        )
        if response.status_code >= 400:
            raise JudgeError(f"judge endpoint answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return str(response.json()["choices"][0]["message"]["content"])
        except (KeyError, IndexError, ValueError) as exc:
            raise JudgeError(f"judge endpoint reply is not a chat completion: {response.text[:300]}") from exc

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with (
            httpx.Client(
                base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s
            ) as client,
            ThreadPoolExecutor(max_workers=self.concurrency) as pool,
        ):
            return list(pool.map(lambda m: self._complete(client, m), conversations))


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
        from services.worker.models import shared_model_cache
        from shared.schemas import CandidateSpec

        loaded = shared_model_cache().get(self.model, revision=None, settings=self.settings)
        spec = CandidateSpec(
            label="judge", model=self.model, generation={"max_new_tokens": self.max_new_tokens}
        )
        prompts = [_render(loaded, messages) for messages in conversations]
        outputs = generate_outputs(
            candidate=spec,
            loaded=loaded,
            prompts=prompts,
            batch_size=self.settings.generation_batch_size,
            kv_cache_budget_bytes=self.settings.kv_cache_budget_bytes,
        )
        return [g.output for g in outputs]


def _render(loaded: Any, messages: Messages) -> str:
    if loaded.has_chat_template and not loaded.is_seq2seq:
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\nJSON:"


def judge_from_settings(settings: Settings) -> Judge | None:
    if settings.judge_base_url:
        if not settings.judge_model:
            raise JudgeError("JUDGE_BASE_URL is set but JUDGE_MODEL is not")
        return EndpointJudge(settings.judge_base_url, settings.judge_model, settings.judge_api_key)
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


def _json_in(text: str) -> dict[str, Any] | None:
    for match in _JSON_OBJECT.finditer(text):
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
