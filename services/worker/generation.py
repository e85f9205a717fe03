"""Rendering prompts and generating outputs in batches."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from services.worker.models import LoadedModel
from shared.prompts import render_user_text
from shared.schemas import CandidateSpec


class GenerationCancelled(Exception):
    pass


class PromptTooLong(ValueError):
    """A rendered prompt does not fit: the candidate fails before generating anything."""


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


def context_length(loaded: LoadedModel) -> int | None:
    """Tokens the model attends over, prompt and output together, when its config says."""
    config: Any = getattr(loaded.model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (1e30).
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None


def check_prompt_lengths(
    prompts: list[str], *, candidate: CandidateSpec, loaded: LoadedModel, max_prompt_tokens: int
) -> None:
    """Raise PromptTooLong naming the first row whose prompt is over ``max_prompt_tokens``
    (MAX_PROMPT_TOKENS), or that with max_new_tokens does not fit the model's context length.

    The gateway bounds prompts in characters; tokens are known only here. Past the context
    length a model fails or degrades, and on CPU the attention cache of a very long prompt can
    take more memory than the host has: an out-of-memory kill is redelivered to the next
    worker, again and again, instead of failing once.
    """
    if not prompts:
        return
    # Counted as generation will encode them (_generate_batch).
    add_special = loaded.is_seq2seq or not _starts_with_bos(loaded.tokenizer, prompts[0])
    lengths = [len(ids) for ids in loaded.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]
    new_tokens = candidate.generation.max_new_tokens
    context = context_length(loaded)
    for row, length in enumerate(lengths):
        if length > max_prompt_tokens:
            raise PromptTooLong(
                f"row {row}: the rendered prompt is {length} tokens; at most {max_prompt_tokens} "
                "(setting MAX_PROMPT_TOKENS): shorten the row, the template or the system prompt"
            )
        if context is None:
            continue
        # Seq2seq models read the prompt with the encoder and write with the decoder.
        needed = length if loaded.is_seq2seq else length + new_tokens
        if needed > context:
            raise PromptTooLong(
                f"row {row}: the rendered prompt is {length} tokens"
                + ("" if loaded.is_seq2seq else f" and max_new_tokens is {new_tokens}")
                + f", more than the {context}-token context of {candidate.model!r}: shorten the "
                "prompt" + ("" if loaded.is_seq2seq else " or lower max_new_tokens")
            )


@dataclass
class Generated:
    output: str
    # None for an endpoint row whose server reported no usage.
    output_tokens: int | None
    # Seconds from the start of the row's batch until the row produced its last token (endpoint
    # rows: from sending the request until the whole reply arrived). None for a failed row.
    latency_s: float | None
    # Prompt tokens; until the first token (the batch's first decoding step, or the first token
    # an endpoint streamed); the row's cost by the endpoint's price table. Absent in cache
    # entries written before they existed.
    input_tokens: int | None = None
    ttft_s: float | None = None
    cost: float | None = None
    # Why an endpoint row has no output (its request failed after retries); None otherwise.
    error: str | None = None


def top_k_top_p_probs(scores: Any, *, temperature: float, top_k: int, top_p: float) -> tuple[Any, Any]:
    """The sampling distribution over the ``top_k`` most likely tokens of each row: temperature,
    then the k best, then the smallest set of those whose probability reaches ``top_p`` (the
    order transformers applies them in). Returns (probabilities, token ids), both (rows, k)."""
    import torch

    k = min(top_k, scores.shape[-1])
    values, indices = torch.topk(scores.float() / temperature, k, dim=-1)  # sorted, best first
    probs = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        # Drop a token once the tokens ranked above it already hold top_p of the mass; the best
        # token always stays.
        above = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(above >= top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, indices


class TopKSampler:
    """A logits processor that draws each row's next token from its top-k tokens and hands the
    (then greedy) decoder a row that only allows that token.

    transformers' own sampling sorts and draws over the whole vocabulary for every row at every
    step: with a 49k-token vocabulary at batch 64 that was about 70 ms of each ~300 ms step on a
    2-core CPU. Drawing among the k survivors gives the same distribution.
    """

    def __init__(self, *, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs, indices = top_k_top_p_probs(
            scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )
        tokens = indices.gather(-1, torch.multinomial(probs, 1))
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, tokens, 0.0)


def generation_kwargs(candidate: CandidateSpec, loaded: LoadedModel) -> dict[str, Any]:
    from transformers import LogitsProcessorList

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
    if gen.do_sample and gen.top_k > 0:
        sampler = TopKSampler(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
        # The sampler has already chosen; the decoder's greedy pick just takes its choice.
        kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
        kwargs.update(temperature=None, top_p=None, top_k=None)
    elif gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:
        # Greedy decoding: clear sampling knobs a model's generation_config may carry, so that
        # transformers does not warn that they are ignored.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def kv_cache_bytes_per_token(model: Any) -> int | None:
    """Bytes of attention cache one token takes in one row (keys and values, every layer), or
    None when the config does not say (the batch is then not capped by memory)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    if not head_dim:
        return None
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * element


