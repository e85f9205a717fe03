"""A comparison with endpoint candidates through every step, in process: the start step queues
them to the I/O workers (comparison.generate_remote), which hand them to scoring
(comparison.run_candidate, mlflow.evaluate() in their nested MLflow run), then the summary.

Real Redis, a real MLflow tracking store (SQLite), a loopback OpenAI-compatible server, the tiny
random-weight causal model as a local candidate, and a dispatch that records tasks; the test
runs them itself, in order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from services.worker import pipeline, reconcile, remote, tracking
from services.worker.models import ModelCache
from shared.schemas import CandidateState, ComparisonCreate
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import FINALIZE_COMPARISON, GENERATE_REMOTE, RUN_CANDIDATE, START_COMPARISON
from tests.fixtures.openai_server import OpenAIServer, endpoint_entry

KEY_ENV = "LLMC_TEST_ORCH_KEY"
SERVED = "loopback-served-v3"
ROWS = [
    {"input": "What is the capital of France? Paris?", "reference": "Paris"},
    {"input": "What is two plus two?", "reference": "four"},
    {"input": "The sky is", "reference": "blue"},
    {"input": "Name a large planet.", "reference": "Jupiter"},
]
METRICS = ["contains_reference", "output_tokens", "input_tokens", "latency", "time_to_first_token", "cost"]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(served_model=SERVED, api_key="orch-key", system_fingerprint="fp_orch") as server:
        yield server


class Recorder(list):
    def __call__(self, name: str, kwargs: dict[str, Any], task_id: str) -> None:
        self.append((name, dict(kwargs), task_id))


class Harness:
    def __init__(self, tmp_path: Path, server: OpenAIServer, redis_client, prefix: str, model_root: Path):
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(
            json.dumps(
                [
                    endpoint_entry(server, "chat-ep", api_key_env=KEY_ENV),
                    endpoint_entry(server, "text-ep", api="completions", api_key_env=KEY_ENV),
                ]
            )
        )
        self.settings = Settings(
            mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            key_prefix=prefix,
            queue_name=prefix,
            model_roots=[model_root],
            endpoints_file=endpoints,
            candidate_lease_s=3,
            generation_batch_size=2,
            endpoint_retry_base_s=0.05,
            reconcile_interval_s=0.1,
            reconcile_grace_s=0,
        )
        self.store = ComparisonStore(redis_client, prefix=prefix, ttl_s=3600)
        self.sent = Recorder()
        self.worker = pipeline.WorkerContext(
            settings=self.settings, store=self.store, models=ModelCache(), dispatch=self.sent
        )
        self.io = remote.RemoteContext(settings=self.settings, store=self.store, dispatch=self.sent)
        self.client = MlflowClient(self.settings.mlflow_tracking_uri)
        self.experiment = f"remote-{prefix}"
        self.client.create_experiment(self.experiment, artifact_location=str(tmp_path / "artifacts"))
        self.done: set[str] = set()

    def submit(self, *candidates: dict[str, Any], metrics: list[str] = METRICS) -> str:
        spec = ComparisonCreate.model_validate({"candidates": list(candidates), "dataset": {"rows": ROWS}})
        comparison_id = uuid.uuid4().hex
        self.store.create(comparison_id=comparison_id, spec=spec, experiment=self.experiment, metrics=metrics)
        self.sent.append((START_COMPARISON, {"comparison_id": comparison_id}, uuid.uuid4().hex))
        return comparison_id

    def drain(self) -> list[tuple[str, str]]:
        """Run every recorded task not run yet, including those they queue, in order."""
        ran = []
        while pending := [t for t in self.sent if t[2] not in self.done]:
            name, kwargs, task_id = pending[0]
            self.done.add(task_id)
            cid, label = kwargs["comparison_id"], kwargs.get("label")
            if name == START_COMPARISON:
                outcome = pipeline.start_comparison(self.worker, cid)
            elif name == GENERATE_REMOTE:
                outcome = remote.generate_remote(self.io, cid, str(label))
            elif name == RUN_CANDIDATE:
                outcome = pipeline.run_candidate(self.worker, cid, str(label))
            elif name == FINALIZE_COMPARISON:
                outcome = pipeline.finalize_comparison(self.worker, cid)
            else:
                continue  # webhook deliveries and the like: not this test's business
            ran.append((f"{name}:{label}" if label else name, outcome))
        return ran

    def run_of(self, comparison_id: str, label: str) -> Any:
        run_id = self.store.candidate(comparison_id, label).run_id
        assert run_id is not None
        return self.client.get_run(run_id)


@pytest.fixture
def harness(tmp_path, server, redis_client, redis_prefix, model_root, tiny_models, monkeypatch) -> Harness:
    server.reset()
    monkeypatch.setenv(KEY_ENV, "orch-key")
    return Harness(tmp_path, server, redis_client, redis_prefix, model_root)


def chat(label: str = "chat", **fields: Any) -> dict[str, Any]:
    return {
        "label": label,
        "model": "endpoint:chat-ep/tiny-chat",
        "system_prompt": "Answer briefly.",
        **fields,
    }


def text(label: str = "text", **fields: Any) -> dict[str, Any]:
    return {"label": label, "model": "endpoint:text-ep/tiny-text", "use_chat_template": False, **fields}


def local(tiny_models, label: str = "local") -> dict[str, Any]:
    return {"label": label, "model": str(tiny_models["causal"]), "generation": {"max_new_tokens": 4}}


class TestEndpointCandidates:
    def test_generated_on_the_io_queue_then_scored_like_any_candidate(self, harness, server, tiny_models):
        server.failures = [(429, {"Retry-After": "0.2"})]
        cid = harness.submit(chat(), text(), local(tiny_models))
        ran = harness.drain()
        assert ran[0] == (START_COMPARISON, "started")
        assert [step for step, _ in ran[1:4]] == [
            f"{GENERATE_REMOTE}:chat",
            f"{GENERATE_REMOTE}:text",
            f"{RUN_CANDIDATE}:local",
        ]
        assert (f"{RUN_CANDIDATE}:chat", "succeeded") in ran and (f"{RUN_CANDIDATE}:text", "succeeded") in ran
        assert ran[-1] == (FINALIZE_COMPARISON, "succeeded")
        assert harness.store.status(cid).value == "succeeded"

        chat_rows = harness.store.outputs(cid, "chat")
        assert chat_rows is not None and chat_rows[0]["output"] == "Paris"
        assert chat_rows[0]["scores"]["contains_reference"] == 1.0
        second = chat_rows[1]["scores"]
        # "Answer briefly." + "What is two plus two?"; the reply repeats the question's 5 words.
        assert (second["input_tokens"], second["output_tokens"]) == (7.0, 7.0)
        assert second["cost"] == pytest.approx(7 / 1000 * 0.5 + 7 / 1000 * 1.5)
        assert second["latency"] > 0 and 0 < second["time_to_first_token"] <= second["latency"]
        local_rows = harness.store.outputs(cid, "local")
        assert local_rows is not None
        # A local candidate counts tokens with its tokenizer and has no price.
        assert local_rows[0]["scores"]["input_tokens"] > 0 and "cost" not in {
            k for k, v in local_rows[0]["scores"].items() if v is not None
        }
        candidates = {c.label: c for c in harness.store.candidates(cid, ["chat", "text", "local"])}
        chat_c = candidates["chat"]
        assert chat_c.status is CandidateState.succeeded and chat_c.rows_failed == 0
        assert chat_c.totals["retries"] == 1 and chat_c.totals["cost"] == pytest.approx(
            sum(r["scores"]["cost"] for r in chat_rows)
        )
        assert chat_c.metrics["cost"] == pytest.approx(chat_c.totals["cost"] / 4)
        assert "cost" not in candidates["local"].metrics  # no row scored
        # Paired statistics cover the usage metrics too.
        pairs = {
            (p["a"], p["b"], p["metric"])
            for p in json.loads(harness.store.r.hget(f"{harness.store.prefix}:cmp:{cid}", "pairwise"))
        }
        assert ("chat", "text", "cost") in pairs and ("chat", "local", "latency") in pairs

        run = harness.run_of(cid, "chat")
        params = run.data.params
        assert params["endpoint"] == "chat-ep" and params["endpoint_model_id"] == "tiny-chat"
        assert (
            params["endpoint_served_model"] == SERVED and params["endpoint_system_fingerprint"] == "fp_orch"
        )
        assert params["model_source"] == "endpoint" and params["endpoint_api"] == "chat"
        everything = json.dumps({**params, **run.data.tags})
        assert (
            server.base_url not in everything
            and "127.0.0.1" not in everything
            and "orch-key" not in everything
        )
        assert run.data.metrics["total_input_tokens"] == sum(r["scores"]["input_tokens"] for r in chat_rows)
        assert run.data.metrics["retries"] == 1 and run.data.metrics["rows_failed"] == 0
        assert run.data.metrics["cost/mean"] == pytest.approx(chat_c.metrics["cost"])
        mlflow.set_tracking_uri(harness.settings.mlflow_tracking_uri)
        table = harness.client.load_table(
            run.info.experiment_id, "eval_results_table.json", run_ids=[run.info.run_id]
        )
        table = table.sort_values("row_index")
        assert list(table["input_token_count"]) == [r["scores"]["input_tokens"] for r in chat_rows]
        assert list(table["row_cost"]) == pytest.approx([r["scores"]["cost"] for r in chat_rows])
        assert (
            table["prompt"].iloc[0]
            == "system: Answer briefly.\n\nuser: What is the capital of France? Paris?"
        )
        runs = harness.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`{tracking.TAG_COMPARISON}` = '{cid}'"
        )
        assert sorted(r.info.run_name for r in runs) == ["chat", "comparison", "local", "text"]
        summary = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(
                    run_id=harness.store.get(cid).parent_run_id, artifact_path="comparison_summary.json"
                )
            ).read_text()
        )
        by_label = {c["label"]: c for c in summary["candidates"]}
        assert by_label["chat"]["rows_failed"] == 0 and by_label["chat"]["totals"]["requests"] == 5

    def test_a_failed_row_has_no_output_no_scores_and_its_reason(self, harness, server):
        server.fail_when = ["The sky is"]
        cid = harness.submit(chat("a"), chat("b", system_prompt="Be terse."))
        harness.settings.endpoint_max_error_rate = 0.25
        harness.drain()
        assert harness.store.status(cid).value == "succeeded"
        rows = harness.store.outputs(cid, "a")
        assert rows is not None
        failed = rows[2]
        assert failed["output"] is None and failed["error"].endswith(
            "HTTP 500: " + json.dumps({"error": {"message": "this prompt always fails"}})
        )
        assert all(v is None for v in failed["scores"].values()) and set(failed["scores"]) >= set(METRICS)
        assert all(rows[i]["scores"]["output_tokens"] is not None for i in (0, 1, 3))
        a = harness.store.candidate(cid, "a")
        assert a.rows_failed == 1 and a.aggregates["output_tokens"]["n"] == 3
        run = harness.run_of(cid, "a")
        assert run.data.metrics["rows_failed"] == 1
        table = harness.client.load_table(
            run.info.experiment_id, "eval_results_table.json", run_ids=[run.info.run_id]
        )
        table = table.sort_values("row_index").reset_index(drop=True)
        assert table["generation_error"].iloc[2] == failed["error"]
        assert table["generation_error"].isna().tolist() == [True, True, False, True]
        assert table["outputs"].iloc[2] == ""

    def test_past_the_error_rate_the_candidate_fails_and_the_comparison_goes_on(
        self, harness, server, tiny_models
    ):
        server.fail_when = ["The sky is", "large planet"]
        cid = harness.submit(chat("flaky"), local(tiny_models))
        harness.drain()
        assert harness.store.status(cid).value == "partially_failed"
        flaky = harness.store.candidate(cid, "flaky")
        assert flaky.status is CandidateState.failed
        assert flaky.error is not None and flaky.error.startswith(
            "2 of 4 rows failed (50%), more than ENDPOINT_MAX_ERROR_RATE (10%) of endpoint 'chat-ep'"
        )
        # Its rows are still shown, failed ones with their reason.
        rows = harness.store.outputs(cid, "flaky")
        assert (
            rows is not None
            and rows[0]["output"] == "Paris"
            and rows[2]["output"] is None
            and rows[2]["error"]
        )
        assert harness.run_of(cid, "flaky").info.status == "FAILED"

    def test_each_step_of_an_endpoint_candidate_goes_to_its_queue(self, harness):
        cid = harness.submit(chat())
        assert pipeline.start_comparison(harness.worker, cid) == "started"
        assert harness.sent[-1][0] == GENERATE_REMOTE
        # A scoring step delivered before the rows exist (a stale message) queues the generation.
        assert pipeline.run_candidate(harness.worker, cid, "chat") == "generating"
        assert harness.sent[-1][0] == GENERATE_REMOTE
        assert harness.store.candidate(cid, "chat").status is CandidateState.queued
        # Once the rows are stored, what the reconciler queues for the candidate is its scoring.
        assert remote.generate_remote(harness.io, cid, "chat") == "generated"
        assert harness.sent[-1][0] == RUN_CANDIDATE
        pipeline.queue_candidate(harness.worker, cid, "chat")
        assert harness.sent[-1][0] == RUN_CANDIDATE
        assert harness.store.task_ids(cid)["chat"] == harness.sent[-1][2]

    def test_the_reconciler_sees_a_generation_waiting_on_the_io_queue(self, harness, redis_client):
        cid = harness.submit(chat())
        harness.drain()
        io_queue = harness.settings.io_queue_name
        body = json.dumps([[], {"comparison_id": cid, "label": "chat"}, {}])
        message = {"headers": {"task": GENERATE_REMOTE}, "body": body, "properties": {}}
        redis_client.lpush(io_queue, json.dumps(message))
        try:
            queue = reconcile.BrokerQueue(redis_client, harness.settings.queue_name, io_queue)
            assert queue.waiting() == {cid: {"chat"}}
        finally:
            redis_client.delete(io_queue)
