"""The judge: reply parsing, position-bias cancelling, Bradley-Terry, and real judges (a loopback
OpenAI-compatible server and a local model)."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from services.worker import pipeline
from services.worker.judge import (
    RUBRICS,
    EndpointJudge,
    JudgeError,
    JudgeUnavailable,
    LocalJudge,
    bradley_terry,
    judge_pairs,
    parse_score,
    parse_winner,
    score_rows,
)
from services.worker.models import ModelCache
from shared.schemas import CandidateState, CandidateStatus, ComparisonCreate, ComparisonStatus, Progress
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import FINALIZE_COMPARISON, RUN_CANDIDATE
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


def test_a_huge_reply_is_parsed_in_bounded_time():
    started = time.perf_counter()
    assert parse_score("{" * 60_000) == (None, "unparseable judge reply: " + "{" * 300)
    assert parse_winner("{" * 60_000) is None
    assert time.perf_counter() - started < 1


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


def test_endpoint_judge_reports_refusals_without_retrying_them():
    with JudgeServer(api_key="right") as server:
        judge = EndpointJudge(server.base_url, "m", api_key="wrong", retry_base_s=0.01)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.complete_many([[{"role": "user", "content": "hi"}]])
        # A wrong key stays wrong: asked once, not retried.
        assert len(server.requests) == 1


# ------------------------------------------------------------------------------ availability
CAPITAL = {
    "rubric": RUBRICS["correctness"],
    "questions": ["Capital of France?"],
    "answers": ["It is Paris."],
    "references": ["Paris"],
}
HI = [{"role": "user", "content": "hi"}]


def fast_judge(server: JudgeServer, **overrides) -> EndpointJudge:
    options = {"retry_base_s": 0.01, "retry_max_s": 5.0, **overrides}
    return EndpointJudge(server.base_url, "rule-judge", api_key=server.api_key, **options)


class TestUnavailableJudge:
    def test_429_and_5xx_are_retried_and_retry_after_is_honoured(self):
        with JudgeServer() as server:
            server.failures = [(429, {"Retry-After": "1"}), (503, {})]
            scores, justifications = score_rows(fast_judge(server), **CAPITAL)
            assert (scores, justifications) == ([5.0], ["rule-based score 5"])
            assert len(server.requests) == 3
            # The retry waited as long as the judge asked, not the 10 ms back-off.
            assert server.requests[1]["at"] - server.requests[0]["at"] >= 1.0
            assert server.requests[2]["at"] - server.requests[1]["at"] < 1.0

    def test_a_judge_that_keeps_failing_gives_up_after_bounded_retries(self):
        with JudgeServer() as server:
            server.fail_always = 500
            judge = fast_judge(server, max_retries=2, concurrency=2)
            with pytest.raises(JudgeUnavailable, match="3 attempts failed, the last with HTTP 500"):
                score_rows(judge, **{**CAPITAL, **{k: v * 6 for k, v in CAPITAL.items() if k != "rubric"}})
            # The first row to give up stops the others: three attempts, and at most three for
            # the row running beside it; the four rows left never went out.
            assert 3 <= len(server.requests) <= 6
            sent = len(server.requests)
            # The same judge (one candidate's) sends nothing more.
            with pytest.raises(JudgeUnavailable, match="HTTP 500"):
                judge.complete_many([HI])
            assert len(server.requests) == sent

    def test_a_hanging_judge_is_given_up_within_its_time_bound(self):
        with JudgeServer() as server:
            server.hang_s = 60
            judge = fast_judge(server, timeout_s=0.5, max_retries=1)
            started = time.monotonic()
            with pytest.raises(
                JudgeUnavailable, match=r"2 attempts failed, the last with no reply within 0\.5 s"
            ):
                judge.complete_many([HI])
            assert time.monotonic() - started < 5
            assert len(server.requests) == 2

    def test_a_retry_after_beyond_the_cap_gives_up_at_once(self):
        with JudgeServer() as server:
            server.failures = [(429, {"Retry-After": "3600"})]
            judge = fast_judge(server, retry_max_s=2.0)
            started = time.monotonic()
            with pytest.raises(JudgeUnavailable, match="retry after 3600 s, longer than JUDGE_RETRY_MAX_S"):
                judge.complete_many([HI])
            assert time.monotonic() - started < 2
            assert len(server.requests) == 1


ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris"},
    {"input": "What is two plus two?", "reference": "four"},
]


def test_a_judge_outage_leaves_judge_scores_null_and_the_comparison_succeeds(
    redis_client, redis_prefix, tiny_models, model_root, tmp_path
):
    """The whole comparison, in process the way the tasks run it, against a judge that answers
    every request with 503: the candidates and the comparison succeed, the judge metrics are
    null with the reason, the ranking is null with the reason, and the parent run ends."""
    with JudgeServer(api_key="k") as server:
        server.fail_always = 503
        settings = Settings(
            mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            model_roots=[model_root],
            key_prefix=redis_prefix,
            judge_base_url=server.base_url,
            judge_model="rule-judge",
            judge_api_key="k",
            judge_max_retries=1,
            judge_retry_base_s=0.01,
        )
        store = ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)
        sent: list[tuple[str, dict]] = []
        ctx = pipeline.WorkerContext(
            settings=settings,
            store=store,
            models=ModelCache(),
            dispatch=lambda name, kwargs, task_id: sent.append((name, kwargs)),
        )
        mlflow_client = MlflowClient(settings.mlflow_tracking_uri)
        experiment = f"judge-outage-{redis_prefix}"
        mlflow_client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
        spec = ComparisonCreate.model_validate(
            {
                "name": "judge-outage",
                "candidates": [
                    {
                        "label": "causal",
                        "model": str(tiny_models["causal"]),
                        "generation": {"max_new_tokens": 4},
                    },
                    {
                        "label": "t5",
                        "model": str(tiny_models["seq2seq"]),
                        "generation": {"max_new_tokens": 4},
                    },
                ],
                "dataset": {"rows": ROWS},
                "pairwise_judge": True,
            }
        )
        comparison_id = uuid.uuid4().hex
        store.create(
            comparison_id=comparison_id,
            spec=spec,
            experiment=experiment,
            metrics=["output_words", "judge_correctness"],
        )
        pipeline.start_comparison(ctx, comparison_id)
        while sent:
            name, kwargs = sent.pop(0)
            if name == RUN_CANDIDATE:
                assert pipeline.run_candidate(ctx, comparison_id, kwargs["label"]) == "succeeded"
            else:
                assert name == FINALIZE_COMPARISON
                pipeline.finalize_comparison(ctx, comparison_id)
        assert server.requests, "the judge was never asked"

    record = store.get(comparison_id)
    assert store.status(comparison_id) is ComparisonStatus.succeeded
    assert record.judge_ranking is None
    assert "HTTP 503" in record.judge_ranking_unavailable
    parent = mlflow_client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "HTTP 503" in parent.data.tags["llm_compare.judge_ranking_unavailable"]
    for candidate in store.candidates(comparison_id, ["causal", "t5"]):
        assert candidate.status is CandidateState.succeeded
        assert candidate.metrics["judge_correctness"] is None
        assert candidate.metrics["output_words"] >= 0
        reason = candidate.metrics_unavailable["judge_correctness"]
        assert "is unavailable" in reason and "HTTP 503" in reason
        # What the API serves for it: null beside the reason.
        read = CandidateStatus(
            label=candidate.label,
            model=candidate.model,
            status=candidate.status,
            progress=Progress(),
            metrics=candidate.metrics,
            metrics_unavailable=candidate.metrics_unavailable,
        )
        assert read.metrics["judge_correctness"] is None
        rows = store.outputs(comparison_id, candidate.label)
        assert [r["scores"]["judge_correctness"] for r in rows] == [None, None]
        run = mlflow_client.get_run(candidate.run_id)
        assert run.info.status == "FINISHED"
        assert "HTTP 503" in run.data.tags["llm_compare.metrics_unavailable"]


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