def rows_per_batch(
    *, rows: int, batch_size: int, longest_tokens: int, bytes_per_token: int | None, budget_bytes: int | None
) -> int:
    """Rows per batch: at most ``batch_size``, and few enough that one batch's attention cache
    (longest prompt plus new tokens, every row) fits ``budget_bytes``; then evened out, so that
    70 rows run as 35 + 35 rather than 64 + 6."""
    size = max(1, min(batch_size, rows))
    if bytes_per_token and budget_bytes:
        size = max(1, min(size, budget_bytes // (bytes_per_token * longest_tokens)))
    batches = -(-rows // size)
    return -(-rows // batches)


def generate_outputs(
    *,
    candidate: CandidateSpec,
    loaded: LoadedModel,
    prompts: list[str],
    batch_size: int,
    kv_cache_budget_bytes: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    step_every_s: float = 2.0,
) -> list[Generated]:
    """Generate one output per prompt, in batches of similar length, keeping the input order.

    Batches hold at most ``batch_size`` rows and, on CPU, no more than fit
    ``kv_cache_budget_bytes`` of attention cache: a CPU out-of-memory kills the worker instead of
    raising. On GPU the budget is most of the free memory, and an out-of-memory halves the batch.
    ``on_batch(rows_done, tokens_done)`` is called after each batch, and
    ``on_step(rows_done, tokens_done, fraction_done)`` inside a batch at most every
    ``step_every_s`` (counting the batch's tokens so far); either may raise GenerationCancelled
    to stop.
    """
    import torch

    tokenizer = loaded.tokenizer
    if not prompts:
        return []
    # Counted as _generate_batch encodes them: also each row's input_tokens.
    add_special = loaded.is_seq2seq or not _starts_with_bos(tokenizer, prompts[0])
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]
    # Sorting by length keeps padding (wasted compute) low inside each batch.
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    results: list[Generated | None] = [None] * len(prompts)
    kwargs = generation_kwargs(candidate, loaded)
    torch.manual_seed(candidate.generation.seed)
    eos_ids = _eos_ids(loaded)
    done = 0
    tokens_done = 0
    start = 0
    if loaded.device == "cuda":
        kv_cache_budget_bytes = int(0.8 * torch.cuda.mem_get_info()[0])
    size = rows_per_batch(
        rows=len(prompts),
        batch_size=batch_size,
        longest_tokens=max(lengths) + 1 + candidate.generation.max_new_tokens,
        bytes_per_token=kv_cache_bytes_per_token(loaded.model),
        budget_bytes=kv_cache_budget_bytes,
    )
    while start < len(order):
        batch = order[start : start + size]
        step_hook = (
            None
            if on_step is None
            else _batch_progress(
                on_step,
                rows_done=done,
                tokens_done=tokens_done,
                batch_rows=len(batch),
                total_rows=len(prompts),
                max_new_tokens=candidate.generation.max_new_tokens,
            )
        )
        try:
            outputs, step_seconds = _generate_batch(
                loaded, [prompts[i] for i in batch], kwargs, step_hook, eos_ids, step_every_s
            )
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            # Halve and retry the same rows: nothing is lost, the batch just gets smaller.
            size = max(1, size // 2)
            if loaded.device == "cuda":
                torch.cuda.empty_cache()
            continue
        for index, token_ids in zip(batch, outputs, strict=True):
            ids = _strip_after_eos(token_ids, eos_ids, tokenizer.pad_token_id)
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            text = _cut_at_stop(decoded, candidate.generation.stop)
            steps = _last_token_step(
                token_ids, kept=len(ids), eos_ids=eos_ids, stopped_by_string=text != decoded
            )
            results[index] = Generated(
                output=text.strip(),
                output_tokens=len(ids),
                latency_s=step_seconds[min(steps, len(step_seconds)) - 1],
                input_tokens=lengths[index],
                ttft_s=step_seconds[0],
            )
            tokens_done += len(ids)
        start += len(batch)
        done += len(batch)
        # The attention cache of this batch is garbage now; give the heap it grew back to the OS.
        release_free_memory()
        if on_batch is not None:
            on_batch(done, tokens_done)
    return [r for r in results if r is not None]


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise, and the resident size of a
    worker only ever grows by the largest batch it has run)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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


def _last_token_step(token_ids: list[int], *, kept: int, eos_ids: set[int], stopped_by_string: bool) -> int:
    """The decoding step (1-based) at which a row produced its last token: its ``kept`` tokens,
    plus the EOS right after them when it ended on one. A row a stop string ended gets padding
    after its kept tokens, and that padding may carry the EOS id (pad == eos): not its token."""
    ended_on_eos = kept < len(token_ids) and token_ids[kept] in eos_ids and not stopped_by_string
    return max(1, kept + int(ended_on_eos))


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


def _batch_progress(
    on_step: Callable[[int, int, float], None],
    *,
    rows_done: int,
    tokens_done: int,
    batch_rows: int,
    total_rows: int,
    max_new_tokens: int,
) -> Callable[[int, int], None]:
    """Turns a batch's (steps, tokens so far) into the whole job's (rows, tokens, fraction done)."""

    def report(steps: int, batch_tokens: int) -> None:
        fraction = (rows_done + batch_rows * min(1.0, steps / max_new_tokens)) / total_rows
        on_step(rows_done, tokens_done + batch_tokens, fraction)

    return report


class StepProgress:
    """A stopping criterion that never stops. After every decoding step it notes when the step
    ended (a row's latency is the time of the step that produced its last token), and, when
    given ``report``, at most every ``every_s`` it reports how many steps ran and how many tokens
    the batch's rows produced before their EOS.

    On CUDA the step's kernels may still be queued when this runs, so the time is a CUDA event
    recorded on the stream (no synchronisation), read once the batch is done.
    """

    def __init__(
        self,
        report: Callable[[int, int], None] | None,
        *,
        prompt_length: int,
        eos_ids: set[int],
        every_s: float,
        device: str = "cpu",
    ):
        self.report, self.prompt_length, self.every_s = report, prompt_length, every_s
        self.eos_ids = sorted(eos_ids)
        self.cuda = device == "cuda"
        self.stamps: list[Any] = []
        self.start()

    def start(self) -> None:
        """Mark the start of generate(); step times count from here."""
        self.stamps.clear()
        self.started = self.last = time.perf_counter()
        if self.cuda:
            import torch

            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        now = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(now)
        if self.report is not None and now - self.last >= self.every_s:
            self.last = now
            new = input_ids[:, self.prompt_length :]
            eos = torch.tensor(self.eos_ids, device=new.device)
            ended = torch.isin(new, eos).cumsum(dim=1) > 0
            self.report(new.shape[1], int((~ended).sum()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_seconds(self) -> list[float]:
        """Seconds from start() to the end of each decoding step so far."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [self.start_event.elapsed_time(event) / 1000 for event in self.stamps]
        return [stamp - self.started for stamp in self.stamps]


def _generate_batch(
    loaded: LoadedModel,
    prompts: list[str],
    kwargs: dict[str, Any],
    on_step: Callable[[int, int], None] | None = None,
    eos_ids: set[int] | None = None,
    step_every_s: float = 2.0,
) -> tuple[list[list[int]], list[float]]:
    """The new token ids of each row, and the seconds from the start of generate() to the end
    of each decoding step (step k produced every row's k-th new token)."""
    import torch
    from transformers import StoppingCriteriaList

    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right" if loaded.is_seq2seq else "left"
    # Chat templates already carry the special tokens a model expects at the start.
    add_special = loaded.is_seq2seq or not _starts_with_bos(tokenizer, prompts[0])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    encoded = {k: v.to(loaded.device) for k, v in encoded.items()}
    # Installed on every batch, progress or not: each row's latency comes from its step times.
    # Decoder ids: the prompt for causal models, the decoder start token for seq2seq ones.
    hook = StepProgress(
        on_step,
        prompt_length=1 if loaded.is_seq2seq else encoded["input_ids"].shape[1],
        eos_ids=eos_ids or set(),
        every_s=step_every_s,
        device=loaded.device,
    )
    kwargs = {**kwargs, "stopping_criteria": StoppingCriteriaList([hook])}
    hook.start()
    with torch.inference_mode():
        generated = loaded.model.generate(**encoded, **kwargs)
    step_seconds = hook.step_seconds()
    if not step_seconds:  # a model whose generate() skips stopping criteria: one batch-wide time
        step_seconds = [time.perf_counter() - hook.started]
    # Causal models echo the prompt; seq2seq outputs start with the decoder start token.
    cut = 1 if loaded.is_seq2seq else encoded["input_ids"].shape[1]
    generated = generated[:, cut:]
    return generated.tolist(), step_seconds


def _starts_with_bos(tokenizer: Any, prompt: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(str(bos))
