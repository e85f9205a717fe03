"""ENDPOINTS_FILE and endpoint model strings (shared/endpoints.py), and each endpoint's shared
concurrency in Redis: the semaphore of expiring holders and the adaptive limit (shared/store.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.endpoints import (
    EndpointConfig,
    EndpointsFileError,
    endpoint_model_problem,
    load_endpoints,
    parse_endpoint_model,
)
from shared.settings import Settings
from shared.sources import SourceKind, classify_model
from shared.store import ComparisonStore

GOOD = """
- name: vllm-prod
  base_url: http://vllm:8000/v1/
  api: chat
  api_key_env: VLLM_API_KEY
  max_concurrency: 16
  price_per_1k_input: 0.5
  price_per_1k_output: 1.5
  timeout_s: 30
- name: ollama
  base_url: http://127.0.0.1:11434/v1
  api: completions
  max_concurrency: 2
"""


def write(tmp_path: Path, text: str, name: str = "endpoints.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestEndpointsFile:
    def test_a_yaml_list_is_read_by_name(self, tmp_path):
        endpoints = load_endpoints(write(tmp_path, GOOD))
        assert list(endpoints) == ["vllm-prod", "ollama"]
        prod = endpoints["vllm-prod"]
        assert prod.base_url == "http://vllm:8000/v1"  # trailing slash dropped
        assert (prod.api, prod.api_key_env, prod.max_concurrency, prod.timeout_s) == (
            "chat",
            "VLLM_API_KEY",
            16,
            30,
        )
        assert prod.path == "/chat/completions"
        ollama = endpoints["ollama"]
        assert ollama.path == "/completions"
        assert (ollama.api_key_env, ollama.price_per_1k_input, ollama.timeout_s) == (None, None, 120.0)

    def test_json_and_an_endpoints_mapping_work_too(self, tmp_path):
        entry = {"name": "gw", "base_url": "https://gw.example/v1", "api": "chat", "max_concurrency": 4}
        path = write(tmp_path, json.dumps({"endpoints": [entry]}), "endpoints.json")
        assert list(load_endpoints(path)) == ["gw"]
        assert load_endpoints(write(tmp_path, "")) == {}

    @pytest.mark.parametrize(
        ("entry", "expected"),
        [
            (
                {"max_concurrency": 0},
                "entry 0 ('bad'), field max_concurrency: Input should be greater than or equal to 1",
            ),
            ({"api": "responses"}, "entry 0 ('bad'), field api: Input should be 'chat' or 'completions'"),
            (
                {"base_url": "ftp://x/v1"},
                "entry 0 ('bad'), field base_url: Value error, must be an http:// or https://",
            ),
            (
                {"base_url": "http://user:secret@x/v1"},
                "field base_url: Value error, must not hold credentials",
            ),
            ({"api_key_env": "not a name"}, "field api_key_env: String should match pattern"),
            ({"api_key": "sk-123"}, "entry 0 ('bad'), field api_key: unknown field"),
            (
                {"price_per_1k_input": -1},
                "field price_per_1k_input: Input should be greater than or equal to 0",
            ),
        ],
    )
    def test_a_wrong_entry_names_itself_and_the_field(self, tmp_path, entry, expected):
        base = {"name": "bad", "base_url": "http://x/v1", "api": "chat", "max_concurrency": 2}
        path = write(tmp_path, json.dumps([base | entry]), "endpoints.json")
        with pytest.raises(EndpointsFileError) as error:
            load_endpoints(path)
        assert str(error.value).startswith(f"ENDPOINTS_FILE {path}: ")
        assert expected in str(error.value)
        # Never echoes a secret that was put where it does not belong.
        assert "secret" not in str(error.value) and "sk-123" not in str(error.value)

    def test_every_problem_is_listed_at_once(self, tmp_path):
        text = json.dumps(
            [
                {"name": "a", "base_url": "http://x/v1", "api": "chat", "max_concurrency": 1},
                {"name": "a", "base_url": "http://y/v1", "api": "chat", "max_concurrency": 1},
                {"base_url": "http://z/v1", "api": "chat"},
                "not a mapping",
            ]
        )
        with pytest.raises(EndpointsFileError) as error:
            load_endpoints(write(tmp_path, text, "e.json"))
        message = str(error.value)
        assert "entry 1 ('a'), field name: 'a' is declared twice" in message
        assert "entry 2, field name: Field required" in message
        assert "entry 2, field max_concurrency: Field required" in message
        assert "entry 3: must be a mapping" in message

    def test_unreadable_or_malformed_files(self, tmp_path):
        with pytest.raises(EndpointsFileError, match="cannot be read"):
            load_endpoints(tmp_path / "missing.yaml")
        with pytest.raises(EndpointsFileError, match="is not valid yaml"):
            load_endpoints(write(tmp_path, "- name: [unclosed"))
        with pytest.raises(EndpointsFileError, match="must hold a list of endpoints"):
            load_endpoints(write(tmp_path, "name: x"))

    def test_settings_load_it_once_and_refuse_a_wrong_one_at_start(self, tmp_path):
        settings = Settings(endpoints_file=write(tmp_path, GOOD))
        assert sorted(settings.endpoints) == ["ollama", "vllm-prod"]
        assert Settings(endpoints_file="").endpoints == {} and Settings().endpoints == {}
        bad = write(tmp_path, "- {name: x, base_url: 'http://x', api: chat, max_concurrency: -3}", "bad.yaml")
        with pytest.raises(ValidationError, match=r"entry 0 \('x'\), field max_concurrency"):
            Settings(endpoints_file=bad)

    def test_cost_follows_the_price_table(self):
        priced = EndpointConfig(
            name="p",
            base_url="http://x/v1",
            api="chat",
            max_concurrency=1,
            price_per_1k_input=0.5,
            price_per_1k_output=1.5,
        )
        assert priced.cost(2000, 100) == pytest.approx(1.0 + 0.15)
        assert priced.cost(None, 100) is None
        unpriced = EndpointConfig(name="u", base_url="http://x/v1", api="chat", max_concurrency=1)
        assert unpriced.cost(2000, 100) is None


class TestModelStrings:
    ENDPOINTS = {
        "vllm-prod": EndpointConfig(name="vllm-prod", base_url="http://x/v1", api="chat", max_concurrency=1)
    }

    @pytest.mark.parametrize(
        ("model", "parsed"),
        [
            (
                "endpoint:vllm-prod/meta-llama/Llama-3.1-8B-Instruct",
                ("vllm-prod", "meta-llama/Llama-3.1-8B-Instruct"),
            ),
            ("endpoint:ollama/llama3.1:8b", ("ollama", "llama3.1:8b")),
            ("endpoint:vllm-prod", None),
            ("endpoint:vllm-prod/", None),
            ("endpoint:vllm prod/x", None),
            ("endpoint:x/has space", None),
            ("vllm-prod/x", None),
        ],
    )
    def test_parse(self, model, parsed):
        assert parse_endpoint_model(model) == parsed

    def test_the_source_kind(self):
        source = classify_model("endpoint:vllm-prod/gpt-x")
        assert (source.kind, source.value) == (SourceKind.endpoint, "vllm-prod/gpt-x")
        assert classify_model("org/name").kind is SourceKind.hub

    def test_problems_list_the_configured_endpoints(self):
        assert endpoint_model_problem("endpoint:vllm-prod/m", self.ENDPOINTS) is None
        unknown = endpoint_model_problem("endpoint:other/m", self.ENDPOINTS)
        assert unknown == "unknown endpoint 'other'; configured endpoints: vllm-prod (GET /v1/models)"
        malformed = endpoint_model_problem("endpoint:vllm-prod", self.ENDPOINTS)
        assert malformed is not None and "endpoint:<endpoint-name>/<model-id>" in malformed
        none = endpoint_model_problem("endpoint:x/m", {})
        assert none is not None and "none are configured (setting ENDPOINTS_FILE)" in none


class TestSharedConcurrency:
    @pytest.fixture
    def store(self, redis_client, redis_prefix) -> ComparisonStore:
        return ComparisonStore(redis_client, prefix=redis_prefix)

    def test_at_most_max_concurrency_holders(self, store):
        taken = [store.endpoint_acquire("ep", f"t{i}", max_concurrency=3, hold_s=30) for i in range(5)]
        assert taken == [True, True, True, False, False]
        assert store.endpoint_in_flight("ep") == 3
        store.endpoint_release("ep", "t1")
        assert store.endpoint_acquire("ep", "t9", max_concurrency=3, hold_s=30)
        assert not store.endpoint_acquire("ep", "t10", max_concurrency=3, hold_s=30)
        # Another endpoint has slots of its own.
        assert store.endpoint_acquire("other", "t0", max_concurrency=1, hold_s=30)

    def test_a_dead_holders_slot_comes_back_when_it_expires(self, store):
        assert store.endpoint_acquire("ep", "dead", max_concurrency=1, hold_s=0.3)
        assert not store.endpoint_acquire("ep", "alive", max_concurrency=1, hold_s=30)
        time.sleep(0.4)
        assert store.endpoint_acquire("ep", "alive", max_concurrency=1, hold_s=30)

    def test_a_429_halves_the_limit_once_per_cooldown_and_successes_grow_it_back(self, store):
        assert store.endpoint_limit("ep", max_concurrency=8) == 8
        assert store.endpoint_congested("ep", max_concurrency=8) == 4
        # More 429s from requests already in flight count once.
        assert store.endpoint_congested("ep", max_concurrency=8) == 4
        assert [store.endpoint_acquire("ep", f"t{i}", max_concurrency=8, hold_s=30) for i in range(5)] == [
            True,
            True,
            True,
            True,
            False,
        ]
        # Additive increase: 1/limit a success, one slot per limit-many successes.
        limits = [store.endpoint_succeeded("ep", max_concurrency=8) for _ in range(4)]
        assert limits == pytest.approx([4.25, 4.485294, 4.708251, 4.920641], rel=1e-5)
        assert store.endpoint_acquire("ep", "t5", max_concurrency=8, hold_s=30) is False  # floor(4.92) = 4
        store.endpoint_succeeded("ep", max_concurrency=8)
        assert store.endpoint_acquire("ep", "t5", max_concurrency=8, hold_s=30)  # 5.12: a fifth slot
        for _ in range(200):
            store.endpoint_succeeded("ep", max_concurrency=8)
        assert store.endpoint_limit("ep", max_concurrency=8) == 8  # never past max_concurrency

    def test_the_limit_never_drops_below_one(self, store):
        for _ in range(6):
            store.r.hdel(f"{store.prefix}:endpoint:ep:limit", "cut_at")  # as if each came after the cooldown
            limit = store.endpoint_congested("ep", max_concurrency=4)
        assert limit == 1
        assert store.endpoint_acquire("ep", "a", max_concurrency=4, hold_s=30)
        assert not store.endpoint_acquire("ep", "b", max_concurrency=4, hold_s=30)
