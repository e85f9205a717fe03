"""API keys, ownership, quotas, idempotency and the audit trail, through the app in-process
(FastAPI's TestClient) against real Redis, with auth on as in the compose stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.api.main import create_app
from shared.apikeys import Quotas, Role, issue_key
from shared.cli import app as cli_app
from shared.schemas import ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore
from tests.fixtures.finished import spec_dict, write_finished


@pytest.fixture
def settings(redis_url, redis_prefix) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        mlflow_tracking_uri="http://127.0.0.1:9",
        auth_disabled=False,
        rate_limit_submissions_per_minute=1000,
        max_running_comparisons=50,
    )


@pytest.fixture
def store(redis_client, settings) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=settings.key_prefix, ttl_s=600)


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def key(store: ComparisonStore, name: str, role: Role = Role.submitter, **quotas: int) -> str:
    return issue_key(store, name=name, role=role, quotas=Quotas(**quotas))[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client: TestClient, token: str, **overrides: Any) -> Any:
    return client.post("/v1/comparisons", json=spec_dict(**overrides), headers=bearer(token))


class TestKeys:
    def test_no_key_wrong_key_and_revoked_key_are_401(self, client, store):
        good = key(store, "team-a")
        for headers in ({}, bearer("not-a-key"), bearer(good[:-1] + ("A" if good[-1] != "A" else "B"))):
            for method, path in (
                ("GET", "/v1/comparisons"),
                ("POST", "/v1/comparisons"),
                ("GET", "/v1/models"),
            ):
                response = client.request(method, path, headers=headers, json=spec_dict())
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                body = response.json()
                assert body["error"] == "unauthorized" and "llm-compare keys create" in body["message"]
        assert client.get("/v1/comparisons", headers=bearer(good)).status_code == 200
        record_id = good.split("_")[1]
        assert store.revoke_api_key(record_id) is True
        assert client.get("/v1/comparisons", headers=bearer(good)).status_code == 401
        assert store.revoke_api_key(record_id) is False  # already revoked

    def test_only_a_hash_is_stored(self, store, redis_client):
        record, whole = issue_key(store, name="team-a", role=Role.reader)
        stored = redis_client.hgetall(f"{store.prefix}:apikey:{record.id}")
        assert whole not in json.dumps(stored)
        assert stored["key_hash"] == record.key_hash and len(stored["key_hash"]) == 64

    def test_health_stays_open(self, client):
        assert client.get("/healthz").status_code == 200

    def test_roles(self, client, store):
        reader = key(store, "team-a", Role.reader)
        response = submit(client, reader)
        assert response.status_code == 403 and "role is reader" in response.json()["message"]
        assert client.get("/v1/metrics", headers=bearer(reader)).status_code == 200


class TestOwnership:
    def test_teams_see_only_their_own(self, client, store):
        a = key(store, "team-a")
        a_reader = key(store, "team-a", Role.reader)
        b = key(store, "team-b")
        admin = key(store, "ops", Role.admin)
        created = submit(client, a).json()
        cid = created["id"]
        assert created["owner"] == "team-a"
        # The same team's reader key reads it; another team's key cannot tell it exists.
        assert client.get(f"/v1/comparisons/{cid}", headers=bearer(a_reader)).status_code == 200
        for method, path in (
            ("GET", f"/v1/comparisons/{cid}"),
            ("GET", f"/v1/comparisons/{cid}/results"),
            ("GET", f"/v1/comparisons/{cid}/events"),
            ("GET", f"/v1/comparisons/{cid}/votes"),
            ("GET", f"/v1/comparisons/{cid}/ratings"),
            ("GET", f"/v1/comparisons/{cid}/audit"),
            ("POST", f"/v1/comparisons/{cid}/cancel"),
        ):
            response = client.request(method, path, headers=bearer(b))
            assert response.status_code == 404, (method, path)
            assert response.json()["error"] == "not_found"
        assert [i["id"] for i in client.get("/v1/comparisons", headers=bearer(b)).json()["items"]] == []
        assert [i["id"] for i in client.get("/v1/comparisons", headers=bearer(a)).json()["items"]] == [cid]
        everything = client.get("/v1/comparisons", headers=bearer(admin)).json()
        assert cid in [i["id"] for i in everything["items"]]
        # Cancelling someone else's comparison changes nothing.
        assert store.status(cid) is ComparisonStatus.queued

    def test_votes_and_ratings_of_other_teams_are_404(self, client, store):
        finished = write_finished(store)  # owned by "local", as comparisons from before owners
        b = key(store, "team-b")
        vote = {"row": 0, "a": "greedy", "b": "sampled", "winner": "a"}
        assert (
            client.post(f"/v1/comparisons/{finished}/votes", json=vote, headers=bearer(b)).status_code == 404
        )
        rating = {"row": 0, "label": "greedy", "rating": "up"}
        assert (
            client.post(f"/v1/comparisons/{finished}/ratings", json=rating, headers=bearer(b)).status_code
            == 404
        )
        assert client.post(f"/v1/comparisons/{finished}/arena/matchups", headers=bearer(b)).status_code == 404
        admin = key(store, "ops", Role.admin)
        assert (
            client.post(f"/v1/comparisons/{finished}/votes", json=vote, headers=bearer(admin)).status_code
            == 201
        )

    def test_worker_host_is_shown_to_admins_only(self, client, store):
        a = key(store, "team-a")
        admin = key(store, "ops", Role.admin)
        cid = submit(client, a).json()["id"]
        store.set_candidate_fields(cid, "greedy", worker="gpu-node-7:4242")
        mine = client.get(f"/v1/comparisons/{cid}", headers=bearer(a)).json()
        assert [c["worker"] for c in mine["candidates"]] == [None, None]
        ops = client.get(f"/v1/comparisons/{cid}", headers=bearer(admin)).json()
        assert ops["candidates"][0]["worker"] == "gpu-node-7:4242"


class TestQuotas:
    def test_submissions_per_minute_per_key(self, client, store):
        slow = key(store, "team-a", submissions_per_minute=2)
        other = key(store, "team-a")
        assert [submit(client, slow).status_code for _ in range(2)] == [202, 202]
        refused = submit(client, slow)
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        # Another key of the same team has its own budget.
        assert submit(client, other).status_code == 202

    def test_running_comparisons_per_key(self, client, store):
        one_at_a_time = key(store, "team-a", max_running=1)
        first = submit(client, one_at_a_time).json()["id"]
        refused = submit(client, one_at_a_time)
        assert refused.status_code == 429 and "already has 1 comparisons queued or running" in refused.text
        store.transition(first, ComparisonStatus.cancelled, allowed_from=[ComparisonStatus.queued])
        assert submit(client, one_at_a_time).status_code == 202

    def test_generation_and_judge_budgets_per_comparison(self, client, store, settings):
        a = key(store, "team-a")
        spec = spec_dict()
        spec["dataset"]["rows"] = spec["dataset"]["rows"] * 10  # 40 rows
        for candidate in spec["candidates"]:
            candidate["generation"]["max_new_tokens"] = 1024
        limited = Settings(**{**settings.model_dump(), "max_generated_tokens": 80_000})
        with TestClient(create_app(limited)) as small:
            response = small.post("/v1/comparisons", json=spec, headers=bearer(a))
        assert response.status_code == 422
        problem = response.json()["fields"][0]
        assert problem["field"] == "candidates"
        assert "81,920" in problem["message"] and "MAX_GENERATED_TOKENS" in problem["message"]


class TestIdempotency:
    def test_same_key_and_body_returns_the_first(self, client, store, redis_client, settings):
        a = key(store, "team-a")
        headers = {**bearer(a), "Idempotency-Key": "retry-123"}
        first = client.post("/v1/comparisons", json=spec_dict(), headers=headers)
        again = client.post("/v1/comparisons", json=spec_dict(), headers=headers)
        assert (first.status_code, again.status_code) == (202, 200)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == f"/v1/comparisons/{first.json()['id']}"
        queued = [m for m in redis_client.lrange(settings.queue_name, 0, -1) if first.json()["id"] in m]
        assert len(queued) == 1
        other_body = client.post("/v1/comparisons", json=spec_dict(name="changed"), headers=headers)
        assert other_body.status_code == 422
        assert other_body.json()["fields"][0]["field"] == "Idempotency-Key"
        # Keys are per API key: another key's identical request is a new comparison.
        b = key(store, "team-b")
        theirs = client.post(
            "/v1/comparisons", json=spec_dict(), headers={**bearer(b), "Idempotency-Key": "retry-123"}
        )
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]

    def test_a_refused_request_frees_its_key(self, client, store):
        a = key(store, "team-a")
        headers = {**bearer(a), "Idempotency-Key": "fix-and-retry"}
        bad = spec_dict()
        bad["candidates"][1]["label"] = "greedy"
        assert client.post("/v1/comparisons", json=bad, headers=headers).status_code == 422
        assert client.post("/v1/comparisons", json=spec_dict(), headers=headers).status_code == 202


class TestAudit:
    def test_who_did_what(self, client, store):
        a = key(store, "team-a")
        admin = key(store, "ops", Role.admin)
        cid = submit(client, a).json()["id"]
        assert client.post(f"/v1/comparisons/{cid}/cancel", headers=bearer(admin)).status_code == 200
        events = client.get(f"/v1/comparisons/{cid}/audit", headers=bearer(a)).json()["events"]
        assert [(e["actor"], e["action"]) for e in events] == [("team-a", "submitted"), ("ops", "cancelled")]
        assert events[0]["key_id"] == a.split("_")[1]
        finished = write_finished(store)
        vote = {"row": 0, "a": "greedy", "b": "sampled", "winner": "b", "voter": "ann"}
        client.post(f"/v1/comparisons/{finished}/votes", json=vote, headers=bearer(admin))
        rating = {"row": 1, "label": "greedy", "rating": "down", "rater": "ann"}
        client.post(f"/v1/comparisons/{finished}/ratings", json=rating, headers=bearer(admin))
        logged = store.audit_log(finished)
        assert [(e["actor"], e["action"]) for e in logged] == [("ops", "voted"), ("ops", "rated")]
        assert logged[1]["row"] == "1" and logged[1]["rating"] == "down"


class TestPages:
    def test_pages_ask_for_a_key_and_keep_it_in_a_cookie(self, client, store):
        a = key(store, "team-a")
        response = client.get("/ui/comparisons/abc", follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/ui/login?next=%2Fui%2Fcomparisons%2Fabc"
        wrong = client.post("/ui/login", data={"key": "llmc_nope", "next": "/ui"})
        assert wrong.status_code == 401 and "That key is not valid" in wrong.text
        # An absolute "next" is ignored: no redirect off the site.
        signed = client.post(
            "/ui/login", data={"key": a, "next": "https://elsewhere.example/"}, follow_redirects=False
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/ui"
        cookie = signed.headers["set-cookie"]
        assert "llmc_key=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = client.get("/ui")
        assert page.status_code == 200 and "team-a · submitter" in page.text
        # The page scripts call the API with the same cookie.
        assert client.get("/v1/comparisons").status_code == 200
        assert client.post("/ui/logout", follow_redirects=False).status_code == 303
        client.cookies.clear()
        assert client.get("/v1/comparisons").status_code == 401

    def test_cookie_writes_from_another_origin_are_refused(self, client, store):
        a = key(store, "team-a")
        client.cookies.set("llmc_key", a)
        response = client.post(
            "/v1/comparisons", json=spec_dict(), headers={"Origin": "https://evil.example"}
        )
        assert response.status_code == 403
        ok = client.post("/v1/comparisons", json=spec_dict(), headers={"Origin": "http://testserver"})
        assert ok.status_code == 202

    def test_a_reader_sees_no_way_to_submit(self, client, store):
        reader = key(store, "team-a", Role.reader)
        client.cookies.set("llmc_key", reader)
        page = client.get("/ui")
        assert "team-a · reader" in page.text and 'href="/ui/new"' not in page.text
        assert client.get("/ui/new").status_code == 403


class TestKeysCommand:
    def test_create_list_revoke(self, store, settings, monkeypatch):
        monkeypatch.setenv("REDIS_URL", settings.redis_url)
        monkeypatch.setenv("KEY_PREFIX", settings.key_prefix)
        from shared.settings import get_settings

        get_settings.cache_clear()
        runner = CliRunner()
        try:
            created = runner.invoke(
                cli_app,
                ["--json", "keys", "create", "--name", "team-a", "--role", "reader", "--max-running", "3"],
            )
            assert created.exit_code == 0, created.output
            data = json.loads(created.output)
            assert data["key"].startswith(f"llmc_{data['id']}_")
            record = store.api_key(data["id"])
            assert record is not None and record.role is Role.reader and record.quotas.max_running == 3
            listed = json.loads(runner.invoke(cli_app, ["--json", "keys", "list"]).output)
            assert [(k["id"], k["name"], k["role"]) for k in listed] == [(data["id"], "team-a", "reader")]
            assert "key" not in listed[0] and "key_hash" not in listed[0]
            assert runner.invoke(cli_app, ["keys", "revoke", data["id"]]).exit_code == 0
            assert store.api_key(data["id"]).revoked_at is not None
            again = runner.invoke(cli_app, ["keys", "revoke", data["id"]])
            assert again.exit_code == 1
            bad = runner.invoke(cli_app, ["keys", "create", "--name", "no spaces please"])
            assert bad.exit_code == 2
        finally:
            get_settings.cache_clear()
