"""End to end: two endpoint candidates served by a loopback OpenAI-compatible server (with 429s
and latency injected), next to a local SmolLM2-135M-Instruct, through the real stack: the API,
the model workers, an I/O worker, Redis and an `mlflow server`."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import ENDPOINT_KEY, ENDPOINT_LIMIT

pytestmark = pytest.mark.integration

ROWS = [
    {"input": "What is the capital of France? Paris?", "reference": "Paris"},
    *({"input": f"Tell me fact number {i} about the sky.", "reference": "blue"} for i in range(11)),
]
METRICS = [
    "contains_reference",
    "output_tokens",
    "input_tokens",
    "latency",
    "time_to_first_token",
    "tokens_per_second",
    "cost",
]


def test_two_endpoint_candidates_and_a_local_one(client, stack, mlflow_client, openai_server):
    openai_server.reset()
    openai_server.latency_s = 0.15
    openai_server.failures = [(429, {"Retry-After": "1"}), (429, {"Retry-After": "1"})]
    spec = {
        "name": "endpoints-e2e",
        "experiment": "e2e-endpoints",
        "candidates": [
            {
                "label": "served-chat",
                "model": "endpoint:loop-chat/tiny-chat",
                "system_prompt": "Answer briefly.",
            },
            {
                "label": "served-text",
                "model": "endpoint:loop-text/tiny-text",
                "generation": {"max_new_tokens": 6, "do_sample": True, "temperature": 0.5, "seed": 3},
            },
            {"label": "local", "model": "smollm2-135m-instruct", "generation": {"max_new_tokens": 8}},
        ],
        "dataset": {"rows": ROWS},
        "metrics": METRICS,
    }
    created = client.submit(spec)
    final = client.wait(created["id"], timeout=900, poll_s=0.5)
    assert final["status"] == "succeeded", final
    by_label = {c["label"]: c for c in final["candidates"]}

    # Every request carried the key from the workers' environment; none went past the limit.
    assert len(openai_server.requests) == 2 * len(ROWS) + 2  # two rows retried after a 429
    assert {r["auth"] for r in openai_server.requests} == {f"Bearer {ENDPOINT_KEY}"}
    assert max(openai_server.max_in_flight_by_path.values()) <= ENDPOINT_LIMIT
    assert openai_server.max_in_flight_by_path["/v1/chat/completions"] >= 2  # requests did overlap
    text_requests = [r for r in openai_server.requests if r["path"] == "/v1/completions"]
    assert {(r["temperature"], r["seed"], r["max_tokens"]) for r in text_requests} == {(0.5, 3, 6)}

    # Per row, in /results: output, token counts from the usage, cost, latency.
    results = client.results(created["id"])
    first = results["rows"][0]["outputs"]
    assert first["served-chat"]["output"] == "Paris" and first["served-chat"]["error"] is None
    chat_scores = first["served-chat"]["scores"]
    # "Answer briefly." + the question's 7 words; the reply is one word.
    assert (chat_scores["input_tokens"], chat_scores["output_tokens"]) == (9.0, 1.0)
    assert chat_scores["cost"] == pytest.approx(9 / 1000 * 0.5 + 1 / 1000 * 1.5)
    assert chat_scores["latency"] >= 0.15 and 0 < chat_scores["time_to_first_token"] <= chat_scores["latency"]
    assert chat_scores["contains_reference"] == 1.0
    second = results["rows"][1]["outputs"]["served-text"]
    assert second["output"] == "loopback-e2e-v1 says: Tell me fact number"  # 6 words
    assert second["scores"]["output_tokens"] == 6.0 and second["scores"]["input_tokens"] == 8.0
    local = first["local"]["scores"]
    assert local["input_tokens"] > 0 and local.get("cost") is None

    # Per candidate: rows failed, usage and cost totals, retries.
    chat = by_label["served-chat"]
    assert chat["rows_failed"] == 0 and chat["status"] == "succeeded"
    totals = chat["totals"] | by_label["served-text"]["totals"]
    assert chat["totals"]["requests"] + by_label["served-text"]["totals"]["requests"] == len(
        openai_server.requests
    )
    assert chat["totals"]["retries"] + by_label["served-text"]["totals"]["retries"] == 2
    assert totals["cost"] is not None and chat["metrics"]["cost"] == pytest.approx(
        chat["totals"]["cost"] / len(ROWS)
    )
    assert chat["progress"]["done"] == len(ROWS) and chat["progress"]["tokens_per_second"] is not None
    assert "cost" not in by_label["local"]["metrics"]
    pairs = {(p["a"], p["b"], p["metric"]) for p in final["pairwise"]}
    assert ("served-chat", "served-text", "cost") in pairs and ("served-chat", "local", "latency") in pairs

    # In MLflow: the nested runs, their params (never the address or the key), the per-row table.
    run = mlflow_client.get_run(chat["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["endpoint"], params["endpoint_model_id"], params["endpoint_served_model"]) == (
        "loop-chat",
        "tiny-chat",
        "loopback-e2e-v1",
    )
    assert params["endpoint_system_fingerprint"] == "fp_loopback_1"
    stored = json.dumps({**params, **run.data.tags})
    assert openai_server.base_url not in stored and ENDPOINT_KEY not in stored
    assert run.data.metrics["total_cost"] == pytest.approx(chat["totals"]["cost"])
    assert run.data.metrics["cost/mean"] == pytest.approx(chat["metrics"]["cost"])
    table = mlflow_client.load_table(
        run.info.experiment_id, "eval_results_table.json", run_ids=[run.info.run_id]
    ).sort_values("row_index")
    assert list(table["input_token_count"])[0] == 9 and list(table["row_cost"])[0] == pytest.approx(
        chat_scores["cost"]
    )
    assert table["latency_s"].iloc[0] == pytest.approx(chat_scores["latency"])
    parent = mlflow_client.get_run(final["mlflow"]["parent_run_id"])
    assert parent.data.metrics["served-chat/cost"] == pytest.approx(chat["metrics"]["cost"])
