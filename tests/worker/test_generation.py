"""Prompt rendering and batched generation on tiny random-weight models."""

from __future__ import annotations

import pytest

from services.worker.generation import (
    generate_outputs,
    generation_kwargs,
    render_prompt,
    render_user_text,
    wants_chat_template,
)
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
    # At most 3 rows a batch, evened out: 4 rows run as 2 + 2. Progress comes after each batch.
    assert [done for done, _ in progress] == [2, 4]
    assert progress[-1][1] == sum(tokens)


def _outputs(loaded, **generation) -> list[str]:
    candidate = CandidateSpec(label="s", model="m", generation={"max_new_tokens": 6, **generation})
    return [
        g.output for g in generate_outputs(candidate=candidate, loaded=loaded, prompts=PROMPTS, batch_size=4)
    ]


@pytest.mark.parametrize("top_k", [50, 0], ids=["our top-k sampler", "full vocabulary"])
def test_sampling_samples_and_its_seed_reproduces_it(causal, top_k):
    """Sampled rows differ from greedy ones and from one seed to the next, and the same seed gives
    the same rows: this fails if sampling silently became greedy decoding, or ignored the seed."""
    greedy = _outputs(causal)
    sampled = {
        seed: _outputs(causal, do_sample=True, temperature=1.5, top_k=top_k, seed=seed) for seed in (1, 2, 3)
    }
    assert _outputs(causal, do_sample=True, temperature=1.5, top_k=top_k, seed=2) == sampled[2]
    assert all(outputs != greedy for outputs in sampled.values())
    assert len({tuple(outputs) for outputs in sampled.values()}) == 3


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


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 5, 1.0), (0.7, 8, 0.9), (1.3, 20, 0.5)])
def test_top_k_sampler_draws_from_the_distribution_transformers_defines(temperature, top_k, top_p):
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from services.worker.generation import top_k_top_p_probs

    torch.manual_seed(0)
    scores = torch.randn(3, 40) * 3
    expected = scores.clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        expected = warper(None, expected)
    expected = torch.softmax(expected, dim=-1)

    probs, ids = top_k_top_p_probs(scores, temperature=temperature, top_k=top_k, top_p=top_p)
    ours = torch.zeros_like(scores).scatter_(-1, ids, probs)
    assert torch.allclose(ours, expected, atol=1e-6)
    kept = (ours > 0).sum(dim=-1)
    if top_p == 1.0:
        assert bool((kept == top_k).all())
    else:  # the nucleus cut leaves fewer than top_k where the mass concentrates, never none
        assert bool((kept >= 1).all()) and int(kept.min()) < top_k


def test_top_k_sampler_picks_tokens_with_those_frequencies():
    import torch

    from services.worker.generation import TopKSampler, top_k_top_p_probs

    torch.manual_seed(1)
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -5.0]]).repeat(20_000, 1)
    chosen = TopKSampler(temperature=1.0, top_k=4, top_p=1.0)(None, scores)
    # Exactly one allowed token per row, as greedy decoding expects.
    assert bool((torch.isfinite(chosen).sum(dim=-1) == 1).all())
    picks = chosen.argmax(dim=-1)
    frequencies = torch.bincount(picks, minlength=6).float() / len(picks)
    probs, ids = top_k_top_p_probs(scores[:1], temperature=1.0, top_k=4, top_p=1.0)
    expected = torch.zeros(6).scatter_(0, ids[0], probs[0])
    assert torch.allclose(frequencies, expected, atol=0.015)
    assert frequencies[4] == 0 and frequencies[5] == 0


