"""Regular expressions from requests, run in linear time.

A comparison's ``regex`` runs on a worker against every output. Python's backtracking engine
takes seconds on ``^(\\w+\\s?)*$`` against an eight-word sentence and hours at twelve words, and a
GPU worker's solo pool enforces no time limit, so one request could hold a worker for good.
RE2 matches in time linear in the text, at the price of the features that need backtracking
(backreferences, lookaround, atomic groups, possessive quantifiers, conditionals): those are
refused when the comparison is submitted.

A pattern is read by Python's own parser, so it means what ``re.search`` would make of it
(verbose mode, ``{,n}``, ``\\Z``, scoped flags), and is written out again in RE2's syntax with
Python's meanings spelled out where RE2's differ: ``\\d``, ``\\w`` and ``\\s`` are Unicode-aware as
in Python (RE2's are ASCII-only), ``.`` never matches a newline without ``(?s)``, and ``$``
also matches before a newline that ends the text. RE2 has no Unicode word boundary: ``\\b`` and
``\\B`` count only ASCII letters, digits and ``_`` as word characters.

The gateway checks patterns with ``pattern_problem`` and the worker runs them with
``compile_pattern``: one translation, so a pattern accepted at submit time runs the same way.
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found,unused-ignore]
import re._parser as sre_parse  # type: ignore[import-not-found,unused-ignore]
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2

# What RE2 cannot run, by the node Python's parser makes of it.
_UNSUPPORTED: dict[Any, str] = {
    sre.GROUPREF: r"backreferences (\1, (?P=name))",
    sre.GROUPREF_EXISTS: "conditional groups (?(1)...|...)",
    sre.ASSERT: "lookahead and lookbehind assertions ((?=...), (?<=...))",
    sre.ASSERT_NOT: "negative lookahead and lookbehind assertions ((?!...), (?<!...))",
    sre.ATOMIC_GROUP: "atomic groups ((?>...))",
    sre.POSSESSIVE_REPEAT: "possessive quantifiers (*+, ++, ?+, {m,n}+)",
}
_LINEAR_ONLY = "user patterns run on a linear-time engine (RE2)"

# Python's \s in a str pattern: every character for which str.isspace() is true. All of them lie
# below U+3001 (U+3000 IDEOGRAPHIC SPACE is the last).
_SPACE_CODES = [c for c in range(0x3001) if chr(c).isspace()]
_MAX_CODE = 0x10FFFF
_ASCII_DIGIT = [(0x30, 0x39)]
_ASCII_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_ASCII_SPACE = [(0x09, 0x0D), (0x20, 0x20)]


class PatternError(ValueError):
    """The pattern is not a valid regular expression, or needs what RE2 cannot run."""


def _ranges(codes: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for code in sorted(codes):
        if out and out[-1][1] + 1 == code:
            out[-1] = (out[-1][0], code)
        else:
            out.append((code, code))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for low, high in ranges:
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= _MAX_CODE:
        out.append((start, _MAX_CODE))
    return out


_SPACE = _ranges(_SPACE_CODES)


def _char(code: int) -> str:
    """One code point as RE2 reads it literally, in a class or outside one."""
    if 0x30 <= code <= 0x39 or 0x41 <= code <= 0x5A or 0x61 <= code <= 0x7A:
        return chr(code)
    return f"\\x{{{code:x}}}"


def _span(ranges: list[tuple[int, int]]) -> str:
    return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)


class _Writer:
    def __init__(self, ascii_only: bool):
        self.ascii_only = ascii_only

    # -- categories, as the inside of a character class
    def category(self, code: Any) -> str | None:
        """The class body for a category, or None for Unicode \\W (no class body says it)."""
        if self.ascii_only:
            table = {
                sre.CATEGORY_DIGIT: _ASCII_DIGIT,
                sre.CATEGORY_WORD: _ASCII_WORD,
                sre.CATEGORY_SPACE: _ASCII_SPACE,
                sre.CATEGORY_NOT_DIGIT: _complement(_ASCII_DIGIT),
                sre.CATEGORY_NOT_WORD: _complement(_ASCII_WORD),
                sre.CATEGORY_NOT_SPACE: _complement(_ASCII_SPACE),
            }
            return _span(table[code])
        if code is sre.CATEGORY_DIGIT:
            return r"\p{Nd}"
        if code is sre.CATEGORY_NOT_DIGIT:
            return r"\P{Nd}"
        if code is sre.CATEGORY_WORD:
            return r"\p{L}\p{N}_"
        if code is sre.CATEGORY_SPACE:
            return _span(_SPACE)
        if code is sre.CATEGORY_NOT_SPACE:
            return _span(_complement(_SPACE))
        if code is sre.CATEGORY_NOT_WORD:
            return None
        raise PatternError(f"unsupported character category {code}")

    def char_set(self, items: list[tuple[Any, Any]]) -> str:
        negate = bool(items) and items[0][0] is sre.NEGATE
        parts: list[str] = []
        not_word = False
        for op, av in items[1:] if negate else items:
            if op is sre.LITERAL:
                parts.append(_char(av))
            elif op is sre.RANGE:
                parts.append(f"{_char(av[0])}-{_char(av[1])}")
            elif op is sre.CATEGORY:
                body = self.category(av)
                if body is None:
                    not_word = True
                else:
                    parts.append(body)
            else:
                raise PatternError(f"unsupported element {op} in a character class")
        if not not_word:
            body = "".join(parts)
            if not body:  # Python cannot parse an empty class; kept total for safety
                return "[^\\x{0}-\\x{10ffff}]" if not negate else "(?s:.)"
            return f"[^{body}]" if negate else f"[{body}]"
        if not negate:
            # [\Wx]: not a word character, or one of the others.
            word = r"[^\p{L}\p{N}_]"
            return f"(?:{word}|[{''.join(parts)}])" if parts else word
        return self._word_except(items[1:])

    def _word_except(self, items: list[tuple[Any, Any]]) -> str:
        """[^\\W...]: word characters except the others, which RE2 can only say when they are
        whole parts of the word class (as in the common [^\\W\\d_], letters only)."""
        keep = {r"\p{L}": True, r"\p{Nd}": True, r"\p{Nl}": True, r"\p{No}": True, "_": True}
        for op, av in items:
            if op is sre.CATEGORY and av is sre.CATEGORY_NOT_WORD:
                continue
            if op is sre.CATEGORY and av is sre.CATEGORY_DIGIT:
                keep[r"\p{Nd}"] = False
            elif op is sre.CATEGORY and av is sre.CATEGORY_SPACE:
                continue  # no word character is a space
            elif op is sre.LITERAL and av == ord("_"):
                keep["_"] = False
            else:
                raise PatternError(
                    r"a negated class holding \W together with other characters (other than "
                    rf"\d, \s and _) is not supported: {_LINEAR_ONLY}; list the characters instead"
                )
        body = "".join(part for part, kept in keep.items() if kept)
        return f"[{body}]" if body else "[^\\x{0}-\\x{10ffff}]"

    # -- nodes
    def sequence(self, nodes: Any, flags: int) -> str:
        return "".join(self.node(op, av, flags) for op, av in nodes)

    def node(self, op: Any, av: Any, flags: int) -> str:
        if op in _UNSUPPORTED:
            raise PatternError(f"{_UNSUPPORTED[op]} are not supported: {_LINEAR_ONLY}")
        if op is sre.LITERAL:
            return _char(av)
        if op is sre.NOT_LITERAL:
            return f"[^{_char(av)}]"
        if op is sre.ANY:
            return "(?s:.)" if flags & re.DOTALL else "[^\\n]"
        if op is sre.IN:
            return self.char_set(av)
        if op is sre.CATEGORY:
            return self.char_set([(sre.CATEGORY, av)])
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.sequence(alt, flags) for alt in av[1]) + ")"
        if op is sre.SUBPATTERN:
            _group, add, remove, body = av
            inner = (flags | add) & ~remove
            # Only case folding is left to RE2; dot-all and multi-line are spelled out per node.
            case = ""
            if inner & re.IGNORECASE and not flags & re.IGNORECASE:
                case = "(?i)"
            elif flags & re.IGNORECASE and not inner & re.IGNORECASE:
                case = "(?-i)"
            # Groups never capture: only whether the pattern matches is used.
            return f"(?:{case}{self.sequence(body, inner)})"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = av
            if high is sre.MAXREPEAT:
                quantifier = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
            elif (low, high) == (0, 1):
                quantifier = "?"
            elif low == high:
                quantifier = f"{{{low}}}"
            else:
                quantifier = f"{{{low},{high}}}"
            lazy = "?" if op is sre.MIN_REPEAT else ""
            return f"(?:{self.sequence(body, flags)}){quantifier}{lazy}"
        if op is sre.AT:
            return self.anchor(av, flags)
        raise PatternError(f"{op} is not supported: {_LINEAR_ONLY}")

    @staticmethod
    def anchor(code: Any, flags: int) -> str:
        multiline = bool(flags & re.MULTILINE)
        if code is sre.AT_BEGINNING:
            return "(?m:^)" if multiline else r"\A"
        if code is sre.AT_BEGINNING_STRING:
            return r"\A"
        if code is sre.AT_END:
            # Python's $ also matches before a newline that ends the text. Consuming that
            # newline changes nothing for a search that only asks whether there is a match.
            return "(?m:$)" if multiline else r"(?:\n?\z)"
        if code is sre.AT_END_STRING:
            return r"\z"
        if code is sre.AT_BOUNDARY:
            return r"\b"
        if code is sre.AT_NON_BOUNDARY:
            return r"\B"
        raise PatternError(f"unsupported anchor {code}")


def translate(pattern: str) -> str:
    """The RE2 pattern that matches where Python's ``re.search(pattern)`` would.

    Raises PatternError for an invalid pattern or one RE2 cannot run."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise PatternError(f"not a valid regular expression ({exc})") from exc
    except RecursionError as exc:
        raise PatternError("the pattern nests too deeply") from exc
    flags = parsed.state.flags
    writer = _Writer(ascii_only=bool(flags & re.ASCII))
    try:
        body = writer.sequence(parsed, flags)
    except RecursionError as exc:
        raise PatternError("the pattern nests too deeply") from exc
    return ("(?i)" if flags & re.IGNORECASE else "") + body


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported to the client, not to stderr
    return options


@dataclass(frozen=True)
class SafePattern:
    source: str
    translated: str
    compiled: Any

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text`` (``re.search`` semantics)."""
        try:
            return self.compiled.search(text) is not None
        except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form
            return self.compiled.search(text.encode("utf-8", "replace").decode("utf-8")) is not None


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> SafePattern:
    translated = translate(pattern)
    try:
        compiled = re2.compile(translated, _options())
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if "invalid repetition size" in message:
            message = f"{message}: repetitions above 1000, nested ones included, are not supported"
        elif "pattern too large" in message:
            message = "the pattern is too large once its repetitions are expanded"
        raise PatternError(f"{message}: {_LINEAR_ONLY}") from exc
    return SafePattern(source=pattern, translated=translated, compiled=compiled)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used, or None."""
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    return None
