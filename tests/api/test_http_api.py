"""The gateway over real HTTP (uvicorn) with real Redis; no worker consumes the queue here, so
every accepted comparison stays queued and what the gateway stored can be checked exactly."""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import time
from typing import Any

import httpx
import pytest

from scripts.stack import Stack
from shared.metrics import DEFAULT_METRICS, METRICS


def base_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "http-test",
        "experiment": "http-tests",
        "model_type": "question-answering",
        "candidates": [
            {"label": "a", "model": "smollm2-135m-instruct"},
            {
                "label": "b",
                "model": "smollm2-135m-instruct",
                "generation": {"do_sample": True, "temperature": 0.7},
            },
        ],
        "dataset": {
            "rows": [
                {"input": "What is the capital of France?", "reference": "Paris", "topic": "geo"},
                {"input": "What is 2 + 2?", "reference": "4", "topic": "math"},
            ]
        },
        "metrics": ["exact_match", "output_tokens", "latency"],
        "tags": {"team": "search"},
    }
    spec.update(overrides)
    return spec


def post(stack: Stack, spec: Any) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/v1/comparisons", json=spec, timeout=10)


def fields_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert body["error"] == "invalid_request", body
    return {f["field"]: f["message"] for f in body["fields"]}


class TestSubmit:
    def test_accepted_comparison_is_queued_with_location(self, api_only: Stack, redis_client):
        response = post(api_only, base_spec())
        assert response.status_code == 202
        body = response.json()
        assert response.headers["location"] == f"/v1/comparisons/{body['id']}"
        assert body["status"] == "queued"
        assert body["rows"] == 2
        assert body["experiment"] == "http-tests"
        assert body["metrics"] == ["exact_match", "output_tokens", "latency"]
        assert [c["label"] for c in body["candidates"]] == ["a", "b"]
        assert all(c["status"] == "queued" for c in body["candidates"])
        assert all(
            c["progress"]
            == {"done": 0, "total": 2, "tokens_per_second": None, "eta_s": None, "cache_hits": 0}
            for c in body["candidates"]
        )
        # The start task is on the broker queue, carrying only the id.
        messages = redis_client.lrange(api_only.queue_name, 0, -1)
        assert any(body["id"] in m for m in messages)
        assert all(len(m) < 4000 for m in messages)

    def test_default_experiment_and_metrics(self, api_only: Stack):
        spec = base_spec()
        del spec["experiment"], spec["metrics"]
        body = post(api_only, spec).json()
        assert body["experiment"] == "llm-compare"
        assert body["metrics"] == DEFAULT_METRICS
        assert {"exact_match", "token_f1", "rougeL", "semantic_similarity", "latency"} <= set(body["metrics"])

    def test_default_metrics_skip_reference_metrics_without_references(self, api_only: Stack):
        spec = base_spec(dataset={"rows": [{"input": "Say hi"}]})
        del spec["metrics"]
        body = post(api_only, spec).json()
        assert body["metrics"] == [m for m in DEFAULT_METRICS if not METRICS[m].needs_reference]
        assert "exact_match" not in body["metrics"] and "output_tokens" in body["metrics"]

    def test_a_regex_adds_regex_match_to_the_defaults(self, api_only: Stack):
        spec = base_spec(regex=r"^\d+$")
        del spec["metrics"]
        assert post(api_only, spec).json()["metrics"][-1] == "regex_match"

    def test_get_list_and_results_of_a_queued_comparison(self, api_only: Stack, api_client):
        created = api_client.submit(base_spec(name="listed"))
        fetched = api_client.get(created["id"])
        assert fetched["id"] == created["id"] and fetched["name"] == "listed"
        page = api_client.list(limit=1)
        assert page["items"][0]["id"] == created["id"]  # newest first
        assert page["limit"] == 1 and page["total"] >= 1
        queued = api_client.list(status="queued", limit=200)
        assert created["id"] in [i["id"] for i in queued["items"]]
        assert api_client.list(status="succeeded", limit=200)["items"] == []
        results = api_client.results(created["id"])
        assert [r["input"] for r in results["rows"]] == ["What is the capital of France?", "What is 2 + 2?"]
        assert results["rows"][0]["topic"] == "geo"
        unrated = {"up": 0, "down": 0, "comments": []}
        assert results["rows"][0]["outputs"] == {
            "a": {"output": None, "scores": {}, "error": None, "ratings": unrated},
            "b": {"output": None, "scores": {}, "error": None, "ratings": unrated},
        }
        table = list(csv.reader(io.StringIO(api_client.results_csv(created["id"]))))
        assert table[0] == [
            "index",
            "input",
            "reference",
            "topic",
            "a",
            "a/thumbs_up",
            "a/thumbs_down",
            "a/comments",
            "b",
            "b/thumbs_up",
            "b/thumbs_down",
            "b/comments",
        ]
        assert table[1][:4] == ["0", "What is the capital of France?", "Paris", "geo"]

    def test_unknown_comparison_is_404(self, api_only: Stack):
        response = httpx.get(f"{api_only.api_url}/v1/comparisons/nope")
        assert response.status_code == 404
        assert "nope" in response.json()["message"]