def test_generation_draws_each_token_from_our_top_k_distribution(causal, monkeypatch):
    """With top_k set, our sampler decides every token: given a distribution that puts all its
    mass on each row's second-best token, generation follows exactly that token, step by step.
    transformers' own sampling (the full-vocabulary path) would draw at random instead."""
    import torch

    from services.worker import generation

    second_best: list[list[int]] = []

    def all_on_the_second(scores, *, temperature, top_k, top_p):
        assert scores.shape[-1] == len(causal.tokenizer)  # the model's scores over the whole vocabulary
        values, indices = torch.topk(scores.float(), top_k, dim=-1)
        second_best.append(indices[:, 1].tolist())
        return torch.zeros_like(values).index_fill_(-1, torch.tensor([1]), 1.0), indices

    monkeypatch.setattr(generation, "top_k_top_p_probs", all_on_the_second)
    candidate = CandidateSpec(
        label="s", model="m", generation={"max_new_tokens": 6, "do_sample": True, "top_k": 5, "seed": 0}
    )
    kwargs = generation.generation_kwargs(candidate, causal)
    prompts = [render_prompt(candidate, causal, {"input": p}, chat=True) for p in PROMPTS[:2]]
    token_ids, _ = generation._generate_batch(causal, prompts, kwargs)
    assert len(second_best) == len(token_ids[0]) == 6
    for row, ids in enumerate(token_ids):
        assert ids == [step[row] for step in second_best]


def test_sampling_without_top_k_is_left_to_transformers(causal):
    candidate = CandidateSpec(
        label="s", model="m", generation={"do_sample": True, "top_k": 0, "temperature": 0.7}
    )
    kwargs = generation_kwargs(candidate, causal)
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_k"]) == (True, 0.7, 0)
    assert "logits_processor" not in kwargs
    greedy = generation_kwargs(CandidateSpec(label="g", model="m"), causal)
    assert greedy["do_sample"] is False and "logits_processor" not in greedy


def test_rows_per_batch_keeps_the_attention_cache_within_budget():
    from services.worker.generation import rows_per_batch

    # 46 KB a token (SmolLM2-135M in fp32), 124 tokens a row: 64 rows would need 365 MB.
    per_token = 2 * 30 * 3 * 64 * 4
    assert per_token == 46_080
    size = rows_per_batch(
        rows=64, batch_size=64, longest_tokens=124, bytes_per_token=per_token, budget_bytes=256 * 2**20
    )
    assert size == 32  # 46 would fit; two even batches of 32 instead of 46 + 18
    assert size * 124 * per_token <= 256 * 2**20
    assert (
        rows_per_batch(rows=70, batch_size=64, longest_tokens=10, bytes_per_token=None, budget_bytes=None)
        == 35
    )
    assert (
        rows_per_batch(rows=3, batch_size=64, longest_tokens=10, bytes_per_token=per_token, budget_bytes=1)
        == 1
    )
    assert (
        rows_per_batch(rows=5, batch_size=8, longest_tokens=10, bytes_per_token=None, budget_bytes=None) == 5
    )


def test_kv_cache_size_comes_from_the_model_config(causal, seq2seq):
    from services.worker.generation import kv_cache_bytes_per_token

    config = causal.model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert kv_cache_bytes_per_token(causal.model) == 2 * config.num_hidden_layers * kv_heads * head_dim * 4
    assert kv_cache_bytes_per_token(seq2seq.model) > 0


def test_progress_is_reported_inside_a_batch_and_a_cancel_stops_it_there(causal):
    from services.worker.generation import GenerationCancelled

    candidate = CandidateSpec(label="a", model="m", generation={"max_new_tokens": 8, "stop": []})
    steps: list[tuple[int, int, float]] = []
    outputs = generate_outputs(
        candidate=candidate,
        loaded=causal,
        prompts=PROMPTS,
        batch_size=4,
        on_step=lambda done, tokens, fraction: steps.append((done, tokens, fraction)),
        step_every_s=0,
    )
    assert steps, "no progress inside the batch"
    # One batch of 4: no row is done before it ends; tokens and the fraction only grow.
    assert {done for done, _, _ in steps} == {0}
    tokens = [t for _, t, _ in steps]
    fractions = [f for _, _, f in steps]
    assert tokens == sorted(tokens) and fractions == sorted(fractions)
    assert fractions[0] > 0 and fractions[-1] <= 1
    assert tokens[-1] <= sum(g.output_tokens for g in outputs)

    calls = 0

    def cancel(done: int, tokens: int, fraction: float) -> None:
        nonlocal calls
        calls += 1
        raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        generate_outputs(
            candidate=candidate, loaded=causal, prompts=PROMPTS, batch_size=4, on_step=cancel, step_every_s=0
        )
    assert calls == 1


