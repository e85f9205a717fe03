"""The web pages in-process: FastAPI's TestClient against real Redis, comparisons written the
way workers write them (tests/fixtures/finished.py). The browser tests cover the scripts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lxml import html

from services.api.main import create_app
from shared.schemas import ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore
from tests.fixtures.finished import OUTPUTS, ROWS, spec_dict, write_finished


@pytest.fixture
def settings(redis_url, redis_prefix) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        mlflow_tracking_uri="http://127.0.0.1:9",
        mlflow_public_url="http://127.0.0.1:5000",
        auth_disabled=True,
    )


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def store(redis_client, settings) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=settings.key_prefix, ttl_s=600)


def page(response) -> Any:
    assert response.headers["content-type"].startswith("text/html"), response.text[:300]
    return html.fromstring(response.text)


def form_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """What a browser posts for a spec filled in by hand (multi-valued 'metrics')."""
    fields: dict[str, Any] = {"name": spec["name"], "experiment": spec.get("experiment", ""), "cache": "on"}
    for i, candidate in enumerate(spec["candidates"]):
        p = f"candidates[{i}]."
        fields[p + "label"] = candidate["label"]
        fields[p + "model"] = candidate["model"]
        fields[p + "prompt_template"] = candidate.get("prompt_template", "{input}")
        fields[p + "use_chat_template"] = "auto"
        generation = candidate.get("generation", {})
        for key, value in generation.items():
            if key == "do_sample":
                if value:
                    fields[p + "generation.do_sample"] = "on"
            else:
                fields[f"{p}generation.{key}"] = str(value)
    fields["dataset"] = "\n".join(json.dumps(row) for row in spec["dataset"]["rows"])
    fields["metrics"] = spec["metrics"]
    return fields


def error_next_to(doc: Any, control_name: str) -> list[str]:
    """Messages rendered in the same field as the control named ``control_name``."""
    controls = doc.xpath(f'//*[@name="{control_name}"]')
    assert controls, f"no control named {control_name}"
    field = controls[0].getparent()
    return [p.text_content().strip() for p in field.xpath('.//p[@class="field-error"]')]


class TestNavigation:
    def test_root_redirects_to_the_pages(self, client):
        response = client.get("/", follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == "/ui"

    def test_static_files_are_served(self, client):
        response = client.get("/ui/static/app.css")
        assert response.status_code == 200 and "--primary" in response.text
        assert client.get("/ui/static/comparison.js").headers["content-type"].startswith("text/javascript")

    def test_unknown_comparison_is_a_404_page(self, client):
        response = client.get("/ui/comparisons/nope")
        assert response.status_code == 404
        assert "No comparison with id 'nope'" in page(response).text_content()

    def test_an_id_naming_another_key_is_not_found(self, client, store):
        # "{id}:cand:greedy" is a candidate's hash in Redis, not a comparison.
        comparison_id = write_finished(store)
        other_key = f"{comparison_id}:cand:greedy"
        for path in (
            f"/ui/comparisons/{other_key}",
            f"/ui/comparisons/{other_key}/arena",
            f"/v1/comparisons/{other_key}",
            f"/v1/comparisons/{other_key}/results",
            f"/v1/comparisons/{other_key}/events",
            f"/v1/comparisons/{other_key}/votes",
        ):
            assert client.get(path).status_code == 404, path
        assert client.post(f"/v1/comparisons/{other_key}/cancel").status_code == 404


class TestList:
    def test_lists_newest_first_with_progress_and_filters(self, client, store):
        first = write_finished(store)
        second = write_finished(store, status=ComparisonStatus.partially_failed)
        doc = page(client.get("/ui"))
        links = [a.get("href") for a in doc.xpath('//table[@class="list"]//a')]
        assert links == [f"/ui/comparisons/{second}", f"/ui/comparisons/{first}"]
        badges = [b.text_content() for b in doc.xpath('//td[@data-label="Status"]/span')]
        assert badges == ["partially failed", "succeeded"]
        counts = [c.text_content() for c in doc.xpath('//span[@class="mini-count"]')]
        assert counts == ["4/4"] * 4
        assert doc.xpath("//div[@data-active]")[0].get("data-active") == "false"

        filtered = page(client.get("/ui?status=succeeded"))
        assert [a.get("href") for a in filtered.xpath('//table[@class="list"]//a')] == [
            f"/ui/comparisons/{first}"
        ]
        empty = page(client.get("/ui?status=failed"))
        assert "No failed comparisons." in empty.text_content()

    def test_fragment_is_the_table_alone_and_marks_running_work(self, client, store, settings):
        spec = spec_dict()
        created = client.post("/v1/comparisons", json=spec).json()
        fragment = client.get("/ui?fragment=true")
        assert "<html" not in fragment.text
        doc = page(fragment)
        assert doc.xpath("//div[@data-active]")[0].get("data-active") == "true"
        assert f"/ui/comparisons/{created['id']}" in fragment.text


class TestNewComparisonForm:
    def test_opens_with_the_demo_example(self, client):
        doc = page(client.get("/ui/new"))
        demo = json.loads(Path("demo/comparison.json").read_text())
        assert doc.xpath('//input[@name="name"]')[0].get("value") == demo["name"]
        labels = [i.get("value") for i in doc.xpath('//input[contains(@name, "].label")]')]
        assert labels == [c["label"] for c in demo["candidates"]]
        rows = doc.xpath('//textarea[@name="dataset"]')[0].text.splitlines()
        assert [json.loads(r) for r in rows] == demo["dataset"]["rows"]
        checked = {i.get("value") for i in doc.xpath('//input[@name="metrics"][@checked]')}
        # The demo names no metrics: the form checks the defaults the API would run.
        assert "exact_match" in checked and "latency" in checked and "regex_match" not in checked
        offered = doc.xpath('//datalist[@id="model-names"]/option/@value')
        assert offered[0] == "smollm2-135m-instruct"
        # No ENDPOINTS_FILE here: nothing to offer as endpoint:<name>/, and the hint says nothing of it.
        assert not [v for v in offered if v.startswith("endpoint:")] and "endpoint:" not in doc.text_content()

    def test_valid_form_queues_and_redirects(self, client, store, redis_client, settings):
        spec = spec_dict()
        response = client.post("/ui/new", data=form_fields(spec), follow_redirects=False)
        assert response.status_code == 303, response.text[:2000]
        comparison_id = response.headers["location"].rsplit("/", 1)[1]
        stored = store.spec(comparison_id)
        assert stored.labels == ["greedy", "sampled"]
        assert stored.candidates[1].generation.temperature == 0.7
        assert stored.candidates[1].generation.do_sample is True
        assert stored.metrics == ("exact_match", "output_words")
        assert store.rows(comparison_id) == ROWS
        assert any(comparison_id in m for m in redis_client.lrange(settings.queue_name, 0, -1))

    def test_api_errors_appear_next_to_the_field_they_name(self, client, store):
        spec = spec_dict()
        spec["candidates"][1]["label"] = "greedy"
        spec["candidates"][0]["generation"]["temperature"] = "hot"
        fields = form_fields(spec)
        fields["dataset"] = '{"input": "no reference here"}'
        response = client.post("/ui/new", data=fields)
        assert response.status_code == 422
        doc = page(response)
        assert error_next_to(doc, "candidates[0].generation.temperature") == [
            "⚠ Input should be a valid number, unable to parse string as a number"
        ]
        assert store.r.zcard(f"{store.prefix}:cmps") == 0
        # Fixing the schema error reveals the service's own checks, also at their fields.
        fields["candidates[0].generation.temperature"] = "0.5"
        doc = page(client.post("/ui/new", data=fields))
        assert "already used by candidates[0]" in error_next_to(doc, "candidates[1].label")[0]
        label_input = doc.xpath('//input[@name="candidates[1].label"]')[0]
        assert label_input.get("aria-invalid") == "true"
        assert "f-candidates-1-label-error-1" in label_input.get("aria-describedby")
        assert doc.xpath('//div[@id="error-summary"]//a/@href') == ["#f-candidates-1-label"]
        # What was typed is kept.
        assert doc.xpath('//textarea[@name="dataset"]')[0].text == '{"input": "no reference here"}'
        # With unique labels, the metric that needs references is named at its checkbox.
        fields["candidates[1].label"] = "sampled"
        doc = page(client.post("/ui/new", data=fields))
        metric_box = doc.xpath('//input[@name="metrics"][@value="exact_match"]')[0].getparent()
        assert "needs a 'reference' on every row, but rows [0] have none" in metric_box.text_content()
        assert doc.xpath('//div[@id="error-summary"]//a/@href') == ["#f-metric-exact_match"]

    def test_unreadable_pasted_rows_are_refused_at_the_dataset(self, client):
        fields = form_fields(spec_dict())
        fields["dataset"] = '{"input": "fine"}\n{not json'
        doc = page(client.post("/ui/new", data=fields))
        assert error_next_to(doc, "dataset") == [
            "⚠ line 2 is not valid JSON (Expecting property name enclosed in double quotes); "
            "one object per line"
        ]

    def test_no_metric_checked_is_refused(self, client):
        fields = form_fields(spec_dict())
        fields["metrics"] = []
        doc = page(client.post("/ui/new", data=fields))
        assert "pick at least one metric" in doc.xpath('//section[@id="f-metrics"]')[0].text_content()

    def test_csv_upload_replaces_the_pasted_rows(self, client, store):
        fields = form_fields(spec_dict())
        csv_text = "input,reference\nWhat is 2+2?,4\nName a colour.,red\n"
        response = client.post(
            "/ui/new", data=fields, files={"file": ("rows.csv", csv_text.encode())}, follow_redirects=False
        )
        assert response.status_code == 303
        comparison_id = response.headers["location"].rsplit("/", 1)[1]
        assert store.rows(comparison_id) == [
            {"input": "What is 2+2?", "reference": "4"},
            {"input": "Name a colour.", "reference": "red"},
        ]

    def test_add_and_remove_candidates_without_javascript(self, client):
        fields = form_fields(spec_dict())
        fields["action"] = "add_candidate"
        doc = page(client.post("/ui/new", data=fields))
        labels = [i.get("value") for i in doc.xpath('//input[contains(@name, "].label")]')]
        assert labels == ["greedy", "sampled", "candidate-3"]
        # The new candidate starts as a copy of the last one.
        assert doc.xpath('//input[@name="candidates[2].generation.temperature"]')[0].get("value") == "0.7"
        fields.update(
            {
                "candidates[2].label": "third",
                "candidates[2].model": "smollm2-135m-instruct",
                "action": "remove_candidate:0",
            }
        )
        doc = page(client.post("/ui/new", data=fields))
        labels = [i.get("value") for i in doc.xpath('//input[contains(@name, "].label")]')]
        assert labels == ["sampled", "third"]

    def test_run_again_opens_the_form_with_that_comparison(self, client, store):
        comparison_id = write_finished(store)
        doc = page(client.get(f"/ui/new?from={comparison_id}"))
        assert doc.xpath('//input[@name="name"]')[0].get("value") == "capitals (again)"
        assert doc.xpath('//input[@name="candidates[1].generation.seed"]')[0].get("value") == "3"
        assert doc.xpath('//input[@name="candidates[1].generation.do_sample"]')[0].get("checked") is not None
        rows = [json.loads(r) for r in doc.xpath('//textarea[@name="dataset"]')[0].text.splitlines()]
        assert rows == ROWS
        checked = [i.get("value") for i in doc.xpath('//input[@name="metrics"][@checked]')]
        assert checked == ["exact_match", "output_words"]


class TestComparisonPage:
    def test_summary_verdicts_charts_and_links(self, client, store):
        comparison_id = write_finished(store)
        doc = page(client.get(f"/ui/comparisons/{comparison_id}"))
        verdicts = [li.text_content() for li in doc.xpath('//ul[@id="verdicts"]/li')]
        assert len(verdicts) == 1
        # Oriented to the winner: sampled uses 1.75 fewer words, and wins 3 of 4 rows.
        assert "sampled better than greedy on output_words: -1.75 [-3.5, -0.25], p=0.04" in " ".join(
            verdicts[0].split()
        )
        assert "wins/ties/losses 3/0/1 over 4 rows" in verdicts[0]
        charts = {f.get("id"): f for f in doc.xpath('//figure[@class="chart"]')}
        assert set(charts) == {"chart-exact_match", "chart-output_words"}
        best = charts["chart-output_words"].xpath(
            './/div[contains(@class, "best")]//span[@class="bar-label"]'
        )
        assert [b.text_content().split()[0] for b in best] == ["sampled"]
        # exact_match is tied: nothing is marked best.
        assert not charts["chart-exact_match"].xpath('.//div[contains(@class, "best")]')
        hrefs = doc.xpath("//a/@href")
        assert "http://127.0.0.1:5000/#/experiments/7/runs/parent123" in hrefs
        assert f"/ui/comparisons/{comparison_id}/arena" in hrefs
        assert f"/ui/new?from={comparison_id}" in hrefs
        assert not doc.xpath('//form[@id="cancel-form"]')

    def test_grid_shows_every_output_under_its_label(self, client, store):
        comparison_id = write_finished(store)
        doc = page(client.get(f"/ui/comparisons/{comparison_id}"))
        headers = [th.text_content() for th in doc.xpath('//table[@id="grid"]/thead//th')]
        assert headers == ["#", "Input", "Reference", "greedy", "sampled"]
        for index, row in enumerate(ROWS):
            tr = doc.xpath(f'//table[@id="grid"]//tr[@data-row="{index}"]')[0]
            assert tr.xpath('.//td[@class="col-input"]/div')[0].text_content() == row["input"]
            for label in ("greedy", "sampled"):
                cell = tr.xpath(f'.//td[@data-label="{label}"]')[0]
                assert cell.xpath('.//div[@data-role="output"]')[0].text_content() == OUTPUTS[label][index]
        data = json.loads(doc.xpath('//script[@id="grid-data"]')[0].text)
        assert data["metrics"]["output_words"]["greater_is_better"] is False
        assert data["succeeded"] == ["greedy", "sampled"]

    def test_an_endpoint_candidates_failed_rows_and_usage(self, client, store):
        comparison_id = write_finished(store)
        # As the scoring step leaves an endpoint candidate whose row 1 failed after its retries.
        outputs = [{"output": o, "scores": {}} for o in OUTPUTS["sampled"]]
        outputs[1] = {"output": None, "scores": {}, "error": "3 attempts failed, the last with HTTP 503"}
        store.save_outputs(comparison_id, "sampled", outputs)
        store.set_candidate_fields(
            comparison_id,
            "sampled",
            rows_failed=1,
            totals={"input_tokens": 87, "output_tokens": 79, "cost": None},
        )
        store.set_candidate_fields(
            comparison_id, "greedy", totals={"input_tokens": 90, "output_tokens": 80, "cost": 0.162}
        )
        doc = page(client.get(f"/ui/comparisons/{comparison_id}"))
        [failed] = doc.xpath('//p[@data-role="rows-failed"]')
        assert failed.text_content() == "1 row failed at the endpoint (reasons in the table)"
        usage = [" ".join(p.text_content().split()) for p in doc.xpath('//p[@data-role="usage"]')]
        # Tokens are shown without a price table too; cost only where there is one.
        assert usage == ["cost 0.162 · 90 input / 80 output tokens", "87 input / 79 output tokens"]
        cell = doc.xpath('//table[@id="grid"]//tr[@data-row="1"]//td[@data-label="sampled"]')[0]
        error = cell.xpath('.//p[@data-role="row-error"]')[0]
        assert error.text_content() == "no output: 3 attempts failed, the last with HTTP 503"
        assert "warn-text" in error.get("class")

    def test_running_comparison_offers_cancel_and_follows_live(self, client, store):
        created = client.post("/v1/comparisons", json=spec_dict()).json()
        doc = page(client.get(f"/ui/comparisons/{created['id']}"))
        assert doc.xpath('//section[@id="progress"]')[0].get("data-active") == "true"
        assert not doc.xpath('//table[@id="grid"]')
        response = client.post(f"/ui/comparisons/{created['id']}/cancel", follow_redirects=False)
        assert response.status_code == 303
        assert store.status(created["id"]) is ComparisonStatus.cancelled
        # Cancelling again is harmless: the page shows the final state.
        assert client.post(f"/ui/comparisons/{created['id']}/cancel").status_code == 200

    def test_arena_page_waits_for_the_end(self, client, store):
        created = client.post("/v1/comparisons", json=spec_dict()).json()
        doc = page(client.get(f"/ui/comparisons/{created['id']}/arena"))
        assert "opens once the comparison has ended" in doc.text_content()
        finished = write_finished(store)
        doc = page(client.get(f"/ui/comparisons/{finished}/arena"))
        buttons = [b.text_content() for b in doc.xpath('//div[@id="vote-buttons"]/button')]
        assert buttons == ["A is better", "B is better", "Tie", "Both are bad", "Skip"]


class TestEvents:
    def test_stream_ends_with_the_final_state(self, client, store):
        comparison_id = write_finished(store)
        with client.stream("GET", f"/v1/comparisons/{comparison_id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = "".join(response.iter_text())
        assert text.startswith("retry: 2000")
        event, data = text.strip().split("\n")[-2:]
        assert event == "event: end"
        assert json.loads(data.removeprefix("data: "))["status"] == "succeeded"

    def test_unknown_comparison_is_404(self, client):
        assert client.get("/v1/comparisons/nope/events").status_code == 404
