"""Bradley-Terry fits and the arena ranking with bootstrap intervals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from shared.ranking import arena_ranking, bradley_terry, elo_scores, fit_strengths


def by_label(ranking):
    return {entry["label"]: entry for entry in ranking}


class TestBradleyTerry:
    def test_two_candidates_by_hand(self):
        # x beats y 3 times and loses once; with the prior (half a win each way for two
        # candidates) x has 3.5 wins to y's 1.5, and for two players the fitted strength
        # ratio equals the wins ratio.
        strengths = bradley_terry(["x", "y"], [("x", "y", "x")] * 3 + [("x", "y", "y")])
        assert strengths["x"] / strengths["y"] == pytest.approx(3.5 / 1.5, rel=1e-9)
        assert strengths["x"] + strengths["y"] == pytest.approx(2.0)

    def test_matches_the_minorisation_maximisation_fixed_point(self):
        # Three candidates: at the maximum-likelihood fit, each one's expected wins equal its
        # actual wins (the MM update leaves it unchanged).
        verdicts = [("a", "b", "a")] * 4 + [("b", "c", "b")] * 2 + [("a", "c", "tie")] * 3 + [("c", "a", "c")]
        strengths = bradley_terry(["a", "b", "c"], verdicts)
        wins = np.full((3, 3), 0.25)
        np.fill_diagonal(wins, 0)
        index = {"a": 0, "b": 1, "c": 2}
        for a, b, w in verdicts:
            i, j = index[a], index[b]
            if w == a:
                wins[i, j] += 1
            elif w == b:
                wins[j, i] += 1
            else:
                wins[i, j] += 0.5
                wins[j, i] += 0.5
        p = np.array([strengths[k] for k in "abc"])
        games = wins + wins.T
        expected = (games * p[:, None] / (p[:, None] + p[None, :])).sum(axis=1)
        np.testing.assert_allclose(expected, wins.sum(axis=1), rtol=1e-9)
        # c loses to b twice but beats or ties a, who beat b every time: c ranks above b.
        assert strengths["a"] > strengths["c"] > strengths["b"]

    def test_stacked_fit_equals_one_at_a_time(self):
        rng = np.random.default_rng(5)
        stack = rng.integers(0, 6, size=(4, 3, 3)).astype(float) + 0.25
        for k in range(4):
            np.fill_diagonal(stack[k], 0)
        together = fit_strengths(stack)
        for k in range(4):
            np.testing.assert_allclose(together[k], fit_strengths(stack[k]), rtol=1e-9)

    def test_judge_uses_the_shared_fit(self):
        from services.worker import judge

        assert judge.bradley_terry is bradley_terry


class TestArenaRanking:
    def test_scores_by_hand(self):
        ranking = arena_ranking(["x", "y"], [("x", "y", "a")] * 3 + [("x", "y", "b")], resamples=0)
        # Strength ratio 3.5 / 1.5; scores sit symmetrically around 1000 (geometric mean).
        delta = 200 * math.log10(3.5 / 1.5)
        assert [e["label"] for e in ranking] == ["x", "y"]
        assert by_label(ranking)["x"]["score"] == pytest.approx(1000 + delta)
        assert by_label(ranking)["y"]["score"] == pytest.approx(1000 - delta)
        assert by_label(ranking)["x"] | {"score": 0} == {
            "label": "x",
            "rank": 1,
            "score": 0,
            "ci_low": None,
            "ci_high": None,
            "wins": 3,
            "losses": 1,
            "ties": 0,
            "votes": 4,
        }

    def test_sides_are_relative_to_the_vote(self):
        # "b" as winner with the labels swapped is the same verdict.
        one = arena_ranking(["x", "y"], [("x", "y", "a")], resamples=0)
        other = arena_ranking(["x", "y"], [("y", "x", "b")], resamples=0)
        assert by_label(one)["x"]["score"] == pytest.approx(by_label(other)["x"]["score"])
        assert by_label(one)["x"]["score"] > 1000

    def test_a_candidate_that_wins_everything_is_top_and_finite(self):
        labels = ["a", "b", "c"]
        votes = [("a", "b", "a")] * 30 + [("c", "a", "b")] * 30 + [("b", "c", "a"), ("b", "c", "b")]
        ranking = arena_ranking(labels, votes)
        assert ranking[0]["label"] == "a" and ranking[0]["rank"] == 1
        assert (ranking[0]["wins"], ranking[0]["losses"], ranking[0]["ties"]) == (60, 0, 0)
        for entry in ranking:
            assert all(math.isfinite(entry[k]) for k in ("score", "ci_low", "ci_high"))
        assert ranking[0]["score"] > by_label(ranking)["b"]["score"] + 300
        assert by_label(ranking)["b"]["score"] == pytest.approx(by_label(ranking)["c"]["score"])
        # Equal scores share a rank.
        assert by_label(ranking)["b"]["rank"] == by_label(ranking)["c"]["rank"] == 2

    def test_bootstrap_interval_contains_the_point_score(self):
        labels = ["a", "b", "c", "d"]
        rng = random.Random(11)
        truth = {"a": 4.0, "b": 2.0, "c": 1.0, "d": 0.5}
        votes = []
        for _ in range(400):
            x, y = rng.sample(labels, 2)
            won = rng.random() < truth[x] / (truth[x] + truth[y])
            votes.append((x, y, "tie" if rng.random() < 0.1 else ("a" if won else "b")))
        ranking = arena_ranking(labels, votes)
        assert [e["label"] for e in ranking] == ["a", "b", "c", "d"]
        for entry in ranking:
            assert entry["ci_low"] < entry["score"] < entry["ci_high"]
            assert 20 < entry["ci_high"] - entry["ci_low"] < 300
        # Seeded: the same votes give the same intervals.
        again = arena_ranking(labels, votes)
        assert [(e["ci_low"], e["ci_high"]) for e in again] == [(e["ci_low"], e["ci_high"]) for e in ranking]
        # A different seed moves them a little, not the point scores.
        other = arena_ranking(labels, votes, seed=1)
        assert [e["score"] for e in other] == [e["score"] for e in ranking]
        assert [e["ci_low"] for e in other] != [e["ci_low"] for e in ranking]

    def test_ties_and_both_bad_count_half_each_way(self):
        tie = arena_ranking(["x", "y"], [("x", "y", "tie")] * 3)
        both_bad = arena_ranking(["x", "y"], [("x", "y", "both_bad")] * 3)
        assert tie == both_bad
        assert [e["score"] for e in tie] == [pytest.approx(1000)] * 2
        assert [(e["wins"], e["losses"], e["ties"], e["votes"]) for e in tie] == [(0, 0, 3, 3)] * 2
        # A tie and a win each way weigh the same as two ties.
        mixed = arena_ranking(["x", "y"], [("x", "y", "a"), ("x", "y", "b")], resamples=0)
        assert by_label(mixed)["x"]["score"] == pytest.approx(1000)
        # One win and one tie: x has 1.5 + 0.5 prior wins, y has 0.5 + 0.5.
        leaning = arena_ranking(["x", "y"], [("x", "y", "a"), ("x", "y", "both_bad")], resamples=0)
        assert by_label(leaning)["x"]["score"] == pytest.approx(1000 + 200 * math.log10(2.0 / 1.0))

    def test_no_votes_means_1000_and_no_intervals(self):
        ranking = arena_ranking(["a", "b", "c"], [])
        assert [
            (e["label"], e["rank"], e["score"], e["ci_low"], e["ci_high"], e["votes"]) for e in ranking
        ] == [
            ("a", 1, 1000.0, None, None, 0),
            ("b", 1, 1000.0, None, None, 0),
            ("c", 1, 1000.0, None, None, 0),
        ]

    def test_votes_on_unranked_candidates_are_ignored(self):
        with_failed = arena_ranking(["x", "y"], [("x", "y", "a"), ("x", "gone", "b"), ("gone", "y", "a")])
        alone = arena_ranking(["x", "y"], [("x", "y", "a")])
        assert with_failed == alone

    def test_elo_scale_is_relative_to_the_geometric_mean(self):
        scores = elo_scores(np.array([1.0, 10.0, 100.0]))
        np.testing.assert_allclose(scores, [600.0, 1000.0, 1400.0])