def _ending_rows_early(monkeypatch, loaded) -> CandidateSpec:
    """Random weights almost never produce </s>: make one token in seven an extra EOS and
    sample, so that the rows of one batch end at different, seeded steps."""
    eos = loaded.model.generation_config.eos_token_id
    special = {loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id}
    extra = [t for t in range(len(loaded.tokenizer)) if t % 7 == 3 and t not in special]
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", [eos, *extra])
    return CandidateSpec(
        label="a",
        model="m",
        generation={"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 7},
    )


def _prompts(loaded, candidate) -> list[str]:
    chat = wants_chat_template(candidate, loaded)
    return [render_prompt(candidate, loaded, {"input": p}, chat=chat) for p in PROMPTS * 2]


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_each_row_gets_the_time_of_its_own_last_token(kind, causal, seq2seq, monkeypatch):
    """A clock that ticks once per reading makes step k end at exactly k seconds, so a row's
    latency is the step of its last token: its kept tokens, plus its EOS when it ended on one."""
    import types

    from services.worker import generation

    loaded = causal if kind == "causal" else seq2seq
    candidate = _ending_rows_early(monkeypatch, loaded)
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(generation, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))

    outputs = generate_outputs(
        candidate=candidate, loaded=loaded, prompts=_prompts(loaded, candidate), batch_size=8
    )

    assert any(g.output_tokens < 12 for g in outputs) and len({g.output_tokens for g in outputs}) >= 2
    for g in outputs:
        assert g.latency_s == (g.output_tokens + 1 if g.output_tokens < 12 else 12)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_row_latencies_in_one_batch_differ_and_grow_with_the_output(kind, causal, seq2seq, monkeypatch):
    loaded = causal if kind == "causal" else seq2seq
    candidate = _ending_rows_early(monkeypatch, loaded)

    outputs = generate_outputs(
        candidate=candidate, loaded=loaded, prompts=_prompts(loaded, candidate), batch_size=8
    )

    assert len({g.latency_s for g in outputs}) > 1, "every row got the same latency"
    by_length = sorted(outputs, key=lambda g: g.output_tokens)
    for shorter, longer in zip(by_length, by_length[1:], strict=False):
        if shorter.output_tokens < longer.output_tokens:
            assert shorter.latency_s < longer.latency_s
    assert all(g.latency_s > 0 for g in outputs)


def test_a_row_ended_by_a_stop_string_is_timed_at_its_last_kept_token():
    from services.worker.generation import _last_token_step

    eos = {2}
    # Ended on EOS at step 4, then padding: the EOS is its last token.
    assert _last_token_step([5, 6, 7, 2, 0, 0], kept=3, eos_ids=eos, stopped_by_string=False) == 4
    # Ran to max_new_tokens: the last of its tokens.
    assert _last_token_step([5, 6, 7, 8], kept=4, eos_ids=eos, stopped_by_string=False) == 4
    # A stop string ended it; padding that reuses the EOS id is not its token.
    assert _last_token_step([5, 6, 2, 2], kept=2, eos_ids=eos, stopped_by_string=True) == 2
    # EOS at once: the first step.
    assert _last_token_step([2, 2], kept=0, eos_ids=eos, stopped_by_string=False) == 1


def test_on_cuda_step_times_come_from_events_read_once_the_batch_is_done(monkeypatch):
    """CUDA kernels run behind the host: a host clock read after a step would time its queueing.
    Events recorded on the stream time the step itself (faked here: this suite needs no GPU)."""
    import torch

    from services.worker.generation import StepProgress

    ticks = iter(range(100))
    synchronised: list[bool] = []

    class Event:
        def __init__(self, enable_timing: bool):
            assert enable_timing
            self.ms = -1.0

        def record(self) -> None:
            self.ms = 10.0 * next(ticks)  # the GPU reaches it 10 ms after the previous one

        def elapsed_time(self, end: Event) -> float:
            assert synchronised, "read before the stream finished"
            return end.ms - self.ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synchronised.append(True))
    hook = StepProgress(None, prompt_length=1, eos_ids={2}, every_s=2.0, device="cuda")
    hook.start()  # generate() starts here
    for _ in range(3):
        assert not hook(torch.zeros((2, 4), dtype=torch.long), None).any()
    assert hook.step_seconds() == [pytest.approx(0.01), pytest.approx(0.02), pytest.approx(0.03)]
