"""The metric registry: each metric's scale, and custom metrics read back from Redis."""

from __future__ import annotations

import json

import pytest

from shared.metrics import METRICS, MetricInfo, metric_registry
from shared.store import ComparisonStore


class TestScales:
    def test_every_builtin_declares_its_scale(self):
        binary = {"exact_match", "contains_reference", "empty_output", "refusal", "json_valid", "regex_match"}
        bounded = {
            **dict.fromkeys(
                ["token_f1", "rouge1", "rouge2", "rougeL", "repetition", "distinct_2"], (0.0, 1.0)
            ),
            "bleu": (0.0, 100.0),
            "chrf": (0.0, 100.0),
            "semantic_similarity": (-1.0, 1.0),
            **dict.fromkeys(["judge_correctness", "judge_helpfulness", "judge_rubric"], (1.0, 5.0)),
        }
        non_negative = {
            "output_tokens",
            "output_words",
            "latency",
            "tokens_per_second",
            "time_to_first_token",
            "input_tokens",
            "cost",
        }
        free = {"flesch_kincaid_grade", "ari_grade_level"}
        assert binary | set(bounded) | non_negative | free == set(METRICS)
        for name, info in METRICS.items():
            scale = (info.scale, info.min_value, info.max_value)
            if name in binary:
                assert scale == ("binary", 0.0, 1.0), name
            elif name in bounded:
                assert scale == ("bounded", *bounded[name]), name
            elif name in non_negative:
                assert scale == ("unbounded", 0.0, None), name
            else:
                assert scale == ("unbounded", None, None), name

    def test_binary_implies_the_range_0_1(self):
        info = MetricInfo("hit", "0 or 1", greater_is_better=True, scale="binary")
        assert (info.min_value, info.max_value) == (0.0, 1.0) and info.binary

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"scale": "percent"}, "scale must be one of"),
            ({"scale": "bounded", "min_value": 0.0}, "needs min_value and max_value"),
            ({"scale": "binary", "max_value": 5.0}, "scores 0 or 1"),
            ({"min_value": 2.0, "max_value": 1.0}, "min_value must be below max_value"),
        ],
    )
    def test_an_inconsistent_scale_is_refused(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            MetricInfo("m", "d", greater_is_better=True, **kwargs)


class TestRegistry:
    def test_custom_metrics_keep_their_scale_and_direction_through_redis(self, redis_client, redis_prefix):
        published = MetricInfo(
            "share_cited",
            "share of sentences with a citation",
            greater_is_better=True,
            custom=True,
            group="custom",
            scale="bounded",
            min_value=0.0,
            max_value=1.0,
        )
        ComparisonStore(redis_client, prefix=redis_prefix).publish_custom_metrics(
            {"share_cited": json.dumps(published.as_dict())}
        )
        registry = metric_registry(ComparisonStore(redis_client, prefix=redis_prefix))
        assert registry["share_cited"] == published
        assert registry["exact_match"] is METRICS["exact_match"]

    def test_an_entry_from_a_worker_without_scales_reads_as_unbounded(self, redis_client, redis_prefix):
        old = {"name": "legacy", "description": "d", "greater_is_better": False, "custom": True}
        ComparisonStore(redis_client, prefix=redis_prefix).publish_custom_metrics({"legacy": json.dumps(old)})
        info = metric_registry(ComparisonStore(redis_client, prefix=redis_prefix))["legacy"]
        assert (info.scale, info.min_value, info.max_value) == ("unbounded", None, None)
        assert info.greater_is_better is False
