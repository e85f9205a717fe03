"""The judge: reply parsing, position-bias cancelling, Bradley-Terry, and real judges (a loopback
OpenAI-compatible server and a local model)."""

from __future__ import annotations

import pytest

from services.worker.judge import (
    RUBRICS,
    EndpointJudge,
    LocalJudge,
    bradley_terry,
    judge_pairs,
    parse_score,
    parse_winner,
    score_rows,
)
from shared.settings import Settings
from tests.fixtures.judge_server import JudgeServer


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"score": 4, "justification": "good"}', 4.0),
        ('Sure! {"score": 2, "justification": "meh"} Hope this helps.', 2.0),
        ("Score: 5. Clear and right.", 5.0),
        ('{"score": 9, "justification": "out of range"}', None),
        ("I cannot judge this.", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply)[0] == score


def test_parse_winner():
    assert parse_winner('{"winner": "B", "justification": "x"}') == "B"
    assert parse_winner('{"winner": "tie"}') == "tie"
    assert parse_winner("Winner: A because it is right") == "A"
    assert parse_winner("no idea") is None


class AlwaysFirst:
    """A judge with pure position bias: it always prefers whichever answer it sees first."""

    name = "always-first"

    def complete_many(self, conversations):
        return ['{"winner": "A", "justification": "first"}' for _ in conversations]


class PrefersLonger:
    name = "prefers-longer"

    def complete_many(self, conversations):
        replies = []
        for messages in conversations:
            text = messages[-1]["content"]
            a = text.split("Answer A: ")[1].split("\n\nAnswer B: ")[0]
            b = text.split("Answer B: ")[1]
            replies.append(
                '{"winner": "%s"}' % ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")
            )
        return replies


def test_swapping_the_order_cancels_position_bias():
    verdicts = judge_pairs(
        AlwaysFirst(),
        a="x",
        b="y",
        questions=["q1", "q2"],
        outputs_a=["a", "b"],
        outputs_b=["c", "d"],
        references=[None, None],
    )
    assert [v.winner for v in verdicts] == ["tie", "tie"]
    assert [(v.first_order, v.swapped_order) for v in verdicts] == [("x", "y"), ("x", "y")]


def test_consistent_preferences_survive_the_swap():
    verdicts = judge_pairs(
        PrefersLonger(),
        a="x",
        b="y",
        questions=["q1", "q2", "q3"],
        outputs_a=["long answer", "a", "same"],
        outputs_b=["short", "longer one", "same"],
        references=[None] * 3,
    )
    assert [v.winner for v in verdicts] == ["x", "y", "tie"]


def test_bradley_terry_by_hand():
    # x beats y 3 times, loses once; with the prior (a tie each way) x has 3.5 wins to y's 1.5,
    # and for two players the MM fixed point is strength ratio = wins ratio.
    strengths = bradley_terry(["x", "y"], [("x", "y", "x")] * 3 + [("x", "y", "y")])
    assert strengths["x"] / strengths["y"] == pytest.approx(3.5 / 1.5, rel=1e-6)
    assert strengths["x"] + strengths["y"] == pytest.approx(2.0)
    three = bradley_terry(
        ["a", "b", "c"], [("a", "b", "a"), ("b", "c", "b"), ("a", "c", "a"), ("a", "c", "tie")]
    )
    assert three["a"] > three["b"] > three["c"]


def test_endpoint_judge_against_a_loopback_server():
    with JudgeServer(api_key="k1") as server:
        judge = EndpointJudge(server.base_url, "tiny-judge", api_key="k1")
        scores, justifications = score_rows(
            judge,
            rubric=RUBRICS["correctness"],
            questions=["Capital of France?", "Capital of Italy?"],
            answers=["It is Paris.", "Milan"],
            references=["Paris", "Rome"],
        )
        assert scores == [5.0, 1.0]
        assert justifications == ["rule-based score 5", "rule-based score 1"]
        assert all(r["model"] == "tiny-judge" and r["auth"] == "Bearer k1" for r in server.requests)
        assert all(r["path"] == "/v1/chat/completions" and r["temperature"] == 0 for r in server.requests)


def test_endpoint_judge_reports_refusals():
    from services.worker.judge import JudgeError

    with JudgeServer(api_key="right") as server:
        judge = EndpointJudge(server.base_url, "m", api_key="wrong")
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.complete_many([[{"role": "user", "content": "hi"}]])


def test_local_model_judge_runs(tiny_models, model_root):
    judge = LocalJudge(str(tiny_models["causal"]), Settings(model_roots=[model_root]), max_new_tokens=4)
    replies = judge.complete_many(
        [[{"role": "user", "content": "Rate this."}], [{"role": "user", "content": "x"}]]
    )
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # A random-weight model writes no score: the row is left unscored, with the reason.
    scores, justifications = score_rows(
        judge, rubric=RUBRICS["helpfulness"], questions=["q"], answers=["a"], references=[None]
    )
    assert scores == [None] and justifications[0].startswith("unparseable judge reply")
