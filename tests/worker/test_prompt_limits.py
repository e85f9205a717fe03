"""Prompt lengths in tokens, checked on the worker before a candidate generates (tiny models)."""

from __future__ import annotations

import pytest

from services.worker.generation import PromptTooLong, check_prompt_lengths, context_length
from services.worker.models import load_model
from shared.schemas import CandidateSpec
from shared.settings import Settings


@pytest.fixture(scope="module")
def settings(model_root):
    return Settings(model_roots=[model_root])


@pytest.fixture(scope="module")
def causal(tiny_models, settings):
    return load_model(str(tiny_models["causal"]), revision=None, settings=settings)


@pytest.fixture(scope="module")
def seq2seq(tiny_models, settings):
    return load_model(str(tiny_models["seq2seq"]), revision=None, settings=settings)


def candidate(max_new_tokens: int = 64) -> CandidateSpec:
    return CandidateSpec(label="a", model="tiny", generation={"max_new_tokens": max_new_tokens})


def tokens(loaded, prompt: str) -> int:
    return len(loaded.tokenizer(prompt)["input_ids"])


def test_the_context_length_comes_from_the_config(causal, seq2seq):
    assert context_length(causal) == 512
    # T5 has relative positions: no fixed context, and its tokenizer reports none either.
    assert context_length(seq2seq) is None


def test_prompts_that_fit_pass(causal):
    check_prompt_lengths(
        ["hi", "What is the capital of France?"], candidate=candidate(), loaded=causal, max_prompt_tokens=8192
    )


def test_a_prompt_over_max_prompt_tokens_names_the_row_and_the_setting(causal):
    prompts = ["hi", "What is the capital of France?"]
    with pytest.raises(PromptTooLong) as raised:
        check_prompt_lengths(prompts, candidate=candidate(), loaded=causal, max_prompt_tokens=5)
    assert str(raised.value) == (
        f"row 1: the rendered prompt is {tokens(causal, prompts[1])} tokens; at most 5 (setting "
        "MAX_PROMPT_TOKENS): shorten the row, the template or the system prompt"
    )


def test_a_prompt_that_leaves_no_room_for_the_output_names_the_context(causal):
    long = "Paris is the capital of France. " * 70
    length = tokens(causal, long)
    assert 512 - 64 < length <= 512  # fits alone, not with 64 new tokens
    with pytest.raises(PromptTooLong) as raised:
        check_prompt_lengths(
            ["hi", "hello", long], candidate=candidate(64), loaded=causal, max_prompt_tokens=8192
        )
    assert str(raised.value) == (
        f"row 2: the rendered prompt is {length} tokens and max_new_tokens is 64, more than the "
        "512-token context of 'tiny': shorten the prompt or lower max_new_tokens"
    )
    # With fewer new tokens the same prompt fits.
    check_prompt_lengths([long], candidate=candidate(512 - length), loaded=causal, max_prompt_tokens=8192)


def test_seq2seq_prompts_are_bounded_by_the_setting(seq2seq):
    long = "Paris is the capital of France. " * 100
    check_prompt_lengths([long], candidate=candidate(), loaded=seq2seq, max_prompt_tokens=8192)
    with pytest.raises(PromptTooLong, match="row 0: .* at most 100 "):
        check_prompt_lengths([long], candidate=candidate(), loaded=seq2seq, max_prompt_tokens=100)