class TestUpload:
    def test_jsonl_upload(self, api_only: Stack, api_client):
        spec = base_spec()
        del spec["dataset"]
        lines = "\n".join(json.dumps(r) for r in base_spec()["dataset"]["rows"])
        created = api_client.submit_file(spec, "data.jsonl", lines.encode())
        assert created["rows"] == 2
        rows = api_client.results(created["id"])["rows"]
        assert rows[1]["reference"] == "4" and rows[1]["topic"] == "math"

    def test_csv_upload(self, api_only: Stack, api_client):
        spec = base_spec()
        del spec["dataset"]
        content = "input,reference,topic\nWhat is the capital of Italy?,Rome,geo\nName a colour,Blue,misc\n"
        created = api_client.submit_file(spec, "data.csv", content.encode())
        rows = api_client.results(created["id"])["rows"]
        assert [(r["input"], r["reference"], r["topic"]) for r in rows] == [
            ("What is the capital of Italy?", "Rome", "geo"),
            ("Name a colour", "Blue", "misc"),
        ]

    def test_csv_without_input_column_is_refused(self, api_only: Stack):
        spec = base_spec()
        del spec["dataset"]
        response = httpx.post(
            f"{api_only.api_url}/v1/comparisons",
            data={"spec": json.dumps(spec)},
            files={"file": ("d.csv", b"question,answer\nq,a\n")},
        )
        assert response.status_code == 422
        assert "'input' column" in fields_of(response)["file"]

    def test_bad_jsonl_line_is_refused(self, api_only: Stack):
        spec = base_spec()
        del spec["dataset"]
        response = httpx.post(
            f"{api_only.api_url}/v1/comparisons",
            data={"spec": json.dumps(spec)},
            files={"file": ("d.jsonl", b'{"input": "ok"}\n{not json}\n')},
        )
        assert response.status_code == 422
        assert "line 2" in fields_of(response)["file"]


def _mutated(mutate) -> dict[str, Any]:
    spec = copy.deepcopy(base_spec())
    mutate(spec)
    return spec


