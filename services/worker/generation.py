"""Rendering prompts and generating outputs in batches."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.worker.models import LoadedModel
from shared.schemas import CandidateSpec

_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


class GenerationCancelled(Exception):
    pass


def render_user_text(template: str, row: dict[str, Any]) -> str:
    """Fill ``{column}`` placeholders from the row; ``{{`` and ``}}`` stand for literal braces."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(row[name]) if name in row and row[name] is not None else match.group(0)

    text = _PLACEHOLDER.sub(fill, template)
    return text.replace("{{", "{").replace("}}", "}")


def wants_chat_template(candidate: CandidateSpec, loaded: LoadedModel) -> bool:
    if candidate.use_chat_template == "auto":
        return loaded.has_chat_template and not loaded.is_seq2seq
    if candidate.use_chat_template and not loaded.has_chat_template:
        raise ValueError(
            f"use_chat_template is true but the tokenizer of {candidate.model!r} has no chat template; "
            "set it to 'auto' or false"
        )
    return bool(candidate.use_chat_template)


def render_prompt(candidate: CandidateSpec, loaded: LoadedModel, row: dict[str, Any], *, chat: bool) -> str:
    user_text = render_user_text(candidate.prompt_template, row)
    if chat:
        messages = []
        if candidate.system_prompt:
            messages.append({"role": "system", "content": candidate.system_prompt})
        messages.append({"role": "user", "content": user_text})
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if candidate.system_prompt:
        return f"{candidate.system_prompt}\n\n{user_text}"
    return user_text


@dataclass
class Generated:
    output: str
    output_tokens: int
    latency_s: float


def generation_kwargs(candidate: CandidateSpec, loaded: LoadedModel) -> dict[str, Any]:
    gen = candidate.generation
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "repetition_penalty": gen.repetition_penalty,
        "pad_token_id": loaded.tokenizer.pad_token_id,
    }
    if gen.stop:
        # Each row stops on its own once it produces a stop string; the text is cut below.
        kwargs.update(stop_strings=list(gen.stop), tokenizer=loaded.tokenizer)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:
        # Greedy decoding: clear sampling knobs a model's generation_config may carry, so that
        # transformers does not warn that they are ignored.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_outputs(
    *,
    candidate: CandidateSpec,
    loaded: LoadedModel,
    prompts: list[str],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Generated]:
    """Generate one output per prompt, in batches of similar length, keeping the input order.

    ``on_batch(rows_done, tokens_done)`` is called after each batch; it may raise
    GenerationCancelled to stop.
    """
    import torch

    tokenizer = loaded.tokenizer
    # Sorting by length keeps padding (wasted compute) low inside each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generated | None] = [None] * len(prompts)
    kwargs = generation_kwargs(candidate, loaded)
    torch.manual_seed(candidate.generation.seed)
    eos_ids = _eos_ids(loaded)
    done = 0
    tokens_done = 0
    start = 0
    size = batch_size
    while start < len(order):
        batch = order[start : start + size]
        try:
            outputs, seconds = _generate_batch(loaded, [prompts[i] for i in batch], kwargs)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            # Halve and retry the same rows: nothing is lost, the batch just gets smaller.
            size = max(1, size // 2)
            if loaded.device == "cuda":
                torch.cuda.empty_cache()
            continue
        per_row = seconds / len(batch)
        for index, token_ids in zip(batch, outputs, strict=True):
            ids = _strip_after_eos(token_ids, eos_ids, tokenizer.pad_token_id)
            text = _cut_at_stop(
                tokenizer.decode(ids, skip_special_tokens=True), candidate.generation.stop
            ).strip()
            results[index] = Generated(output=text, output_tokens=len(ids), latency_s=per_row)
            tokens_done += len(ids)
        start += len(batch)
        done += len(batch)
        if on_batch is not None:
            on_batch(done, tokens_done)
    return [r for r in results if r is not None]


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config, loaded.model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def _strip_after_eos(token_ids: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    kept = []
    for token in token_ids:
        if token in eos_ids:
            break
        kept.append(token)
    # Trailing padding only appears when pad differs from EOS.
    while kept and pad_id is not None and kept[-1] == pad_id and pad_id not in eos_ids:
        kept.pop()
    return kept


def _generate_batch(
    loaded: LoadedModel, prompts: list[str], kwargs: dict[str, Any]
) -> tuple[list[list[int]], float]:
    import torch

    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right" if loaded.is_seq2seq else "left"
    # Chat templates already carry the special tokens a model expects at the start.
    add_special = loaded.is_seq2seq or not _starts_with_bos(tokenizer, prompts[0])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    encoded = {k: v.to(loaded.device) for k, v in encoded.items()}
    started = time.perf_counter()
    with torch.inference_mode():
        generated = loaded.model.generate(**encoded, **kwargs)
    seconds = time.perf_counter() - started
    # Causal models echo the prompt; seq2seq outputs start with the decoder start token.
    cut = 1 if loaded.is_seq2seq else encoded["input_ids"].shape[1]
    generated = generated[:, cut:]
    return generated.tolist(), seconds


def _starts_with_bos(tokenizer: Any, prompt: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(str(bos))
