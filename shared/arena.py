"""Blind pairwise voting: which two outputs a voter sees next, and how people's votes agree with
the judge and the metrics. Pure functions over plain data, shared by the gateway and its tests.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Draw:
    row: int
    a: str  # the label shown as "a" (left)
    b: str  # the label shown as "b" (right)


def collapse_whitespace(text: str | None) -> str:
    return " ".join((text or "").split())


def draw_matchup(
    *,
    outputs: Mapping[str, Sequence[str | None]],
    rows: int,
    votes: Iterable[Mapping[str, Any]],
    voter: str | None,
    rng: random.Random,
) -> Draw | None:
    """Pick the next (row, pair) to show, so that pairs and rows get covered evenly.

    ``outputs`` maps each votable candidate to its output per row; ``votes`` are the stored votes
    (``row``, ``a``, ``b``, ``voter``). The pair with the fewest votes goes first, then that
    pair's row with the fewest votes, skipping rows this voter already judged for the pair while
    others remain; ties are broken at random. Rows where the two outputs are the same (after
    collapsing whitespace) teach nothing, so they are drawn only when no pair has a differing row.
    The order shown is random. None when fewer than two candidates or no rows are available.
    """
    labels = list(outputs)
    pairs = [(x, y) for i, x in enumerate(labels) for y in labels[i + 1 :]]
    if not pairs or rows <= 0:
        return None
    position = {label: i for i, label in enumerate(labels)}

    def pair_of(a: str, b: str) -> tuple[str, str]:
        return (a, b) if position[a] < position[b] else (b, a)

    pair_votes: Counter[tuple[str, str]] = Counter()
    row_votes: Counter[tuple[tuple[str, str], int]] = Counter()
    judged_by_voter: set[tuple[tuple[str, str], int]] = set()
    for vote in votes:
        a, b, row = vote.get("a"), vote.get("b"), vote.get("row")
        if a not in position or b not in position or a == b or not isinstance(row, int):
            continue
        pair = pair_of(a, b)
        pair_votes[pair] += 1
        row_votes[(pair, row)] += 1
        if voter is not None and vote.get("voter") == voter:
            judged_by_voter.add((pair, row))

    # Shuffle, then a stable sort: pairs with equal counts end up in random order.
    rng.shuffle(pairs)
    pairs.sort(key=lambda p: pair_votes[p])
    texts = {
        label: [collapse_whitespace(produced[r] if r < len(produced) else None) for r in range(rows)]
        for label, produced in outputs.items()
    }
    chosen: tuple[tuple[str, str], list[int]] | None = None
    for pair in pairs:
        differing = [r for r in range(rows) if texts[pair[0]][r] != texts[pair[1]][r]]
        if differing:
            chosen = (pair, differing)
            break
    pair, pool = chosen if chosen is not None else (pairs[0], list(range(rows)))
    pool = [r for r in pool if (pair, r) not in judged_by_voter] or pool
    fewest = min(row_votes[(pair, r)] for r in pool)
    row = rng.choice([r for r in pool if row_votes[(pair, r)] == fewest])
    a, b = pair if rng.random() < 0.5 else (pair[1], pair[0])
    return Draw(row=row, a=a, b=b)


# ------------------------------------------------------------------------------------ agreement
# Which side a vote or a verdict favours: +1 the candidate shown as a, -1 the one shown as b.
_HUMAN_SIDE = {"a": 1, "b": -1, "tie": 0, "both_bad": 0}


@dataclass(frozen=True)
class VoteArrays:
    """Votes as arrays, so agreement over thousands of them is a few vectorised comparisons.

    ``a`` and ``b`` index ``labels`` (-1 for a label outside it), ``side`` is the person's
    choice: +1 a, -1 b, 0 tie (both_bad is a tie here).
    """

    labels: list[str]
    rows: int
    row: np.ndarray
    a: np.ndarray
    b: np.ndarray
    side: np.ndarray

    @property
    def usable(self) -> np.ndarray:
        return (self.a >= 0) & (self.b >= 0) & (self.row >= 0) & (self.row < self.rows)


def encode_votes(votes: Sequence[Mapping[str, Any]], labels: Sequence[str], rows: int) -> VoteArrays:
    index = {label: i for i, label in enumerate(labels)}
    count = len(votes)
    return VoteArrays(
        labels=list(labels),
        rows=rows,
        row=np.fromiter((v["row"] for v in votes), dtype=np.int64, count=count),
        a=np.fromiter((index.get(v["a"], -1) for v in votes), dtype=np.int64, count=count),
        b=np.fromiter((index.get(v["b"], -1) for v in votes), dtype=np.int64, count=count),
        side=np.fromiter((_HUMAN_SIDE[v["winner"]] for v in votes), dtype=np.int64, count=count),
    )


def _rate(agree: int, compared: int) -> dict[str, Any]:
    return {"agree": agree, "compared": compared, "rate": agree / compared if compared else None}


def _agreement(votes: VoteArrays, table: np.ndarray) -> dict[str, Any]:
    """``table[i, j, row]``: which side the other rater favours when i is shown as a and j as b
    (+1, -1, 0), NaN where it has no opinion."""
    usable = votes.usable
    other = table[votes.a[usable], votes.b[usable], votes.row[usable]]
    known = ~np.isnan(other)
    agree = int(np.count_nonzero(other[known] == votes.side[usable][known]))
    return _rate(agree, int(np.count_nonzero(known)))


def judge_agreement(votes: VoteArrays, judge_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often people picked what the judge picked for the same row and pair.

    ``judge_rows`` are the judge's verdicts ``{"row", "a", "b", "winner"}`` with winner a label
    or "tie"; votes on a row and pair the judge never saw are not compared.
    """
    n = len(votes.labels)
    index = {label: i for i, label in enumerate(votes.labels)}
    table = np.full((n, n, votes.rows), np.nan)
    for verdict in judge_rows:
        i, j, row = index.get(verdict["a"]), index.get(verdict["b"]), verdict["row"]
        if i is None or j is None or not 0 <= row < votes.rows:
            continue
        winner = verdict["winner"]
        side = 1.0 if winner == verdict["a"] else -1.0 if winner == verdict["b"] else 0.0
        table[i, j, row], table[j, i, row] = side, -side
    return _agreement(votes, table)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def metric_agreement(
    votes: VoteArrays, scores: Mapping[str, Sequence[Any]], *, greater_is_better: bool
) -> dict[str, Any]:
    """How often people picked the output a metric scores better (equal scores are a tie).

    ``scores`` maps each label to its per-row score of the metric; rows where either score is
    missing are not compared.
    """
    n = len(votes.labels)
    matrix = np.full((n, votes.rows), np.nan)
    for i, label in enumerate(votes.labels):
        per_row = scores.get(label)
        if per_row is not None:
            values = [_number(v) for v in per_row[: votes.rows]]
            matrix[i, : len(values)] = values
    direction = 1.0 if greater_is_better else -1.0
    # table[i, j, row] = the side the metric favours with i shown as a; NaN propagates.
    table = np.sign(matrix[:, None, :] - matrix[None, :, :]) * direction
    return _agreement(votes, table)