VALIDATION_CASES = [
    ("one candidate", lambda s: s["candidates"].pop(), "candidates", "at least 2"),
    (
        "too many candidates",
        lambda s: s.__setitem__(
            "candidates", [{"label": f"c{i}", "model": "smollm2-135m-instruct"} for i in range(5)]
        ),
        "candidates",
        "at most 4",
    ),
    (
        "duplicate labels",
        lambda s: s["candidates"][1].__setitem__("label", "a"),
        "candidates[1].label",
        "unique",
    ),
    (
        "template without input",
        lambda s: s["candidates"][0].__setitem__("prompt_template", "Q: {question}"),
        "candidates[0].prompt_template",
        "{input}",
    ),
    (
        "template with unknown column",
        lambda s: s["candidates"][1].__setitem__("prompt_template", "{context} {input}"),
        "candidates[1].prompt_template",
        "{context}",
    ),
    ("empty dataset", lambda s: s["dataset"].__setitem__("rows", []), "dataset.rows", "empty"),
    (
        "row without input",
        lambda s: s["dataset"]["rows"].append({"reference": "x"}),
        "dataset.rows[2].input",
        "non-empty string",
    ),
    (
        "too many rows",
        lambda s: s["dataset"].__setitem__("rows", [{"input": f"q{i}", "reference": "r"} for i in range(51)]),
        "dataset.rows",
        "at most 50",
    ),
    ("unknown metric", lambda s: s["metrics"].append("bleurt"), "metrics[3]", "exact_match"),
    ("metric needs reference", lambda s: s["dataset"]["rows"][1].pop("reference"), "metrics[0]", "rows [1]"),
    (
        "unknown catalog name",
        lambda s: s["candidates"][0].__setitem__("model", "gpt-17"),
        "candidates[0].model",
        "smollm2-135m-instruct",
    ),
    (
        "path outside model roots",
        lambda s: s["candidates"][1].__setitem__("model", "/etc/models/x"),
        "candidates[1].model",
        "outside the model roots",
    ),
    (
        "gguf outside model roots",
        lambda s: s["candidates"][1].__setitem__("model", "/tmp/../root/m.gguf"),
        "candidates[1].model",
        "outside the model roots",
    ),
    (
        "hf: text that names a directory",
        lambda s: s["candidates"][1].__setitem__("model", "hf:/etc"),
        "candidates[1].model",
        "is not a Hugging Face hub id",
    ),
    (
        "registered model not on the allowlist",
        lambda s: s["candidates"][0].__setitem__("model", "models:/some-model/1"),
        "candidates[0].model",
        "MLFLOW_MODEL_ALLOWLIST",
    ),
    (
        "runs:/ model URI",
        lambda s: s["candidates"][0].__setitem__("model", "runs:/0123abcd/model"),
        "candidates[0].model",
        "runs:/ URIs are not accepted",
    ),
    (
        "max_new_tokens over the limit",
        lambda s: s["candidates"][0].__setitem__("generation", {"max_new_tokens": 100000}),
        "candidates[0].generation.max_new_tokens",
        "at most 256",
    ),
    (
        "negative temperature",
        lambda s: s["candidates"][0].__setitem__("generation", {"temperature": -1}),
        "candidates[0].generation.temperature",
        "greater than 0",
    ),
    ("unknown field", lambda s: s.__setitem__("candidate", []), "candidate", "unknown field"),
    ("bad model_type", lambda s: s.__setitem__("model_type", "chat"), "model_type", "question-answering"),
    (
        "bad label",
        lambda s: s["candidates"][0].__setitem__("label", "has space"),
        "candidates[0].label",
        "pattern",
    ),
    (
        "invalid regex",
        lambda s: s.__setitem__("regex", "(unclosed"),
        "regex",
        "not a valid regular expression",
    ),
    (
        "regex with a backreference",
        lambda s: s.__setitem__("regex", r"(\w+) \1"),
        "regex",
        "backreferences",
    ),
    (
        "regex_match without regex",
        lambda s: s["metrics"].append("regex_match"),
        "metrics[3]",
        "needs the field",
    ),
    (
        "judge metric without a judge",
        lambda s: s["metrics"].append("judge_correctness"),
        "metrics[3]",
        "JUDGE_BASE_URL",
    ),
    (
        "pairwise judging without a judge",
        lambda s: s.__setitem__("pairwise_judge", True),
        "pairwise_judge",
        "none is configured",
    ),
]


