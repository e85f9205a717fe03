"""User patterns run by RE2 in linear time, with the meaning Python's re.search gives them."""

from __future__ import annotations

import re
import time

import pytest

from shared.patterns import PatternError, compile_pattern, pattern_problem

# Each pattern is checked against every text: RE2's answer must be Python's.
PATTERNS = [
    r"^\d+$",
    r"\w+",
    r"(?i)PARIS",
    r"^(\w+\s?)*$",
    r"[^\W\d_]+",
    r"^[^\W\d_]+$",
    r"^[\W_]+$",
    r"a{,3}b",
    r"x\Z",
    r"(?x) a b  # verbose mode, with a comment",
    r"(?s)a.b",
    r"a.b",
    r"^b",
    r"(?m)^b",
    r"a$",
    r"(?m)a$",
    r"\bcat\b",
    r"^[\s]+$",
    r"^\S+$",
    r"^[^\S]+$",
    r"^\D+$",
    r"^[\D]+$",
    r"^[\d\s]+$",
    r"(?a)^\w+$",
    r"(?a)^\d+$",
    r"(?i:a)B",
    r"colou?r",
    r"a+?b",
    r"^[a-c]{2,3}$",
    r"\.\*",
    r"[\]]",
    r"(?i)é",
    r"[^a]",
    r"a|bc|d",
    r"()",
    r"[-a]",
    r"\n",
    r"\x00",
    r"(?P<word>[A-Z][a-z]+)",
    r"Answer: [A-D]",
]
TEXTS = [
    "42",
    "forty-two",
    " 7",
    "Paris",
    "paris is big",
    "a\nb",
    "b\na",
    "a\n",
    "a",
    "axb",
    "a\nb",
    "aab",
    "aaaab",
    "x",
    "x\n",
    "the cat sat",
    "concatenate",
    "héllo wörld",
    "١٢٣",  # Arabic-Indic digits: \d in Python
    "_",
    "__--",
    "日本語 テキスト",
    "\u3000\u2028\x1c",  # whitespace to Python, not to RE2's \s
    "",
    "color",
    "colour",
    ".*",
    "]",
    "É",
    "\x00",
    "a b",
    "ab",
    "tab\there",
    "Answer: C",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_where_python_does(pattern):
    compiled = compile_pattern(pattern)
    mismatches = [t for t in TEXTS if compiled.search(t) != bool(re.search(pattern, t))]
    assert mismatches == [], compiled.translated


@pytest.mark.parametrize(
    ("pattern", "unsupported"),
    [
        (r"(a)\1", "backreferences"),
        (r"(?P<x>a)(?P=x)", "backreferences"),
        (r"foo(?=bar)", "lookahead and lookbehind"),
        (r"(?<=\$)\d+", "lookahead and lookbehind"),
        (r"(?<!a)b", "negative lookahead and lookbehind"),
        (r"\d(?!px)", "negative lookahead and lookbehind"),
        (r"(?>a+)b", "atomic groups"),
        (r"a++b", "possessive quantifiers"),
        (r"(a)?(?(1)b|c)", "conditional groups"),
        (r"a{1001}", "repetitions above 1000"),
        (r"(?:a{100}){100}", "repetitions above 1000"),
        (r"[^\Wa]", r"negated class holding \W"),
    ],
)
def test_what_needs_backtracking_is_refused_saying_what(pattern, unsupported):
    problem = pattern_problem(pattern)
    assert problem is not None and unsupported in problem
    assert "linear-time engine (RE2)" in problem
    with pytest.raises(PatternError):
        compile_pattern(pattern)


def test_invalid_patterns_get_python_s_message():
    assert pattern_problem("(unclosed") == (
        "not a valid regular expression (missing ), unterminated subpattern at position 0)"
    )
    assert pattern_problem(r"^\d+$") is None


def test_the_catastrophic_pattern_finishes_at_once_on_long_text():
    compiled = compile_pattern(r"^(\w+\s?)*$")
    long_sentence = "an ordinary sentence of many plain words " * 200 + "!"
    started = time.perf_counter()
    assert compiled.search(long_sentence) is False
    assert compiled.search(long_sentence[:-1].strip()) is True
    assert time.perf_counter() - started < 0.1


def test_text_with_a_lone_surrogate_is_searched_not_refused():
    assert compile_pattern("ab").search("ab\ud800") is True
