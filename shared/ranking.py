"""Bradley-Terry rankings from pairwise verdicts: the LLM judge's and people's arena votes.

Pure numpy, so the gateway (which imports none of the worker's stack) and the workers fit with
the same code. The fit runs on a stack of win matrices at once, which is what makes a
1,000-resample bootstrap cheap enough to compute on every ``GET .../votes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ITERATIONS = 100
# Newton steps on log-strengths: stop once none moves by more than this, cap each at MAX_STEP.
TOLERANCE = 1e-10
MAX_STEP = 2.0
ELO_BASE = 1000.0
ELO_SCALE = 400.0
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# An arena vote as (label shown as a, label shown as b, winner side).
ArenaVote = tuple[str, str, str]
_SIDE_CODE = {"a": 0, "b": 1, "tie": 2, "both_bad": 2}
_FLIPPED = (1, 0, 2)

ARENA_METHOD = (
    "Bradley-Terry strengths fitted to the votes (tie and both_bad count as half a win each way, "
    "plus a prior of one tie per candidate, spread over the others, that keeps strengths finite), "
    "reported on an "
    "Elo-like scale of 1000 + 400*log10(strength / geometric mean of strengths) as Chatbot Arena "
    f"does, with {CONFIDENCE:.0%} percentile-bootstrap intervals from "
    f"{BOOTSTRAP_RESAMPLES:,} seeded resamples of the votes."
)


def _prior(n: int) -> np.ndarray:
    """1/(n-1) of a tie between every two candidates (one tie per candidate in all), so that a
    candidate that wins or loses everything still gets a finite strength."""
    prior = np.full((n, n), 0.5 / max(1, n - 1))
    np.fill_diagonal(prior, 0.0)
    return prior


def fit_strengths(
    wins: np.ndarray, iterations: int = ITERATIONS, start: np.ndarray | None = None
) -> np.ndarray:
    """Bradley-Terry strengths for a stack of win matrices, shape (..., n, n), where
    ``wins[..., i, j]`` is how often i beat j (ties counted half each way).

    Maximum likelihood by Newton's method on log-strengths, every matrix of the stack at once:
    a handful of batched n-by-n solves instead of the hundreds of minorisation-maximisation
    sweeps that a lopsided bootstrap resample needs. ``start`` (strengths broadcastable to the
    result) warm-starts the search. Strengths are normalised to sum to n, so 1.0 is average.
    Every candidate needs at least one game (the prior gives it one).
    """
    n = wins.shape[-1]
    games = wins + np.swapaxes(wins, -1, -2)
    totals = wins.sum(axis=-1)
    theta = np.zeros(wins.shape[:-1])
    if start is not None:
        theta = theta + np.log(start)
    diagonal = np.arange(n)
    for _ in range(iterations):
        strength = np.exp(theta)
        # beats[..., i, j]: the fitted chance that i beats j.
        beats = strength[..., :, None] / (strength[..., :, None] + strength[..., None, :])
        gradient = totals - (games * beats).sum(axis=-1)
        weight = games * beats * (1.0 - beats)
        # The negative Hessian is the Laplacian of those weights; it is singular along the all-ones
        # direction (only strength ratios matter), which adding 1/n to every entry removes without
        # changing the step, as the gradient sums to zero.
        hessian = 1.0 / n - weight
        hessian[..., diagonal, diagonal] += weight.sum(axis=-1)
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        # Damped: a first step from equal strengths can overshoot on lopsided data.
        step = np.clip(step, -MAX_STEP, MAX_STEP)
        theta = theta + step
        theta -= theta.mean(axis=-1, keepdims=True)
        if np.max(np.abs(step)) < TOLERANCE:
            break
    strength = np.exp(theta)
    return strength * (n / strength.sum(axis=-1, keepdims=True))


def bradley_terry(
    labels: Sequence[str], verdicts: Sequence[tuple[str, str, str]], iterations: int = ITERATIONS
) -> dict[str, float]:
    """Bradley-Terry strengths from (a, b, winner) verdicts, where winner is a label and anything
    else (``"tie"``) counts as half a win each way. Strengths sum to the number of candidates, so
    1.0 is average; a small prior keeps them finite when a candidate wins or loses everything."""
    if not labels:
        return {}
    index = {label: i for i, label in enumerate(labels)}
    wins = _prior(len(labels))
    for a, b, winner in verdicts:
        i, j = index[a], index[b]
        if winner == a:
            wins[i, j] += 1
        elif winner == b:
            wins[j, i] += 1
        else:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
    strength = fit_strengths(wins, iterations)
    return {label: float(strength[index[label]]) for label in labels}


def elo_scores(strength: np.ndarray) -> np.ndarray:
    """1000 + 400*log10(strength / geometric mean of strengths), along the last axis."""
    logs = np.log10(strength)
    return ELO_BASE + ELO_SCALE * (logs - logs.mean(axis=-1, keepdims=True))


def arena_ranking(
    labels: Sequence[str],
    votes: Sequence[ArenaVote],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Rank candidates from arena votes: Bradley-Terry scores on the Elo-like scale with
    percentile-bootstrap intervals (``resamples=0`` skips them).

    Votes naming a label outside ``labels`` are ignored. Entries come best first; candidates
    whose scores are equal share a rank (1, 1, 3...). With no votes every score is 1000 and the
    intervals are None.
    """
    labels = list(labels)
    n = len(labels)
    if n == 0:
        return []
    index = {label: i for i, label in enumerate(labels)}
    kept = [
        (index[a], index[b], _SIDE_CODE[winner])
        for a, b, winner in votes
        if a in index and b in index and a != b and winner in _SIDE_CODE
    ]
    # One integer per vote, (i, j, outcome) with i < j whichever side each was shown on:
    # outcome 0 = i won, 1 = j won, 2 = tie. Fewer distinct codes make the bootstrap cheaper.
    codes = np.array(
        [
            (i * n + j) * 3 + outcome if i < j else (j * n + i) * 3 + _FLIPPED[outcome]
            for i, j, outcome in kept
        ],
        dtype=np.int64,
    )
    a_of, b_of, outcome = codes // 3 // n, codes // 3 % n, codes % 3
    wins = np.bincount(a_of[outcome == 0], minlength=n) + np.bincount(b_of[outcome == 1], minlength=n)
    losses = np.bincount(a_of[outcome == 1], minlength=n) + np.bincount(b_of[outcome == 0], minlength=n)
    ties = np.bincount(a_of[outcome == 2], minlength=n) + np.bincount(b_of[outcome == 2], minlength=n)

    scores = np.full(n, ELO_BASE)
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    if len(codes) and n >= 2:
        # Resampling votes with replacement only changes how often each distinct (pair, outcome)
        # occurs, so each resample is a multinomial draw over those categories: the same
        # distribution as redrawing the votes, at a cost independent of the number of votes.
        categories, counts = np.unique(codes, return_counts=True)
        first, second, kind = categories // 3 // n, categories // 3 % n, categories % 3
        share = np.array([1.0, 0.0, 0.5])[kind]  # what the first candidate scores

        def win_matrices(category_counts: np.ndarray) -> np.ndarray:
            """(m, categories) counts -> (m, n, n) win matrices, prior included. Scattered rather
            than multiplied by a dense matrix: a BLAS product this size starts threads that then
            spin, competing with the request on a small machine."""
            flat = np.zeros((n * n, len(category_counts)))
            per_category = category_counts.T.astype(float)
            np.add.at(flat, first * n + second, per_category * share[:, None])
            np.add.at(flat, second * n + first, per_category * (1.0 - share)[:, None])
            return flat.T.reshape(-1, n, n) + _prior(n)

        point = fit_strengths(win_matrices(counts[None, :]))[0]
        scores = elo_scores(point)
        if resamples > 0:
            rng = np.random.default_rng(seed)
            drawn = rng.multinomial(len(codes), counts / counts.sum(), size=resamples)
            # Resamples sit near the point fit: starting there saves most Newton steps.
            resampled = fit_strengths(win_matrices(drawn), start=point)
            tail = (1.0 - confidence) / 2 * 100
            low, high = np.percentile(elo_scores(resampled), [tail, 100 - tail], axis=0)

    order = sorted(range(n), key=lambda k: (-round(float(scores[k]), 6), k))
    ranking: list[dict[str, Any]] = []
    for position, k in enumerate(order, start=1):
        tied_with_previous = ranking and round(float(scores[k]), 6) == round(ranking[-1]["score"], 6)
        ranking.append(
            {
                "label": labels[k],
                "rank": ranking[-1]["rank"] if tied_with_previous else position,
                "score": float(scores[k]),
                "ci_low": None if low is None else float(low[k]),
                "ci_high": None if high is None else float(high[k]),
                "wins": int(wins[k]),
                "losses": int(losses[k]),
                "ties": int(ties[k]),
                "votes": int(wins[k] + losses[k] + ties[k]),
            }
        )
    return ranking
