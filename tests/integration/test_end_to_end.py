"""End to end against real processes: Redis, an `mlflow server`, two Celery workers and the API
under uvicorn, all started by the fixtures below on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest

from scripts.stack import Stack, free_port
from shared.client import ComparisonClient
from shared.metrics import METRICS
from tests.conftest import _cleanup_prefix
from tests.fixtures.json_client import JsonClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris", "topic": "geo"},
    {"input": "Name a large planet.", "reference": "Jupiter", "topic": "space"},
    {"input": "What is two plus two?", "reference": "four", "topic": "math"},
    {"input": "The sky is", "reference": "blue", "topic": "misc"},
    {"input": "Answer the question with one word.", "reference": "word", "topic": "misc"},
]


TINY_METRICS = [
    "exact_match",
    "contains_reference",
    "output_tokens",
    "output_words",
    "latency",
    "ari_grade_level",
]


def run_to_end(client: ComparisonClient, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit over HTTP and wait for the comparison's final state."""
    return client.wait(client.submit(spec)["id"], timeout=300, poll_s=0.3)


def tiny_spec(tiny_models: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "tiny-causal-vs-t5",
        "experiment": "e2e-tiny",
        "model_type": "question-answering",
        "candidates": [
            {
                "label": "causal",
                "model": str(tiny_models["causal"]),
                "system_prompt": "Be brief.",
                "generation": {"max_new_tokens": 8},
            },
            {
                "label": "t5",
                "model": str(tiny_models["seq2seq"]),
                "prompt_template": "question: {input}",
                "generation": {"max_new_tokens": 6},
            },
        ],
        "dataset": {"rows": ROWS},
        "metrics": TINY_METRICS,
        "tags": {"team": "e2e"},
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def tiny_run(client: ComparisonClient, tiny_models) -> dict[str, Any]:
    created = client.submit(tiny_spec(tiny_models))
    updates: list[dict[str, Any]] = []
    final = client.wait(created["id"], timeout=300, poll_s=0.3, on_update=updates.append)
    return {"id": created["id"], "final": final, "updates": updates}


class TestTwoCandidates:
    def test_comparison_succeeds_with_metrics_per_candidate(self, tiny_run):
        final = tiny_run["final"]
        assert final["status"] == "succeeded", final
        assert final["finished_at"] >= final["started_at"] >= final["created_at"]
        for candidate in final["candidates"]:
            assert candidate["status"] == "succeeded"
            progress = candidate["progress"]
            assert (progress["done"], progress["total"], progress["eta_s"]) == (5, 5, 0)
            assert progress["tokens_per_second"] > 0
            assert candidate["error"] is None
            assert set(candidate["metrics"]) == set(TINY_METRICS)
            assert 0 <= candidate["metrics"]["exact_match"] <= 1
            assert candidate["metrics"]["latency"] > 0
            assert candidate["mlflow_run_url"].endswith(candidate["mlflow_run_id"])
            agg = candidate["aggregates"]["output_tokens"]
            assert agg["n"] == 5 and agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
            assert agg["mean"] == pytest.approx(candidate["metrics"]["output_tokens"])

    def test_paired_statistics_for_every_metric(self, tiny_run, client):
        final = tiny_run["final"]
        pairs = {p["metric"]: p for p in final["pairwise"]}
        assert set(pairs) == set(final["metrics"])
        results = client.results(tiny_run["id"])
        tokens = pairs["output_tokens"]
        assert (tokens["a"], tokens["b"], tokens["n"]) == ("causal", "t5", 5)
        diffs = [
            r["outputs"]["causal"]["scores"]["output_tokens"] - r["outputs"]["t5"]["scores"]["output_tokens"]
            for r in results["rows"]
        ]
        assert tokens["mean_diff"] == pytest.approx(sum(diffs) / 5)
        # Fewer tokens is better for output_tokens: a row is a win for causal when its diff < 0.
        assert (tokens["wins"], tokens["losses"]) == (sum(d < 0 for d in diffs), sum(d > 0 for d in diffs))
        assert tokens["ci_low"] <= tokens["mean_diff"] <= tokens["ci_high"]
        assert 0 < tokens["p_value"] <= 1 and tokens["metric"] in tokens["verdict"]

    def test_candidates_ran_in_parallel_on_different_workers(self, tiny_run):
        workers = {c["worker"] for c in tiny_run["final"]["candidates"]}
        assert len(workers) == 2, workers

    def test_progress_was_reported_while_running(self, client, tiny_models):
        """Rows done, speed and ETA move while a candidate generates, not only at its end. Long
        enough (80 rows, 48 new tokens, batches of 4) for polling to see it mid-way."""
        # Rows of its own: the response cache keeps what other tests generated.
        rows = [
            {"input": f"{r['input']} [{i}]", "reference": r["reference"]} for i in range(16) for r in ROWS
        ]
        spec = tiny_spec(tiny_models, name="progress", dataset={"rows": rows}, metrics=["output_words"])
        for candidate in spec["candidates"]:
            candidate["generation"]["max_new_tokens"] = 48
        updates: list[dict[str, Any]] = []
        final = client.wait(
            client.submit({**spec, "cache": False})["id"], timeout=300, poll_s=0.1, on_update=updates.append
        )
        assert final["status"] == "succeeded"
        midway = [
            c["progress"]
            for u in updates
            if u["status"] == "running"
            for c in u["candidates"]
            if c["status"] == "running" and 0 < c["progress"]["done"] < len(rows)
        ]
        assert midway, "no candidate was seen part-way through its rows"
        assert all(p["total"] == len(rows) and p["tokens_per_second"] > 0 for p in midway)
        assert any(p["eta_s"] is not None and p["eta_s"] > 0 for p in midway)
        for label in ("causal", "t5"):
            done = [c["progress"]["done"] for u in updates for c in u["candidates"] if c["label"] == label]
            assert done == sorted(done)  # never goes back

    def test_results_are_complete_and_match_the_output_tokens(self, client, tiny_run):
        results = client.results(tiny_run["id"])
        assert results["candidates"] == ["causal", "t5"]
        assert [r["input"] for r in results["rows"]] == [r["input"] for r in ROWS]
        assert [r["topic"] for r in results["rows"]] == [r["topic"] for r in ROWS]
        for row in results["rows"]:
            for label in ("causal", "t5"):
                out = row["outputs"][label]
                assert isinstance(out["output"], str)
                assert set(out["scores"]) >= {"exact_match", "output_tokens", "latency"}
                assert out["scores"]["output_words"] == len(out["output"].split())
        # Per-row scores aggregate to the candidate's metric.
        for candidate in tiny_run["final"]["candidates"]:
            label = candidate["label"]
            tokens = [r["outputs"][label]["scores"]["output_tokens"] for r in results["rows"]]
            assert candidate["metrics"]["output_tokens"] == pytest.approx(sum(tokens) / len(tokens))
            assert max(tokens) <= (8 if label == "causal" else 6)

    def test_mlflow_holds_parent_and_nested_runs(self, mlflow_client, tiny_run):
        final = tiny_run["final"]
        experiment_id = final["mlflow"]["experiment_id"]
        parent = mlflow_client.get_run(final["mlflow"]["parent_run_id"])
        assert parent.info.run_name == "tiny-causal-vs-t5"
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["llm_compare.comparison_id"] == tiny_run["id"]
        assert parent.data.tags["team"] == "e2e"
        children = mlflow_client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert sorted(r.info.run_name for r in children) == ["causal", "t5"]
        for run in children:
            label = run.info.run_name
            assert run.info.status == "FINISHED"
            assert run.data.tags["llm_compare.candidate"] == label
            assert run.data.tags["llm_compare.comparison_id"] == tiny_run["id"]
            params = run.data.params
            assert params["device"] == "cpu" and params["dtype"] == "float32"
            assert params["model_source"] == "local_dir"
            assert params["seq2seq"] == ("True" if label == "t5" else "False")
            assert params["chat_template_applied"] == ("True" if label == "causal" else "False")
            assert params["generation.max_new_tokens"] == ("8" if label == "causal" else "6")
            metrics = run.data.metrics
            for name in (
                "exact_match/mean",
                "output_tokens/mean",
                "latency_seconds/mean",
                "ari_grade_level/v1/mean",
            ):
                assert name in metrics, (name, sorted(metrics))
            artifacts = [a.path for a in mlflow_client.list_artifacts(run.info.run_id)]
            assert "eval_results_table.json" in artifacts
        parent_artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
        assert {"comparison_summary.json", "comparison_summary.html", "dataset.json"} <= parent_artifacts
        assert "causal/exact_match" in parent.data.metrics

    def test_load_table_over_the_experiment_gives_every_output(self, client, mlflow_client, tiny_run):
        final = tiny_run["final"]
        # The notebook way of comparing: every table logged in the experiment, tagged by run.
        mlflow.set_experiment(experiment_id=final["mlflow"]["experiment_id"])
        table = mlflow.load_table("eval_results_table.json", extra_columns=["run_id"])
        results = client.results(tiny_run["id"])
        for candidate in final["candidates"]:
            rows = table[table["run_id"] == candidate["mlflow_run_id"]].sort_values("row_index")
            assert rows["inputs"].tolist() == [r["input"] for r in ROWS]
            assert rows["outputs"].tolist() == [
                r["outputs"][candidate["label"]]["output"] for r in results["rows"]
            ]
            assert rows["exact_match/score"].tolist() == [
                r["outputs"][candidate["label"]]["scores"]["exact_match"] for r in results["rows"]
            ]

    def test_summary_on_the_parent_run_matches_the_api(self, client, mlflow_client, tiny_run, tmp_path):
        parent_id = tiny_run["final"]["mlflow"]["parent_run_id"]
        path = mlflow_client.download_artifacts(parent_id, "comparison_summary.json", str(tmp_path))
        summary = json.loads(Path(path).read_text())
        results = client.results(tiny_run["id"])
        # The summary is written when the comparison ends; people's ratings come later, in the API
        # and in human_ratings.json.
        for row in results["rows"]:
            for out in row["outputs"].values():
                assert out.pop("ratings") == {"up": 0, "down": 0, "comments": []}
        assert summary["rows"] == results["rows"]
        assert {c["label"]: c["metrics"] for c in summary["candidates"]} == {
            c["label"]: c["metrics"] for c in tiny_run["final"]["candidates"]
        }
        html = Path(
            mlflow_client.download_artifacts(parent_id, "comparison_summary.html", str(tmp_path))
        ).read_text()
        assert "What is the capital of France?" in html and "exact_match" in html

    def test_readyz_with_everything_up(self, stack):
        response = httpx.get(f"{stack.api_url}/readyz", timeout=10)
        assert response.status_code == 200
        assert response.json()["checks"] == {"redis": "ok", "mlflow": "ok"}


def test_custom_metrics_published_by_workers_are_selectable(client, stack, tiny_models):
    listed = {m["name"]: m for m in httpx.get(f"{stack.api_url}/v1/metrics").json()}
    assert listed["starts_with_capital"]["custom"] is True
    assert listed["answer_length_ratio"]["needs_reference"] is True
    spec = tiny_spec(
        tiny_models,
        name="custom-metrics",
        metrics=["output_words", "starts_with_capital", "answer_length_ratio"],
    )
    final = run_to_end(client, spec)
    assert final["status"] == "succeeded", final
    results = client.results(final["id"])
    for row in results["rows"]:
        for label in ("causal", "t5"):
            out = row["outputs"][label]
            text = out["output"].lstrip()
            assert out["scores"]["starts_with_capital"] == float(bool(text) and text[0].isupper())
            assert out["scores"]["answer_length_ratio"] == pytest.approx(
                len(out["output"].split()) / len(row["reference"].split())
            )
    assert {p["metric"] for p in final["pairwise"]} == {
        "output_words",
        "starts_with_capital",
        "answer_length_ratio",
    }
    # A name no worker published is still refused before queueing.
    response = httpx.post(f"{stack.api_url}/v1/comparisons", json={**spec, "metrics": ["not_a_metric"]})
    assert response.status_code == 422


def test_llm_judge_scores_and_pairwise_ranking(client, mlflow_client, tiny_models, judge_server):
    """Rubric scores and pairwise verdicts from a real (loopback) OpenAI-compatible judge."""
    spec = tiny_spec(
        tiny_models,
        name="judged",
        metrics=["judge_correctness", "judge_helpfulness", "judge_rubric"],
        judge_rubric="Give 5 when the answer names the reference, else 1.",
        pairwise_judge=True,
    )
    final = run_to_end(client, spec)
    assert final["status"] == "succeeded", final
    results = client.results(final["id"])
    for row in results["rows"]:
        for label in ("causal", "t5"):
            out = row["outputs"][label]
            has_reference = row["reference"].lower() in out["output"].lower()
            assert out["scores"]["judge_correctness"] == (5.0 if has_reference else 1.0)
            assert out["scores"]["judge_helpfulness"] == 1 + len(out["output"].split()) % 5
    ranking = final["judge_ranking"]
    assert ranking["judge"].startswith("rule-judge @ ")
    assert ranking["verdicts"] == len(ROWS)
    assert [r["label"] for r in ranking["ranking"]] in (["causal", "t5"], ["t5", "causal"])
    # Each candidate took part in every verdict.
    assert all(r["wins"] + r["ties"] + r["losses"] == len(ROWS) for r in ranking["ranking"])
    # Every verdict is backed by two judge calls, one per order.
    pair_calls = [r for r in judge_server.requests if "pick the better one" in r["messages"][0]["content"]]
    assert len(pair_calls) >= 2 * len(ROWS)
    # Justifications land in the candidate's eval table.
    run_id = final["candidates"][0]["mlflow_run_id"]
    experiment_id = final["mlflow"]["experiment_id"]
    table = mlflow_client.load_table(experiment_id, "eval_results_table.json", run_ids=[run_id])
    assert table["judge_correctness/justification"].str.startswith("rule-based score").all()


def test_response_cache_reuses_outputs_unless_told_not_to(client, mlflow_client, tiny_models):
    spec = tiny_spec(tiny_models, name="cached", metrics=["output_words"])
    first = run_to_end(client, spec)
    again = run_to_end(client, spec)
    fresh = run_to_end(client, {**spec, "cache": False})
    assert [c["progress"]["cache_hits"] for c in again["candidates"]] == [len(ROWS), len(ROWS)]
    assert [c["progress"]["cache_hits"] for c in fresh["candidates"]] == [0, 0]
    # Generating again (greedy) gives the same outputs the cache served.
    outputs = [
        [r["outputs"][label]["output"] for r in client.results(run["id"])["rows"]]
        for run in (first, again, fresh)
        for label in ("causal", "t5")
    ]
    assert outputs[0:2] == outputs[2:4] == outputs[4:6]
    # Speed and ETA are reported while generating; the hit counts are logged on the runs.
    assert all(c["progress"]["tokens_per_second"] > 0 for c in fresh["candidates"])
    assert all(c["progress"]["eta_s"] == 0 for c in fresh["candidates"])
    run = mlflow_client.get_run(again["candidates"][0]["mlflow_run_id"])
    assert (run.data.metrics["cache_hits"], run.data.metrics["cache_misses"]) == (len(ROWS), 0)
    assert (
        mlflow_client.get_run(fresh["candidates"][0]["mlflow_run_id"]).data.params["response_cache"] == "off"
    )
    # Generation start is stamped when something is generated, after the candidate started.
    assert all(c["generation_started_at"] is None for c in again["candidates"])
    for candidate in fresh["candidates"]:
        started, generating = (
            datetime.fromisoformat(candidate[k]) for k in ("started_at", "generation_started_at")
        )
        assert datetime.fromisoformat(fresh["created_at"]) <= started <= generating
        assert generating <= datetime.fromisoformat(candidate["finished_at"])


def test_a_failing_candidate_does_not_stop_the_other(client, mlflow_client, tiny_models, model_root):
    spec = tiny_spec(tiny_models, name="one-missing")
    spec["candidates"][1]["model"] = str(model_root / "not-there")
    created = client.submit(spec)
    final = client.wait(created["id"], timeout=300, poll_s=0.3)
    assert final["status"] == "partially_failed"
    by_label = {c["label"]: c for c in final["candidates"]}
    assert by_label["causal"]["status"] == "succeeded"
    assert by_label["t5"]["status"] == "failed"
    assert "not-there does not exist on worker" in by_label["t5"]["error"]
    assert "t5:" in final["error"]
    failed_run = mlflow_client.get_run(by_label["t5"]["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "does not exist" in failed_run.data.tags["llm_compare.error"]
    results = client.results(created["id"])
    assert all(r["outputs"]["t5"]["output"] is None for r in results["rows"])
    assert all(isinstance(r["outputs"]["causal"]["output"], str) for r in results["rows"])


def test_a_cancelled_comparison_is_skipped_by_workers(
    redis_url, redis_client, run_id, tmp_path, tiny_models, model_root, stack
):
    """Cancel while queued (no worker listens yet), then start a worker: it must not run it."""
    queue = f"test-cancel-{run_id}"
    isolated = Stack(
        run_dir=tmp_path,
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=stack.mlflow_port,
        workers=1,
        queue_name=queue,
        key_prefix=queue,
        extra_env={"MODEL_ROOTS": str(model_root)},
    )
    try:
        isolated.start_api()
        api = JsonClient(ComparisonClient(isolated.api_url))
        created = api.submit(tiny_spec(tiny_models, name="cancel-me"))
        assert redis_client.llen(queue) == 1
        assert api.cancel(created["id"])["status"] == "cancelled"
        isolated.start_worker(0)
        isolated.wait_workers()
        deadline = time.monotonic() + 60
        while redis_client.llen(queue) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = isolated.log_path("worker0")
        deadline = time.monotonic() + 30
        while "comparison.skip_start" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "comparison.skip_start" in log.read_text()
        final = api.get(created["id"])
        assert final["status"] == "cancelled"
        assert final["mlflow"]["parent_run_id"] is None
        assert [c["status"] for c in final["candidates"]] == ["cancelled", "cancelled"]
    finally:
        isolated.stop()
        _cleanup_prefix(redis_client, queue, queue)


def test_a_worker_killed_mid_task_does_not_lose_the_candidate(client, tiny_models, stack):
    """acks_late + reject on worker lost: the task is delivered again and the candidate completes."""
    rows = [{"input": f"{r['input']} ({i})", "reference": r["reference"]} for i in range(16) for r in ROWS]
    spec = tiny_spec(tiny_models, name="survives-a-crash", dataset={"rows": rows})
    for candidate in spec["candidates"]:
        candidate["generation"]["max_new_tokens"] = 48
    created = client.submit(spec)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        causal = client.get(created["id"])["candidates"][0]
        if causal["status"] == "running" and 0 < causal["progress"]["done"] < causal["progress"]["total"]:
            victim = int(causal["worker"].rsplit(":", 1)[1])
        time.sleep(0.05)
    assert victim is not None, "never saw the candidate mid-generation"
    os.kill(victim, signal.SIGKILL)
    final = client.wait(created["id"], timeout=300, poll_s=0.5)
    assert final["status"] == "succeeded", final
    causal = final["candidates"][0]
    assert (causal["progress"]["done"], causal["progress"]["total"]) == (len(rows), len(rows))
    assert causal["worker"] != f"{causal['worker'].rsplit(':', 1)[0]}:{victim}"
    results = client.results(created["id"])
    assert all(isinstance(r["outputs"]["causal"]["output"], str) for r in results["rows"])
    logs = "".join(stack.log_path(f"worker{i}").read_text() for i in range(stack.workers))
    assert "WorkerLostError" in logs


@pytest.mark.slow
def test_real_smollm2_comparison(client, mlflow_client):
    """The bundled demo's two SmolLM2-135M-Instruct configurations on four of its prompts, with
    every metric in the registry, the judge included, and pairwise judging."""
    spec = json.loads((ROOT / "demo" / "comparison.json").read_text())
    spec["dataset"]["rows"] = spec["dataset"]["rows"][:4]
    spec["experiment"] = "e2e-smollm2"
    spec["metrics"] = list(METRICS)
    spec["regex"] = r"\b[A-Z][a-z]+"
    spec["judge_rubric"] = "Give 5 when the answer names the reference answer, else 1."
    spec["pairwise_judge"] = True
    created = client.submit(spec)
    final = client.wait(created["id"], timeout=900, poll_s=1.0)
    assert final["status"] == "succeeded", final
    results = client.results(created["id"])
    greedy = [r["outputs"]["greedy"]["output"] for r in results["rows"]]
    assert all(greedy), greedy
    assert "paris" in greedy[0].lower()  # "What is the capital of France?"
    by_label = {c["label"]: c for c in final["candidates"]}
    assert by_label["greedy"]["metrics"]["contains_reference"] >= 0.5
    for candidate in final["candidates"]:
        # Every metric that had rows to score, with its interval (json_valid: no row asks for JSON;
        # cost: a local model has no price).
        assert set(candidate["metrics"]) == set(METRICS) - {"json_valid", "cost"}, candidate["metrics"]
        for name, agg in candidate["aggregates"].items():
            if agg["n"] > 1:
                assert agg["ci_low"] <= agg["mean"] <= agg["ci_high"], (name, agg)
    assert by_label["greedy"]["metrics"]["semantic_similarity"] > 0.3
    assert by_label["greedy"]["metrics"]["judge_correctness"] >= 3  # says Paris, Tokyo, Rome...
    pairs = {p["metric"]: p for p in final["pairwise"]}
    assert set(pairs) == set(METRICS) - {"json_valid", "cost"}
    assert all(p["verdict"] for p in pairs.values())
    assert final["judge_ranking"]["verdicts"] == 4
    run = mlflow_client.get_run(by_label["greedy"]["mlflow_run_id"])
    assert run.data.params["model_resolved"].startswith("SmolLM2-135M-Instruct.Q4_1.gguf sha256:")
    assert run.data.params["chat_template_applied"] == "True"
    assert run.data.params["generation.do_sample"] == "False"
    for name in (
        "semantic_similarity/mean",
        "semantic_similarity/ci_low",
        "bleu/stderr",
        "judge_correctness/mean",
    ):
        assert name in run.data.metrics, name
    sampled = mlflow_client.get_run(by_label["sampled-t0.7"]["mlflow_run_id"])
    assert sampled.data.params["generation.temperature"] == "0.7"


def test_cli_runs_a_spec_and_waits_for_the_table(stack, client, tiny_models, tmp_path):
    """`llm-compare run SPEC --wait` as a person types it: a YAML spec, a CSV dataset, progress
    bars, then the side-by-side table and verdicts, and exit code 0."""
    import yaml

    spec = tiny_spec(tiny_models, name="from-the-terminal")
    spec.pop("dataset")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    data_file = tmp_path / "rows.csv"
    data_file.write_text("input,reference\n" + "".join(f"{r['input']},{r['reference']}\n" for r in ROWS))
    command = [str(Path(sys.executable).parent / "llm-compare"), "--url", stack.api_url]
    done = subprocess.run(
        [*command, "run", str(spec_file), "--data", str(data_file), "--wait", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=360,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed = client.list(limit=5)["items"]
    ran = next(item for item in listed if item["name"] == "from-the-terminal")
    assert ran["status"] == "succeeded"
    results = client.results(ran["id"])
    out = done.stdout
    assert "Status succeeded" in out
    for row in results["rows"]:
        # Every input and the start of every output appear in the printed table.
        assert row["input"].split()[0] in out
        assert row["outputs"]["causal"]["output"].split()[0] in out
    assert "exact_match" in out and f"/ui/comparisons/{ran['id']}" in out
    as_json = subprocess.run(
        [*command, "--json", "show", ran["id"]], capture_output=True, text=True, timeout=60
    )
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["id"] == ran["id"]
