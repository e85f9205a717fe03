"""Prompt rendering and batched generation on tiny random-weight models."""

from __future__ import annotations

import pytest

from services.worker.generation import generate_outputs, render_prompt, render_user_text, wants_chat_template
from services.worker.models import load_model
from shared.schemas import CandidateSpec
from shared.settings import Settings

PROMPTS = [
    "What is the capital of France?",
    "Name a large planet.",
    "hi",
    "Answer the question with one word.",
]


@pytest.fixture(scope="module")
def settings(model_root):
    return Settings(model_roots=[model_root])


@pytest.fixture(scope="module")
def causal(tiny_models, settings):
    return load_model(str(tiny_models["causal"]), revision=None, settings=settings)


@pytest.fixture(scope="module")
def seq2seq(tiny_models, settings):
    return load_model(str(tiny_models["seq2seq"]), revision=None, settings=settings)


def test_render_user_text_fills_columns_and_keeps_literal_braces():
    template = 'Context: {context}\nQ: {input}\nAnswer as JSON like {{"a": 1}}'
    text = render_user_text(template, {"input": "why?", "context": "because"})
    assert text == 'Context: because\nQ: why?\nAnswer as JSON like {"a": 1}'


def test_chat_template_is_used_when_the_tokenizer_has_one(causal):
    candidate = CandidateSpec(label="a", model="m", system_prompt="Be brief.", prompt_template="Q: {input}")
    assert wants_chat_template(candidate, causal)
    prompt = render_prompt(candidate, causal, {"input": "hi"}, chat=True)
    assert prompt == "<s>system: Be brief.</s><s>user: Q: hi</s><s>assistant:"


def test_plain_prompt_without_chat_template(causal):
    candidate = CandidateSpec(label="a", model="m", system_prompt="Be brief.", use_chat_template=False)
    assert not wants_chat_template(candidate, causal)
    assert render_prompt(candidate, causal, {"input": "hi"}, chat=False) == "Be brief.\n\nhi"


def test_forcing_a_missing_chat_template_is_a_clear_error(seq2seq):
    candidate = CandidateSpec(label="a", model="t5", use_chat_template=True)
    with pytest.raises(ValueError, match="no chat template"):
        wants_chat_template(candidate, seq2seq)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_greedy_batch_equals_one_at_a_time(kind, causal, seq2seq):
    loaded = causal if kind == "causal" else seq2seq
    candidate = CandidateSpec(label="a", model="m", generation={"max_new_tokens": 8})
    chat = wants_chat_template(candidate, loaded)
    prompts = [render_prompt(candidate, loaded, {"input": p}, chat=chat) for p in PROMPTS]
    progress: list[int] = []
    batched = generate_outputs(
        candidate=candidate,
        loaded=loaded,
        prompts=prompts,
        batch_size=3,
        on_batch=lambda done, tokens: progress.append((done, tokens)),
    )
    single = [
        generate_outputs(candidate=candidate, loaded=loaded, prompts=[p], batch_size=1)[0] for p in prompts
    ]
    assert [g.output for g in batched] == [g.output for g in single]
    assert [g.output_tokens for g in batched] == [g.output_tokens for g in single]
    assert all(0 < g.output_tokens <= 8 for g in batched)
    tokens = [g.output_tokens for g in batched]
    # Rows are batched shortest prompt first; progress reports rows and tokens after each batch.
    assert [done for done, _ in progress] == [3, 4]
    assert progress[-1][1] == sum(tokens)


def test_sampling_is_reproducible_with_a_seed(causal):
    candidate = CandidateSpec(
        label="s",
        model="m",
        generation={"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "seed": 3},
    )
    first = generate_outputs(candidate=candidate, loaded=causal, prompts=PROMPTS, batch_size=4)
    second = generate_outputs(candidate=candidate, loaded=causal, prompts=PROMPTS, batch_size=4)
    assert [g.output for g in first] == [g.output for g in second]


@pytest.mark.slow
def test_smollm2_greedy_batch_equals_one_at_a_time():
    loaded = load_model("smollm2-135m-instruct", revision=None, settings=Settings())
    candidate = CandidateSpec(label="g", model="smollm2-135m-instruct", generation={"max_new_tokens": 12})
    questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "How many legs does a spider have? Answer with a number only, please.",
        "Hi",
    ]
    prompts = [render_prompt(candidate, loaded, {"input": q}, chat=True) for q in questions]
    batched = generate_outputs(candidate=candidate, loaded=loaded, prompts=prompts, batch_size=4)
    single = [
        generate_outputs(candidate=candidate, loaded=loaded, prompts=[p], batch_size=1)[0] for p in prompts
    ]
    assert [g.output for g in batched] == [g.output for g in single]
    assert "Paris" in batched[0].output


def test_stop_strings_end_each_row_on_its_own(causal):
    plain = CandidateSpec(label="a", model="m", generation={"max_new_tokens": 10})
    prompts = [render_prompt(plain, causal, {"input": p}, chat=True) for p in PROMPTS]
    free = generate_outputs(candidate=plain, loaded=causal, prompts=prompts, batch_size=4)
    # Stop each row at a word the model is known to write there (its own greedy output).
    words = {w for g in free for w in g.output.split()[1:2]}
    stopped_spec = CandidateSpec(
        label="s", model="m", generation={"max_new_tokens": 10, "stop": sorted(words)}
    )
    stopped = generate_outputs(candidate=stopped_spec, loaded=causal, prompts=prompts, batch_size=4)
    for before, after in zip(free, stopped, strict=True):
        cut = min((i for i in (before.output.find(w) for w in words) if i >= 0), default=len(before.output))
        assert after.output == before.output[:cut].strip()
        assert after.output_tokens <= before.output_tokens
    assert any(a.output_tokens < b.output_tokens for a, b in zip(stopped, free, strict=True))
