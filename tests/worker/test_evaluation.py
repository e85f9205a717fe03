"""mlflow.evaluate() on generated outputs, against a real (SQLite) MLflow tracking store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.worker.evaluation import evaluate_outputs
from services.worker.generation import Generated


@pytest.fixture
def run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("evaluation", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment_id)
    yield client, experiment_id, run.info.run_id
    mlflow.set_tracking_uri(None)


GENERATED = [Generated("Paris.", 3, 0.5), Generated("It is Rome, I think", 6, 1.5)]


@pytest.mark.parametrize("with_references", [True, False])
def test_scores_per_row_and_aggregates(run, with_references):
    client, experiment_id, run_id = run
    rows = [{"input": "Capital of France?", "topic": "geo"}, {"input": "Capital of Italy?", "topic": "geo"}]
    metrics = ["output_tokens", "output_words", "latency", "ari_grade_level"]
    if with_references:
        rows[0]["reference"], rows[1]["reference"] = "Paris", "Rome"
        metrics = ["exact_match", "contains_reference", *metrics]
    scored = evaluate_outputs(
        run_id=run_id,
        experiment_id=experiment_id,
        rows=rows,
        prompts=["p0", "p1"],
        generated=GENERATED,
        metric_names=metrics,
        model_type=None,
    )
    assert [s["output_tokens"] for s in scored["row_scores"]] == [3.0, 6.0]
    assert [s["output_words"] for s in scored["row_scores"]] == [1.0, 5.0]
    assert [s["latency"] for s in scored["row_scores"]] == [0.5, 1.5]
    assert scored["metrics"]["latency"] == 1.0
    tokens = scored["aggregates"]["output_tokens"]
    assert tokens["mean"] == 4.5 and tokens["ci_method"] == "bootstrap"
    assert 3.0 <= tokens["ci_low"] <= tokens["ci_high"] <= 6.0  # within the observed 3 and 6
    if with_references:
        assert [s["exact_match"] for s in scored["row_scores"]] == [1.0, 0.0]
        assert [s["contains_reference"] for s in scored["row_scores"]] == [1.0, 1.0]
        hits = scored["aggregates"]["contains_reference"]
        # 2 of 2: Wilson [n / (n + z²), 1] = [0.342, 1], where a t-interval has width 0.
        assert hits["ci_method"] == "wilson"
        assert (hits["ci_low"], hits["ci_high"]) == (pytest.approx(2 / (2 + 3.841459)), 1.0)
    logged = client.get_run(run_id).data.metrics
    assert logged["latency_seconds/mean"] == 1.0
    # The aggregates MLflow logs are the same numbers as the ones the API serves.
    assert logged["output_tokens/ci_low"] == pytest.approx(tokens["ci_low"])
    assert logged["output_tokens/ci_high"] == pytest.approx(tokens["ci_high"])
    if with_references:
        assert logged["contains_reference/ci_high"] == 1.0
    table = client.load_table(experiment_id, "eval_results_table.json", run_ids=[run_id])
    # The same column names whether or not the rows carry references.
    assert table["outputs"].tolist() == ["Paris.", "It is Rome, I think"]
    assert table["inputs"].tolist() == ["Capital of France?", "Capital of Italy?"]
    assert table["topic"].tolist() == ["geo", "geo"]


def test_model_type_builtins_that_cannot_run_are_reported(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client, experiment_id, run_id = run
    scored = evaluate_outputs(
        run_id=run_id,
        experiment_id=experiment_id,
        rows=[{"input": "hi"}],
        prompts=["hi"],
        generated=[Generated("Hello there.", 3, 0.1)],
        metric_names=["output_words"],
        model_type="text",
    )
    assert "toxicity" in scored["skipped_builtins"]
    assert scored["metrics"]["output_words"] == 2.0


def test_custom_metrics_from_a_module(run):
    from services.worker.custom_metrics import load_custom_metrics
    from shared.settings import Settings

    custom = load_custom_metrics(Settings(custom_metric_modules=["examples.custom_metrics"]))
    assert set(custom) == {"answer_length_ratio", "starts_with_capital"}
    assert custom["answer_length_ratio"].info.needs_reference and custom["answer_length_ratio"].info.custom
    client, experiment_id, run_id = run
    rows = [{"input": "q0", "reference": "Paris"}, {"input": "q1"}]
    scored = evaluate_outputs(
        run_id=run_id,
        experiment_id=experiment_id,
        rows=rows,
        prompts=["q0", "q1"],
        generated=[Generated("Paris is the capital", 4, 0.1), Generated("rome", 1, 0.1)],
        metric_names=["starts_with_capital", "answer_length_ratio"],
        model_type=None,
        custom=custom,
    )
    assert [s["starts_with_capital"] for s in scored["row_scores"]] == [1.0, 0.0]
    assert [s["answer_length_ratio"] for s in scored["row_scores"]] == [4.0, None]  # row 1 has no reference
    assert scored["aggregates"]["answer_length_ratio"]["n"] == 1
    # Declared binary: the Wilson interval of 1 of 2.
    capital = scored["aggregates"]["starts_with_capital"]
    assert capital["ci_method"] == "wilson"
    assert capital["ci_low"] == pytest.approx(0.094531, abs=1e-6)
    assert capital["ci_high"] == pytest.approx(0.905469, abs=1e-6)
    assert custom["starts_with_capital"].info.scale == "binary"
    assert custom["answer_length_ratio"].info.min_value == 0.0
    assert "starts_with_capital/mean" in client.get_run(run_id).data.metrics


def test_custom_metric_may_not_shadow_a_builtin(tmp_path, monkeypatch):
    from services.worker.custom_metrics import load_custom_metrics
    from shared.settings import Settings

    (tmp_path / "clashing_metrics.py").write_text(
        "from services.worker.custom_metrics import CustomMetric\n"
        "METRICS = [CustomMetric(name='bleu', description='x', greater_is_better=True,\n"
        "                        fn=lambda o, r, row: 1.0)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="clashes with a built-in"):
        load_custom_metrics(Settings(custom_metric_modules=["clashing_metrics"]))


def test_custom_metric_scoring_outside_its_declared_scale_is_an_error(run):
    from services.worker.custom_metrics import CustomMetric

    share = CustomMetric(
        name="share",
        description="a share of something",
        greater_is_better=True,
        fn=lambda output, reference, row: 1.5,
        scale="bounded",
        min_value=0.0,
        max_value=1.0,
    )
    client, experiment_id, run_id = run
    # mlflow.evaluate wraps it; the candidate fails with this message.
    with pytest.raises(
        MlflowException, match=r"custom metric 'share' scored row 0 1\.5, outside its declared range"
    ):
        evaluate_outputs(
            run_id=run_id,
            experiment_id=experiment_id,
            rows=[{"input": "q0"}],
            prompts=["q0"],
            generated=[Generated("x", 1, 0.1)],
            metric_names=["share"],
            model_type=None,
            custom={"share": share},
        )


def test_custom_metric_with_an_inconsistent_scale_fails_when_declared():
    from services.worker.custom_metrics import CustomMetric

    with pytest.raises(ValueError, match="a bounded metric needs min_value and max_value"):
        CustomMetric(
            name="x", description="d", greater_is_better=True, fn=lambda o, r, row: 0.0, scale="bounded"
        )
