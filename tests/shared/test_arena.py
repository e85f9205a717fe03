"""Drawing blind matchups, and agreement of votes with the judge and the metrics."""

from __future__ import annotations

import random
from collections import Counter

from shared.arena import draw_matchup, encode_votes, judge_agreement, metric_agreement


def differing_outputs(labels: list[str], rows: int) -> dict[str, list[str | None]]:
    return {label: [f"{label} answers row {r}" for r in range(rows)] for label in labels}


def vote_on(drawn, voter=None):
    return {"row": drawn.row, "a": drawn.a, "b": drawn.b, "winner": "a", "voter": voter}


class TestCoverage:
    def test_pairs_and_rows_are_covered_evenly(self):
        labels, rows = ["w", "x", "y", "z"], 5
        outputs = differing_outputs(labels, rows)
        rng = random.Random(7)
        votes: list[dict] = []
        shown = Counter()
        for _ in range(6 * rows * 10):
            drawn = draw_matchup(outputs=outputs, rows=rows, votes=votes, voter=None, rng=rng)
            assert drawn is not None and drawn.a != drawn.b
            shown[(drawn.a, drawn.b)] += 1
            votes.append(vote_on(drawn))
        per_pair = Counter(frozenset((v["a"], v["b"])) for v in votes)
        per_cell = Counter((frozenset((v["a"], v["b"])), v["row"]) for v in votes)
        assert len(per_pair) == 6 and set(per_pair.values()) == {50}
        assert len(per_cell) == 6 * rows and set(per_cell.values()) == {10}
        # Both left/right orders of every pair come up.
        assert len(shown) == 12

    def test_coverage_stays_even_after_uneven_votes(self):
        labels, rows = ["x", "y", "z"], 2
        outputs = differing_outputs(labels, rows)
        votes = [{"row": 0, "a": "x", "b": "y", "winner": "a"}] * 4
        rng = random.Random(1)
        drawn = [
            draw_matchup(outputs=outputs, rows=rows, votes=votes, voter=None, rng=rng) for _ in range(20)
        ]
        # The pairs without votes go first, whatever the random tie-break.
        assert all({d.a, d.b} != {"x", "y"} for d in drawn)
        first = draw_matchup(
            outputs=outputs, rows=rows, votes=votes + [vote_on(d) for d in drawn[:1]], voter=None, rng=rng
        )
        assert first is not None and {first.a, first.b} != {"x", "y"}

    def test_the_least_voted_row_of_the_pair_comes_next(self):
        outputs = differing_outputs(["x", "y"], 3)
        votes = [{"row": r, "a": "y", "b": "x", "winner": "tie"} for r in (0, 0, 1, 1, 2)]
        for seed in range(10):
            drawn = draw_matchup(outputs=outputs, rows=3, votes=votes, voter=None, rng=random.Random(seed))
            assert drawn is not None and drawn.row == 2


class TestVoterAvoidance:
    VOTES = [
        {"row": 0, "a": "x", "b": "y", "winner": "a", "voter": "ann"},
        {"row": 1, "a": "y", "b": "x", "winner": "a", "voter": "ann"},
        {"row": 2, "a": "x", "b": "y", "winner": "b", "voter": "bob"},
        {"row": 2, "a": "x", "b": "y", "winner": "b", "voter": "cid"},
    ]

    def test_a_voter_gets_a_row_they_have_not_judged(self):
        outputs = differing_outputs(["x", "y"], 3)
        for seed in range(10):
            drawn = draw_matchup(
                outputs=outputs, rows=3, votes=self.VOTES, voter="ann", rng=random.Random(seed)
            )
            # Row 2 has the most votes, but it is the only one ann has not judged.
            assert drawn is not None and drawn.row == 2

    def test_others_get_the_least_voted_rows(self):
        outputs = differing_outputs(["x", "y"], 3)
        rows = {
            draw_matchup(outputs=outputs, rows=3, votes=self.VOTES, voter="bob", rng=random.Random(s)).row
            for s in range(20)
        }
        assert rows == {0, 1}

    def test_a_voter_who_judged_every_row_gets_the_least_voted_again(self):
        outputs = differing_outputs(["x", "y"], 3)
        votes = [*self.VOTES, {"row": 2, "a": "x", "b": "y", "winner": "a", "voter": "ann"}]
        rows = {
            draw_matchup(outputs=outputs, rows=3, votes=votes, voter="ann", rng=random.Random(s)).row
            for s in range(20)
        }
        assert rows == {0, 1}