class TestValidation:
    @pytest.mark.parametrize(
        ("case", "mutate", "field", "hint"), VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES]
    )
    def test_bad_input_names_the_field_and_nothing_is_queued(
        self, api_only: Stack, redis_client, case, mutate, field, hint
    ):
        before = redis_client.llen(api_only.queue_name)
        response = post(api_only, _mutated(mutate))
        assert response.status_code == 422, response.text
        problems = fields_of(response)
        assert field in problems, problems
        assert hint in problems[field], problems[field]
        assert redis_client.llen(api_only.queue_name) == before

    def test_every_problem_is_reported_at_once(self, api_only: Stack):
        def mutate(s):
            s["candidates"][1]["label"] = "a"
            s["metrics"] = ["nope"]
            s["candidates"][0]["model"] = "nope-model"

        problems = fields_of(post(api_only, _mutated(mutate)))
        assert {"candidates[1].label", "candidates[0].model"} <= set(problems)

    def test_invalid_json_is_422(self, api_only: Stack):
        response = httpx.post(
            f"{api_only.api_url}/v1/comparisons",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["fields"][0]["field"] == "body"

    def test_body_over_the_limit_is_413(self, api_only: Stack):
        spec = base_spec()
        spec["dataset"]["rows"][0]["input"] = "x" * (300 * 1024)
        response = post(api_only, spec)
        assert response.status_code == 413
        assert "limit" in response.json()["message"]

    def test_bad_query_parameter_is_422(self, api_only: Stack):
        response = httpx.get(f"{api_only.api_url}/v1/comparisons", params={"status": "done"})
        assert response.status_code == 422
        assert fields_of(response).keys() == {"status"}


class TestCancel:
    def test_cancel_queued_comparison(self, api_only: Stack, api_client):
        created = api_client.submit(base_spec(name="to-cancel"))
        cancelled = api_client.cancel(created["id"])
        assert cancelled["status"] == "cancelled"
        assert cancelled["finished_at"] is not None
        assert [c["status"] for c in cancelled["candidates"]] == ["cancelled", "cancelled"]
        again = httpx.post(f"{api_only.api_url}/v1/comparisons/{created['id']}/cancel")
        assert again.status_code == 409
        assert "cancelled" in again.json()["message"]

    def test_cancel_unknown_is_404(self, api_only: Stack):
        assert httpx.post(f"{api_only.api_url}/v1/comparisons/missing/cancel").status_code == 404


class TestCatalogAndHealth:
    def test_models(self, api_only: Stack):
        models = {m["name"]: m for m in httpx.get(f"{api_only.api_url}/v1/models").json()}
        smol = models["smollm2-135m-instruct"]
        assert smol["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert smol["available_offline"] is True

    def test_metrics(self, api_only: Stack):
        metrics = {m["name"]: m for m in httpx.get(f"{api_only.api_url}/v1/metrics").json()}
        assert metrics["exact_match"]["needs_reference"] is True
        assert metrics["exact_match"]["greater_is_better"] is True
        assert metrics["latency"]["greater_is_better"] is False
        assert metrics["output_tokens"]["needs_tokenizer"] is True
        assert metrics["regex_match"]["needs_option"] == "regex"
        assert metrics["semantic_similarity"]["group"] == "reference"
        assert all(m["description"] and m["offline"] for m in metrics.values())
        scales = {n: (m["scale"], m["min_value"], m["max_value"]) for n, m in metrics.items()}
        assert scales["contains_reference"] == ("binary", 0.0, 1.0)
        assert scales["semantic_similarity"] == ("bounded", -1.0, 1.0)
        assert scales["latency"] == ("unbounded", 0.0, None)
        assert scales["flesch_kincaid_grade"] == ("unbounded", None, None)
        assert set(metrics) == set(METRICS)

    def test_healthz(self, api_only: Stack):
        assert httpx.get(f"{api_only.api_url}/healthz").json() == {"status": "ok"}

    def test_readyz_names_the_missing_dependency(self, api_only: Stack):
        response = httpx.get(f"{api_only.api_url}/readyz", timeout=10)
        assert response.status_code == 503
        body = response.json()
        assert body["failing"] == ["mlflow"]
        assert body["checks"]["redis"] == "ok"

    def test_openapi_docs(self, api_only: Stack):
        schema = httpx.get(f"{api_only.api_url}/openapi.json").json()
        assert "/v1/comparisons" in schema["paths"]
        content = schema["paths"]["/v1/comparisons"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in content
        # Every schema the submit body refers to is defined, so /docs renders it.
        assert content["application/json"]["schema"]["$ref"] == "#/components/schemas/ComparisonCreate"
        components = schema["components"]["schemas"]
        assert {"ComparisonCreate", "CandidateSpec", "GenerationConfig", "DatasetSpec"} <= set(components)
        assert components["ComparisonCreate"]["required"] == ["candidates", "dataset"]
        assert httpx.get(f"{api_only.api_url}/docs").status_code == 200


class TestRestart:
    def test_state_survives_an_api_restart(self, api_only: Stack, api_client):
        created = api_client.submit(base_spec(name="survivor"))
        api_only.stop(["api"])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{api_only.api_url}/healthz")
        started = time.monotonic()
        api_only.start_api()
        restart_seconds = time.monotonic() - started
        again = httpx.get(f"{api_only.api_url}/v1/comparisons/{created['id']}").json()
        assert again["name"] == "survivor" and again["status"] == "queued"
        assert restart_seconds < 15


def test_gateway_does_not_import_torch_or_transformers():
    code = (
        "import sys; from services.api.main import create_app; create_app(); "
        "heavy = [m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
