"""Endpoint candidates at the gateway: the configured endpoints in GET /v1/models (never their
addresses or keys), and every setting an endpoint cannot take refused at submit time with a 422
naming the field. In process: FastAPI's TestClient against real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lxml import html

from services.api.main import create_app
from shared.metrics import MetricInfo
from shared.settings import Settings
from shared.store import ComparisonStore

SUBMIT = "/v1/comparisons"
ENDPOINTS = [
    {
        "name": "vllm-prod",
        "base_url": "http://127.0.0.9:8000/v1",
        "api": "chat",
        "api_key_env": "VLLM_PROD_KEY",
        "max_concurrency": 16,
        "price_per_1k_input": 0.25,
        "price_per_1k_output": 0.75,
    },
    {"name": "ollama", "base_url": "http://127.0.0.10:11434/v1", "api": "completions", "max_concurrency": 2},
]


@pytest.fixture
def settings(tmp_path: Path, redis_url, redis_prefix) -> Settings:
    path = tmp_path / "endpoints.yaml"
    path.write_text(json.dumps(ENDPOINTS))
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        auth_disabled=True,
        mlflow_tracking_uri="http://127.0.0.1:9",
        endpoints_file=path,
    )


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def spec(*candidates: dict[str, Any], metrics: list[str] | None = None) -> dict[str, Any]:
    return {
        "candidates": list(candidates)
        or [
            {"label": "prod", "model": "endpoint:vllm-prod/meta-llama/Llama-3.1-8B-Instruct"},
            {"label": "next", "model": "endpoint:ollama/llama3.1:8b"},
        ],
        "dataset": {"rows": [{"input": "What is the capital of France?", "reference": "Paris"}]},
        "metrics": metrics or ["exact_match", "output_tokens", "input_tokens", "cost", "time_to_first_token"],
    }


def prod(**fields: Any) -> dict[str, Any]:
    return {"label": "prod", "model": "endpoint:vllm-prod/m", **fields}


def local() -> dict[str, Any]:
    return {"label": "local", "model": "smollm2-135m-instruct"}


def problems(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {f["field"]: f["message"] for f in response.json()["fields"]}


class TestModels:
    def test_the_configured_endpoints_are_listed_without_address_or_key(self, client):
        response = client.get("/v1/models")
        assert response.status_code == 200
        endpoints = {m["name"]: m for m in response.json() if m["source"] == "endpoint"}
        assert endpoints["vllm-prod"] == {
            "name": "vllm-prod",
            "description": "Remote OpenAI-compatible endpoint (chat API); name a model it serves as "
            "endpoint:vllm-prod/<model-id>.",
            "source": "endpoint",
            "hub_id": None,
            "available_offline": False,
            "model_format": "endpoint:vllm-prod/<model-id>",
            "api": "chat",
            "max_concurrency": 16,
            "price_per_1k_input": 0.25,
            "price_per_1k_output": 0.75,
        }
        assert (
            endpoints["ollama"]["api"] == "completions" and endpoints["ollama"]["price_per_1k_input"] is None
        )
        text = response.text
        assert "127.0.0.9" not in text and "127.0.0.10" not in text and "VLLM_PROD_KEY" not in text
        # The catalog is still there.
        assert "smollm2-135m-instruct" in {m["name"] for m in response.json()}

    def test_the_form_offers_each_endpoint_as_a_stem_to_complete(self, client):
        response = client.get("/ui/new")
        assert response.status_code == 200
        picker = html.fromstring(response.text).xpath("//datalist[@id='model-names']/option")
        offered = {o.get("value"): o.text for o in picker}
        assert offered["endpoint:vllm-prod/"] == "vllm-prod: remote chat endpoint; type the model id after /"
        assert offered["endpoint:ollama/"] == "ollama: remote completions endpoint; type the model id after /"
        assert "smollm2-135m-instruct" in offered
        assert "127.0.0.9" not in response.text and "VLLM_PROD_KEY" not in response.text
        assert "or endpoint:&lt;name&gt;/&lt;model-id&gt;." in response.text


class TestSubmit:
    def test_endpoint_candidates_are_accepted(self, client, settings, redis_client):
        response = client.post(SUBMIT, json=spec())
        assert response.status_code == 202, response.text
        body = response.json()
        assert [c["model"] for c in body["candidates"]] == [
            "endpoint:vllm-prod/meta-llama/Llama-3.1-8B-Instruct",
            "endpoint:ollama/llama3.1:8b",
        ]
        assert all(c["rows_failed"] == 0 and c["totals"] == {} for c in body["candidates"])
        assert redis_client.llen(settings.queue_name) == 1  # the start step
        # Nothing about the endpoint's address reached the stored comparison.
        stored = json.dumps(redis_client.hgetall(f"{settings.key_prefix}:cmp:{body['id']}"))
        assert "127.0.0.9" not in stored and "VLLM_PROD_KEY" not in stored

    def test_an_unknown_endpoint_lists_the_configured_ones(self, client, settings, redis_client):
        found = problems(client.post(SUBMIT, json=spec(prod(model="endpoint:staging/m"), local())))
        assert found == {
            "candidates[0].model": "unknown endpoint 'staging'; configured endpoints: ollama, vllm-prod "
            "(GET /v1/models)"
        }
        assert redis_client.llen(settings.queue_name) == 0

    def test_a_url_or_malformed_name_is_not_an_endpoint(self, client):
        for model in ("endpoint:http://evil.example/v1/m", "endpoint:vllm-prod"):
            message = problems(client.post(SUBMIT, json=spec(prod(model=model), local())))[
                "candidates[0].model"
            ]
            assert "use endpoint:<endpoint-name>/<model-id>" in message
            assert "configured endpoints: ollama, vllm-prod" in message

    @pytest.mark.parametrize(
        ("fields", "field", "message"),
        [
            (
                {"generation": {"top_k": 40}},
                "candidates[0].generation.top_k",
                "endpoint 'vllm-prod' (chat API) takes no top_k: leave it at its default (50) and use top_p, "
                "or compare on a local model",
            ),
            (
                {"generation": {"repetition_penalty": 1.2}},
                "candidates[0].generation.repetition_penalty",
                "endpoint 'vllm-prod' (chat API) takes no repetition_penalty: leave it at its default "
                "(1), or compare on a local model",
            ),
            (
                {"use_chat_template": False},
                "candidates[0].use_chat_template",
                "endpoint 'vllm-prod' (chat API) always applies the server's chat template: set it to "
                "'auto' or true, or use an endpoint whose api is completions",
            ),
            (
                {"revision": "main"},
                "candidates[0].revision",
                "endpoint 'vllm-prod' (chat API) serves its own models: leave revision out and name the "
                "model in the model id",
            ),
        ],
    )
    def test_settings_the_api_cannot_take_are_refused_by_name(self, client, fields, field, message):
        assert problems(client.post(SUBMIT, json=spec(prod(**fields), local()))) == {field: message}

    def test_a_chat_template_on_the_completions_api_is_refused(self, client):
        candidate = {"label": "next", "model": "endpoint:ollama/llama3.1:8b", "use_chat_template": True}
        assert problems(client.post(SUBMIT, json=spec(candidate, local()))) == {
            "candidates[0].use_chat_template": "endpoint 'ollama' (completions API) sends the rendered "
            "prompt as it is, with no chat template: set it to 'auto' or false, or use an endpoint whose "
            "api is chat"
        }

    def test_what_the_api_takes_is_accepted(self, client):
        generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"]}
        response = client.post(
            SUBMIT, json=spec(prod(generation=generation, use_chat_template=True), local())
        )
        assert response.status_code == 202, response.text

    def test_a_metric_needing_the_tokenizer_is_refused_for_endpoint_candidates(
        self, client, settings, redis_client
    ):
        custom = MetricInfo(
            "bpe_per_word", "Tokens per word.", greater_is_better=False, needs_tokenizer=True, custom=True
        )
        ComparisonStore(redis_client, prefix=settings.key_prefix).publish_custom_metrics(
            {custom.name: json.dumps(custom.as_dict())}
        )
        found = problems(
            client.post(SUBMIT, json=spec(prod(), local(), metrics=["output_tokens", "bpe_per_word"]))
        )
        assert found == {
            "metrics[1]": "bpe_per_word is counted with the candidate's own tokenizer, which endpoint "
            "candidate candidates[0] ('prod') does not have; endpoints report only input_tokens, "
            "output_tokens, tokens_per_second: drop the metric or the candidate"
        }
        # Between local candidates it is fine.
        local_b = {"label": "local-b", "model": "smollm2-135m-instruct"}
        assert client.post(SUBMIT, json=spec(local(), local_b, metrics=["bpe_per_word"])).status_code == 202


def test_without_endpoints_file_endpoint_models_are_refused(redis_url, redis_prefix):
    settings = Settings(
        redis_url=redis_url, key_prefix=redis_prefix, queue_name=redis_prefix, auth_disabled=True
    )
    with TestClient(create_app(settings)) as client:
        assert [m for m in client.get("/v1/models").json() if m["source"] == "endpoint"] == []
        message = problems(client.post(SUBMIT, json=spec(prod(), local())))["candidates[0].model"]
        assert (
            message == "unknown endpoint 'vllm-prod'; configured endpoints: none are configured (setting "
            "ENDPOINTS_FILE) (GET /v1/models)"
        )