class TestIdenticalOutputs:
    def test_identical_rows_are_skipped_while_differing_ones_remain(self):
        outputs = {
            "x": ["same", "x one", "x two"],
            "y": ["  same\n", "y one", "y two"],
        }
        rows = {
            draw_matchup(outputs=outputs, rows=3, votes=[], voter=None, rng=random.Random(s)).row
            for s in range(30)
        }
        assert rows == {1, 2}

    def test_a_pair_that_always_agrees_waits_for_the_others(self):
        outputs = {
            "x": ["a b", "c"],
            "y": ["a  b", " c "],  # the same as x once whitespace is collapsed
            "z": ["other", "else"],
        }
        # x-z and y-z already have many votes, x-y none: still x-y is not drawn.
        votes = [{"row": 0, "a": "x", "b": "z", "winner": "a"}] * 5 + [
            {"row": 1, "a": "z", "b": "y", "winner": "a"}
        ] * 5
        for seed in range(20):
            drawn = draw_matchup(outputs=outputs, rows=2, votes=votes, voter=None, rng=random.Random(seed))
            assert drawn is not None and "z" in (drawn.a, drawn.b)

    def test_identical_ones_are_drawn_when_nothing_else_is_left(self):
        outputs = {"x": ["same", None], "y": ["same ", ""]}
        drawn = draw_matchup(outputs=outputs, rows=2, votes=[], voter=None, rng=random.Random(0))
        assert drawn is not None and {drawn.a, drawn.b} == {"x", "y"} and drawn.row in (0, 1)


class TestNothingToDraw:
    def test_one_candidate_or_no_rows(self):
        rng = random.Random(0)
        assert draw_matchup(outputs={"x": ["a"]}, rows=1, votes=[], voter=None, rng=rng) is None
        assert draw_matchup(outputs={"x": [], "y": []}, rows=0, votes=[], voter=None, rng=rng) is None

    def test_seeded_draws_repeat(self):
        outputs = differing_outputs(["x", "y", "z"], 4)
        first = [
            draw_matchup(outputs=outputs, rows=4, votes=[], voter=None, rng=random.Random(3)) for _ in "ab"
        ]
        assert first[0] == first[1]


class TestAgreement:
    def test_judge(self):
        judge_rows = [
            {"row": 0, "a": "x", "b": "y", "winner": "x"},
            {"row": 1, "a": "x", "b": "y", "winner": "tie"},
        ]
        votes = [
            {"row": 0, "a": "y", "b": "x", "winner": "b"},  # x: agrees
            {"row": 0, "a": "x", "b": "y", "winner": "b"},  # y: disagrees
            {"row": 1, "a": "x", "b": "y", "winner": "both_bad"},  # a tie: agrees
            {"row": 2, "a": "x", "b": "y", "winner": "a"},  # no verdict: not compared
        ]
        encoded = encode_votes(votes, ["x", "y"], rows=3)
        assert judge_agreement(encoded, judge_rows) == {"agree": 2, "compared": 3, "rate": 2 / 3}
        assert judge_agreement(encoded, []) == {"agree": 0, "compared": 0, "rate": None}

    def test_votes_on_other_labels_or_rows_are_not_compared(self):
        judge_rows = [
            {"row": 0, "a": "x", "b": "y", "winner": "y"},
            {"row": 5, "a": "x", "b": "y", "winner": "x"},
        ]
        votes = [
            {"row": 0, "a": "x", "b": "gone", "winner": "a"},
            {"row": 5, "a": "x", "b": "y", "winner": "a"},  # beyond the rows given
            {"row": 0, "a": "x", "b": "y", "winner": "b"},
        ]
        encoded = encode_votes(votes, ["x", "y"], rows=2)
        assert judge_agreement(encoded, judge_rows) == {"agree": 1, "compared": 1, "rate": 1.0}

    def test_metric_by_direction_skipping_missing_scores(self):
        scores = {"x": [1.0, 0.5, None, float("nan"), 2.0], "y": [0.0, 0.5, 1.0, 1.0, 3.0]}
        votes = [
            {"row": 0, "a": "x", "b": "y", "winner": "a"},
            {"row": 1, "a": "x", "b": "y", "winner": "tie"},
            {"row": 2, "a": "x", "b": "y", "winner": "a"},
            {"row": 3, "a": "x", "b": "y", "winner": "a"},
            {"row": 4, "a": "y", "b": "x", "winner": "b"},
        ]
        encoded = encode_votes(votes, ["x", "y"], rows=5)
        higher = metric_agreement(encoded, scores, greater_is_better=True)
        assert higher == {"agree": 2, "compared": 3, "rate": 2 / 3}
        lower = metric_agreement(encoded, scores, greater_is_better=False)
        # Row 0: y better, person chose x; row 1: tie, tie; row 4: x better, person chose x.
        assert lower == {"agree": 2, "compared": 3, "rate": 2 / 3}
        assert metric_agreement(encoded, {"x": scores["x"]}, greater_is_better=True)["compared"] == 0
        # A score that is not a number (a judge's justification, say) is no score.
        worded = {"x": ["fine", 0.5, None, None, None], "y": [0.0, 0.5, 1.0, 1.0, 3.0]}
        assert metric_agreement(encoded, worded, greater_is_better=True) == {
            "agree": 1,
            "compared": 1,
            "rate": 1.0,
        }
