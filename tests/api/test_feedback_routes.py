"""The human evaluation endpoints through FastAPI's TestClient, against the real Redis; the
comparison is written with the store as a finished worker would leave it."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.api.deps import get_publisher
from services.api.main import create_app
from shared.schemas import ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore
from tests.fixtures.arena import AGREEMENT_VOTES, OUTPUTS, RecordingPublisher, write_comparison


@pytest.fixture
def store(redis_client, redis_prefix):
    return ComparisonStore(redis_client, prefix=redis_prefix, ttl_s=600)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def http(redis_url, redis_prefix, publisher) -> Iterator[TestClient]:
    app = create_app(
        Settings(redis_url=redis_url, key_prefix=redis_prefix, queue_name=redis_prefix, auth_disabled=True)
    )
    app.dependency_overrides[get_publisher] = lambda: publisher
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def cid(store) -> str:
    return write_comparison(store)


def problems(response) -> dict[str, str]:
    body = response.json()
    return {f["field"]: f["message"] for f in body["fields"]}


def invalid(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.json()["message"].startswith("Nothing was recorded.")
    return problems(response)


class TestVotes:
    def test_vote_201(self, http, cid, publisher):
        response = http.post(
            f"/v1/comparisons/{cid}/votes", json={"row": 0, "a": "alpha", "b": "beta", "winner": "a"}
        )
        assert response.status_code == 201
        body = response.json()
        assert set(body) == {"id", "row", "a", "b", "winner", "voter", "matchup", "created_at"}
        assert (body["row"], body["a"], body["b"], body["winner"], body["voter"], body["matchup"]) == (
            0,
            "alpha",
            "beta",
            "a",
            None,
            None,
        )
        assert publisher.logged == [cid]

    def test_field_errors(self, http, cid):
        url = f"/v1/comparisons/{cid}/votes"
        assert invalid(http.post(url, json={"row": 0, "a": "x", "b": "beta", "winner": "a"})) == {
            "a": "unknown candidate 'x'; use one of the labels alpha, beta"
        }
        assert set(invalid(http.post(url, json={"row": 0, "a": "alpha", "b": "y", "winner": "a"}))) == {"b"}
        assert set(invalid(http.post(url, json={"row": 0, "a": "beta", "b": "beta", "winner": "a"}))) == {"b"}
        assert invalid(http.post(url, json={"row": 0, "a": "x", "b": "x", "winner": "a"})) == {
            "a": "unknown candidate 'x'; use one of the labels alpha, beta",
            "b": "unknown candidate 'x'; use one of the labels alpha, beta",
        }
        assert invalid(http.post(url, json={"row": 7, "a": "alpha", "b": "beta", "winner": "a"})) == {
            "row": "row 7 is out of range: use 0 to 3 (this comparison has 4 rows)"
        }
        assert set(invalid(http.post(url, json={"winner": "a"}))) == {"row", "a", "b"}
        assert set(invalid(http.post(url, json={"row": 0, "a": "alpha", "b": "beta", "winner": "c"}))) == {
            "winner"
        }
        long_name = {"row": 0, "a": "alpha", "b": "beta", "winner": "a", "voter": "v" * 101}
        assert set(invalid(http.post(url, json=long_name))) == {"voter"}
        extra = {"row": 0, "a": "alpha", "b": "beta", "winner": "a", "weight": 2}
        assert set(invalid(http.post(url, json=extra))) == {"weight"}
        assert set(invalid(http.post(url, json={"row": "first", "a": 1, "b": "beta", "winner": "a"}))) == {
            "row",
            "a",
        }
        # A boolean or a numeric string is not a row number.
        assert set(invalid(http.post(url, json={"row": True, "a": "alpha", "b": "beta", "winner": "a"}))) == {
            "row"
        }
        invalid(http.post(url, content=b"{not json", headers={"content-type": "application/json"}))
        invalid(http.post(url, json=["row", 0]))
        invalid(http.post(url))

    def test_conflicts(self, http, store, cid):
        response = http.post(
            f"/v1/comparisons/{cid}/votes", json={"row": 0, "a": "alpha", "b": "gamma", "winner": "a"}
        )
        assert response.status_code == 409 and response.json()["error"] == "conflict"
        assert set(problems(response)) == {"status"}
        running = write_comparison(store, status=ComparisonStatus.running)
        response = http.post(
            f"/v1/comparisons/{running}/votes", json={"row": 0, "a": "alpha", "b": "beta", "winner": "a"}
        )
        assert response.status_code == 409
        assert "is running" in problems(response)["status"]

    def test_unknown_comparison_is_404_everywhere(self, http, cid):
        vote = {"row": 0, "a": "alpha", "b": "beta", "winner": "a"}
        # An id that would name one of the comparison's own keys is no comparison either.
        assert http.post(f"/v1/comparisons/{cid}:cand:alpha/votes", json=vote).status_code == 404
        assert http.get(f"/v1/comparisons/{cid}:cand:alpha/votes").status_code == 404
        assert http.post("/v1/comparisons/nope/votes", json=vote).status_code == 404
        assert http.get("/v1/comparisons/nope/votes").status_code == 404
        assert http.post("/v1/comparisons/nope/arena/matchups", json={}).status_code == 404
        rating = {"row": 0, "label": "alpha", "rating": "up"}
        assert http.post("/v1/comparisons/nope/ratings", json=rating).status_code == 404
        response = http.get("/v1/comparisons/nope/ratings")
        assert response.status_code == 404 and response.json()["error"] == "not_found"


class TestArena:
    def test_blind_vote_round_trip(self, http, cid):
        response = http.post(f"/v1/comparisons/{cid}/arena/matchups", json={"voter": "ann"})
        assert response.status_code == 201
        drawn = response.json()
        assert set(drawn) == {"matchup", "row", "input", "reference", "outputs"}
        assert set(drawn["outputs"]) == {"a", "b"}
        # No label anywhere in what the voter sees.
        assert "alpha" not in response.text and "beta" not in response.text
        voted = http.post(f"/v1/comparisons/{cid}/votes", json={"matchup": drawn["matchup"], "winner": "a"})
        assert voted.status_code == 201
        body = voted.json()
        assert OUTPUTS[body["a"]][drawn["row"]] == drawn["outputs"]["a"]
        assert OUTPUTS[body["b"]][drawn["row"]] == drawn["outputs"]["b"]
        assert (body["row"], body["voter"], body["matchup"]) == (drawn["row"], "ann", drawn["matchup"])
        again = http.post(f"/v1/comparisons/{cid}/votes", json={"matchup": drawn["matchup"], "winner": "b"})
        assert again.status_code == 409 and set(problems(again)) == {"matchup"}

    def test_matchup_without_a_body(self, http, cid):
        assert http.post(f"/v1/comparisons/{cid}/arena/matchups").status_code == 201

    def test_matchup_errors(self, http, store, cid):
        url = f"/v1/comparisons/{cid}/votes"
        assert set(invalid(http.post(url, json={"matchup": "expired", "winner": "a"}))) == {"matchup"}
        drawn = http.post(f"/v1/comparisons/{cid}/arena/matchups", json={}).json()
        both = {"matchup": drawn["matchup"], "row": 0, "a": "alpha", "b": "beta", "winner": "a"}
        assert set(invalid(http.post(url, json=both))) == {"row", "a", "b"}
        long_voter = http.post(f"/v1/comparisons/{cid}/arena/matchups", json={"voter": "v" * 101})
        assert set(invalid(long_voter)) == {"voter"}
        running = write_comparison(store, status=ComparisonStatus.running)
        response = http.post(f"/v1/comparisons/{running}/arena/matchups", json={})
        assert response.status_code == 409 and set(problems(response)) == {"status"}


class TestReadVotes:
    def test_ranking_and_agreement(self, http, cid):
        for vote in AGREEMENT_VOTES:
            assert http.post(f"/v1/comparisons/{cid}/votes", json=vote).status_code == 201
        response = http.get(f"/v1/comparisons/{cid}/votes")
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"votes", "ranking", "agreement", "method"}
        assert [v["row"] for v in body["votes"]] == [0, 1, 2, 3, 2]
        assert [r["label"] for r in body["ranking"]] == ["beta", "alpha"]
        beta = body["ranking"][0]
        assert set(beta) == {"label", "rank", "score", "ci_low", "ci_high", "wins", "losses", "ties", "votes"}
        assert beta["score"] == pytest.approx(1000 + 200 * math.log10(3.5 / 2.5))
        assert (beta["rank"], beta["wins"], beta["losses"], beta["ties"], beta["votes"]) == (1, 2, 1, 2, 5)
        assert body["agreement"] == {
            "judge": {"agree": 4, "compared": 5, "rate": 0.8},
            "metrics": {
                "exact_match": {"agree": 2, "compared": 4, "rate": 0.5},
                "output_words": {"agree": 1, "compared": 5, "rate": 0.2},
            },
        }
        assert body["method"].endswith("seeded resamples of the votes.")

    def test_a_running_comparison_reads_empty(self, http, store):
        running = write_comparison(store, status=ComparisonStatus.running, judge=False)
        body = http.get(f"/v1/comparisons/{running}/votes").json()
        assert body["votes"] == [] and body["agreement"]["judge"] is None
        assert [(r["label"], r["score"], r["ci_low"]) for r in body["ranking"]] == [
            ("alpha", 1000.0, None),
            ("beta", 1000.0, None),
        ]


class TestRatings:
    def test_set_replace_delete_and_list(self, http, cid, publisher):
        url = f"/v1/comparisons/{cid}/ratings"
        first = http.post(url, json={"row": 1, "label": "beta", "rating": "up", "rater": "ann"})
        assert first.status_code == 201
        assert set(first.json()) == {"row", "label", "rating", "comment", "rater", "updated_at"}
        http.post(url, json={"row": 0, "label": "beta", "rating": "down", "comment": "Lyon is wrong"})
        http.post(url, json={"row": 0, "label": "alpha", "rating": "up"})
        http.post(url, json={"row": 1, "label": "beta", "rating": "down", "rater": "ann"})  # replaces
        listed = http.get(url).json()["ratings"]
        assert [(r["row"], r["label"], r["rating"], r["comment"], r["rater"]) for r in listed] == [
            (0, "alpha", "up", None, None),
            (0, "beta", "down", "Lyon is wrong", None),
            (1, "beta", "down", None, "ann"),
        ]
        cleared = http.post(url, json={"row": 0, "label": "alpha", "rating": None})
        assert cleared.status_code == 201
        assert (cleared.json()["rating"], cleared.json()["comment"]) == (None, None)
        assert [(r["row"], r["label"]) for r in http.get(url).json()["ratings"]] == [(0, "beta"), (1, "beta")]
        assert publisher.logged == [cid]

    def test_rating_errors(self, http, store, cid):
        url = f"/v1/comparisons/{cid}/ratings"
        assert invalid(http.post(url, json={"row": 0, "label": "zeta", "rating": "up"})) == {
            "label": "unknown candidate 'zeta'; use one of the labels alpha, beta"
        }
        assert set(invalid(http.post(url, json={"row": 4, "label": "alpha", "rating": "up"}))) == {"row"}
        assert set(invalid(http.post(url, json={"row": 0, "label": "alpha", "rating": "meh"}))) == {"rating"}
        too_long = {"row": 0, "label": "alpha", "rating": "up", "comment": "x" * 2001}
        assert set(invalid(http.post(url, json=too_long))) == {"comment"}
        assert set(invalid(http.post(url, json={"row": 0, "rating": "up"}))) == {"label"}
        failed = http.post(url, json={"row": 0, "label": "gamma", "rating": "up"})
        assert failed.status_code == 409 and set(problems(failed)) == {"status"}
        running = write_comparison(store, status=ComparisonStatus.running)
        response = http.post(f"/v1/comparisons/{running}/ratings", json={"row": 0, "label": "alpha"})
        assert response.status_code == 409 and set(problems(response)) == {"status"}


class TestRefusalsSayWhatWasNotDone:
    """The words before the problems fit the request: a vote or rating was not recorded, a
    submission was not queued, a malformed read was refused."""

    def test_a_vote_that_is_not_json(self, http, cid):
        response = http.post(
            f"/v1/comparisons/{cid}/votes", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert invalid(response) == {"body": "not valid JSON: send a JSON object"}

    def test_a_submission_with_a_malformed_header(self, http):
        response = http.post("/v1/comparisons", json={}, headers={"Idempotency-Key": "x" * 300})
        assert response.status_code == 422, response.text
        assert response.json()["message"].startswith("The comparison was not queued.")

    def test_a_list_with_a_bad_query(self, http):
        response = http.get("/v1/comparisons", params={"limit": 0})
        assert response.status_code == 422, response.text
        assert response.json()["message"].startswith("The request was refused. limit:")
