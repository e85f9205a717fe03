"""The web pages in a real browser (Debian's Chromium through Playwright) against the real stack:
Redis, an `mlflow server`, Celery workers running tiny models, the API under uvicorn."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from scripts.stack import Stack
from shared.client import ComparisonClient

pytestmark = pytest.mark.integration

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Name a large planet.", "Jupiter"),
    ("What is two plus two?", "four"),
    ("The sky is", "blue"),
    ("Answer the question with one word.", "word"),
    ("What colour is the grass?", "green"),
]
ROWS = [{"input": q, "reference": r} for q, r in QUESTIONS]
METRICS = ["exact_match", "contains_reference", "output_words", "output_tokens", "latency"]

# Records the candidates panel of the comparison page whenever it changes, across reloads.
RECORD_PROGRESS = """
document.addEventListener("DOMContentLoaded", () => {
  const panel = document.getElementById("progress");
  if (!panel) return;
  const record = () => window.recordProgress({
    status: document.getElementById("status-badge").textContent.trim(),
    note: document.getElementById("live-note").textContent.trim(),
    rows: [...panel.querySelectorAll('[data-role="rows"]')].map((e) => e.textContent.trim()),
    candidates: [...panel.querySelectorAll('[data-role="status"]')].map((e) => e.textContent.trim()),
  });
  record();
  new MutationObserver(record).observe(panel, { subtree: true, childList: true, characterData: true });
});
"""


@pytest.fixture(scope="module")
def context(browser, stack: Stack) -> Iterator[BrowserContext]:
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, base_url=stack.api_url, accept_downloads=True
    )
    yield context
    context.close()


def new_page(context: BrowserContext, problems: list[str]) -> Page:
    page = context.new_page()
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.set_default_timeout(30_000)
    return page


@pytest.fixture(scope="module")
def ui_run(context: BrowserContext, stack: Stack, tiny_models: dict[str, Path]) -> dict[str, Any]:
    """A comparison started from the form as a person would: a mistake first, then fixed."""
    problems: list[str] = []
    states: list[dict[str, Any]] = []
    context.expose_binding("recordProgress", lambda _source, state: states.append(state))
    context.add_init_script(RECORD_PROGRESS)
    page = new_page(context, problems)
    page.goto("/ui/new")
    page.fill("#f-name", "from-the-form")
    page.fill("#f-experiment", "e2e-browser")
    page.fill("#f-candidates-0-label", "causal")
    page.fill("#f-candidates-0-model", str(tiny_models["causal"]))
    page.fill("#f-candidates-0-generation-max_new_tokens", "12")
    page.fill("#f-candidates-1-label", "causal")  # the mistake: a label already used
    page.fill("#f-candidates-1-model", str(tiny_models["seq2seq"]))
    page.fill("#f-candidates-1-prompt_template", "question: {input}")
    page.fill("#f-candidates-1-generation-max_new_tokens", "8")
    page.fill("#f-dataset", "\n".join(json.dumps(row) for row in ROWS))
    for box in page.locator('input[name="metrics"]').all():
        box.uncheck()
    for name in METRICS:
        page.check(f"#f-metric-{name}")
    page.get_by_role("button", name="Start comparison").click()

    error = page.locator("#f-candidates-1-label-error-1")
    expect(error).to_be_visible()
    observed: dict[str, Any] = {
        "error": error.inner_text(),
        "summary_focused": page.evaluate("document.activeElement.id"),
        "label_invalid": page.get_attribute("#f-candidates-1-label", "aria-invalid"),
        "dataset_kept": page.input_value("#f-dataset"),
    }
    page.fill("#f-candidates-1-label", "t5")
    page.get_by_role("button", name="Start comparison").click()
    page.wait_for_url("**/ui/comparisons/*")
    comparison_id = page.url.rsplit("/", 1)[1]
    # The list, opened while the comparison runs, must follow it by itself.
    listing = new_page(context, problems)
    listing.goto("/ui")
    row_badge = listing.locator(f'tr:has(a[href="/ui/comparisons/{comparison_id}"]) td[data-label="Status"]')
    observed["list_first_status"] = row_badge.inner_text()
    # The comparison page reloads itself when the stream says the comparison ended.
    expect(page.locator("#grid")).to_be_visible(timeout=180_000)
    expect(row_badge).to_have_text("succeeded", timeout=30_000)
    observed.update(
        id=comparison_id,
        page=page,
        states=states,
        problems=problems,
        final_badge=page.inner_text("#status-badge"),
    )
    return observed


def results_of(stack: Stack, comparison_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack.api_url}/v1/comparisons/{comparison_id}/results", timeout=10).json()


class TestForm:
    def test_a_validation_error_is_shown_at_its_field(self, ui_run):
        assert ui_run["error"] == "⚠ label 'causal' is already used by candidates[0]; labels must be unique"
        assert ui_run["label_invalid"] == "true"
        assert ui_run["summary_focused"] == "error-summary"
        assert [json.loads(line) for line in ui_run["dataset_kept"].splitlines()] == ROWS

    def test_the_spec_reached_the_service_as_typed(self, ui_run, client: ComparisonClient):
        state = client.get(ui_run["id"])
        assert state["name"] == "from-the-form" and state["experiment"] == "e2e-browser"
        assert [c["label"] for c in state["candidates"]] == ["causal", "t5"]
        assert sorted(state["metrics"]) == sorted(METRICS)
        assert state["status"] == "succeeded"


class TestLiveProgress:
    def test_the_page_followed_the_comparison_to_its_end(self, ui_run):
        states = ui_run["states"]
        assert states, "the candidates panel never rendered"
        assert states[0]["status"] in ("queued", "running")
        assert any(s["note"] == "Updating live…" for s in states)
        # Updates arrived without a reload until the end, then the page reloaded itself.
        assert any(s["status"] == "running" for s in states)
        assert states[-1]["status"] == "succeeded"
        assert states[-1]["rows"] == ["6 / 6 rows", "6 / 6 rows"]
        assert ui_run["final_badge"] == "succeeded"

    def test_the_list_refreshed_itself(self, ui_run):
        assert ui_run["list_first_status"] in ("queued", "running")

    def test_no_script_errors(self, ui_run):
        # The form with its errors comes back as a 422, which the browser logs; nothing else.
        assert ui_run["problems"] == [
            "console: Failed to load resource: "
            "the server responded with a status of 422 (Unprocessable Entity)"
        ]


class TestGrid:
    def test_grid_matches_results_cell_for_cell(self, ui_run, stack):
        page: Page = ui_run["page"]
        results = results_of(stack, ui_run["id"])
        headers = page.locator("#grid thead th").all_inner_texts()
        assert headers == ["#", "Input", "Reference", "causal", "t5"]
        for row in results["rows"]:
            tr = page.locator(f'#grid tr[data-row="{row["index"]}"]')
            assert tr.locator(".col-input .text").text_content() == row["input"]
            assert tr.locator(".col-ref .text").text_content() == row["reference"]
            for label in ("causal", "t5"):
                cell = tr.locator(f'td[data-label="{label}"]')
                out = row["outputs"][label]
                assert cell.locator('[data-role="output"]').text_content() == out["output"]
                shown = {
                    li.get_attribute("data-metric"): li.get_attribute("data-value")
                    for li in cell.locator(".scores li").all()
                }
                assert set(shown) == set(out["scores"])
                for metric, value in out["scores"].items():
                    if value is None:
                        assert shown[metric] is None
                    else:
                        assert float(shown[metric]) == pytest.approx(value, rel=1e-12)

    def test_best_cell_marked_for_the_selected_metric(self, ui_run, stack):
        page: Page = ui_run["page"]
        page.select_option("#g-metric", "output_words")
        results = results_of(stack, ui_run["id"])
        for row in results["rows"]:
            words = {label: row["outputs"][label]["scores"]["output_words"] for label in ("causal", "t5")}
            best = [] if len(set(words.values())) == 1 else [min(words, key=words.__getitem__)]
            marked = page.locator(f'#grid tr[data-row="{row["index"]}"] td.cell.best').all()
            assert [m.get_attribute("data-label") for m in marked] == best

    def test_baseline_deltas_in_green_and_red(self, ui_run, stack):
        page: Page = ui_run["page"]
        page.select_option("#g-baseline", "causal")
        results = results_of(stack, ui_run["id"])
        for row in results["rows"]:
            base = row["outputs"]["causal"]["scores"]["output_words"]
            own = row["outputs"]["t5"]["scores"]["output_words"]
            cell = page.locator(f'#grid tr[data-row="{row["index"]}"] td[data-label="t5"]')
            delta = cell.locator('li[data-metric="output_words"] .delta')
            if own == base:
                expect(delta).to_be_hidden()  # only differences are marked
            else:
                expect(delta).to_be_visible()
                # Fewer words is better: a negative difference is green ("up").
                assert ("up" if own < base else "down") in delta.get_attribute("class")
                assert delta.inner_text() == f"{'+' if own > base else '−'}{abs(own - base):g}"
            differing = sum(
                1
                for name, value in row["outputs"]["t5"]["scores"].items()
                if value is not None and row["outputs"]["causal"]["scores"].get(name) not in (None, value)
            )
            assert cell.locator(".delta:visible").count() == differing
            baseline_cell = page.locator(f'#grid tr[data-row="{row["index"]}"] td[data-label="causal"]')
            assert "baseline" in baseline_cell.get_attribute("class")
            assert baseline_cell.locator(".delta:visible").count() == 0

    def test_word_diff_against_the_baseline_and_the_reference(self, ui_run, stack):
        page: Page = ui_run["page"]
        page.select_option("#g-baseline", "causal")
        results = results_of(stack, ui_run["id"])
        for mode, source in (("baseline", "causal"), ("reference", None)):
            page.select_option("#g-diff", mode)
            for row in results["rows"]:
                against = row["reference"] if source is None else row["outputs"][source]["output"]
                output = row["outputs"]["t5"]["output"]
                box = page.locator(
                    f'#grid tr[data-row="{row["index"]}"] td[data-label="t5"] [data-role="output"]'
                )
                # Reading the diff without deletions gives the output; without insertions, the other text.
                parts = box.evaluate("""el => [...el.childNodes].map(n => [n.nodeName, n.textContent])""")
                assert "".join(t for kind, t in parts if kind != "DEL") == output
                assert "".join(t for kind, t in parts if kind != "INS") == against
                if output != against:
                    assert any(kind in ("INS", "DEL") for kind, _ in parts)
        page.select_option("#g-diff", "")
        first = page.locator('#grid tr[data-row="0"] td[data-label="t5"] [data-role="output"]')
        assert first.evaluate("el => el.children.length") == 0

    def test_search_filter_and_sort(self, ui_run, stack):
        page: Page = ui_run["page"]
        page.select_option("#g-diff", "")
        page.fill("#g-search", "planet")
        expect(page.locator("#grid tbody tr:visible")).to_have_count(1)
        assert page.locator("#grid tbody tr:visible").get_attribute("data-row") == "1"
        page.fill("#g-search", "")
        results = results_of(stack, ui_run["id"])
        page.select_option("#g-show", "disagree-output")
        differ = [
            str(r["index"])
            for r in results["rows"]
            if " ".join(r["outputs"]["causal"]["output"].split())
            != " ".join(r["outputs"]["t5"]["output"].split())
        ]
        visible = [tr.get_attribute("data-row") for tr in page.locator("#grid tbody tr:visible").all()]
        assert visible == differ
        page.select_option("#g-show", "all")
        page.select_option("#g-metric", "output_words")
        page.select_option("#g-sort", "diff")
        page.select_option("#g-sort-a", "causal")
        page.select_option("#g-sort-b", "t5")
        order = [tr.get_attribute("data-row") for tr in page.locator("#grid tbody tr").all()]
        # Where causal beats t5 most (fewer words) comes first.
        advantage = {
            str(r["index"]): r["outputs"]["t5"]["scores"]["output_words"]
            - r["outputs"]["causal"]["scores"]["output_words"]
            for r in results["rows"]
        }
        assert [advantage[i] for i in order] == sorted(advantage.values(), reverse=True)
        page.select_option("#g-sort", "row")
        assert [tr.get_attribute("data-row") for tr in page.locator("#grid tbody tr").all()] == [
            str(i) for i in range(len(ROWS))
        ]


class TestRatings:
    def test_rating_round_trip_and_csv_export(self, ui_run, stack, tmp_path):
        page: Page = ui_run["page"]
        page.fill("#g-rater", "alice")
        page.press("#g-rater", "Tab")
        box = page.locator('#grid td[data-label="t5"] .rating[data-row="2"]')
        up = box.locator('button[data-rating="up"]')
        up.click()
        expect(up).to_have_attribute("aria-pressed", "true")
        expect(up.locator(".count")).to_have_text("1")
        box.locator("button.comment-toggle").click()
        page.keyboard.type("Too short to be useful.")
        box.get_by_role("button", name="Save comment").click()
        expect(box.locator(".comments li")).to_have_text("alice (thumbs up): Too short to be useful.")
        stored = httpx.get(f"{stack.api_url}/v1/comparisons/{ui_run['id']}/ratings").json()["ratings"]
        assert [(r["row"], r["label"], r["rating"], r["comment"], r["rater"]) for r in stored] == [
            (2, "t5", "up", "Too short to be useful.", "alice")
        ]
        # Rendered by the server after a reload, and pressed again for the same rater.
        page.reload()
        box = page.locator('#grid td[data-label="t5"] .rating[data-row="2"]')
        expect(box.locator('button[data-rating="up"] .count')).to_have_text("1")
        expect(box.locator('button[data-rating="up"]')).to_have_attribute("aria-pressed", "true")
        expect(box.locator(".comments li")).to_have_text("alice (thumbs up): Too short to be useful.")

        with page.expect_download() as download:
            page.click("#export-csv")
        path = tmp_path / "export.csv"
        download.value.save_as(path)
        exported = path.read_bytes()
        assert (
            exported == httpx.get(f"{stack.api_url}/v1/comparisons/{ui_run['id']}/results?format=csv").content
        )
        rows = list(csv.DictReader(io.StringIO(exported.decode())))
        assert len(rows) == len(ROWS)
        assert rows[2]["t5/thumbs_up"] == "1" and rows[2]["t5/thumbs_down"] == "0"
        assert rows[2]["t5/comments"] == "alice: Too short to be useful."
        assert rows[0]["t5/thumbs_up"] == "0"
        results = results_of(stack, ui_run["id"])
        assert [r["t5"] for r in rows] == [r["outputs"]["t5"]["output"] for r in results["rows"]]

        with page.expect_download() as download:
            page.click("#export-json")
        exported_json = json.loads(Path(download.value.path()).read_text())
        assert exported_json["rows"][2]["outputs"]["t5"]["ratings"]["up"] == 1


class TestArena:
    def test_blind_votes_move_the_ranking_and_reach_mlflow(self, ui_run, context, stack, mlflow_client):
        page = new_page(context, ui_run["problems"])
        page.goto(f"/ui/comparisons/{ui_run['id']}/arena")
        ranking = page.locator("#ranking-body tr")
        expect(ranking).to_have_count(2)
        assert [r.locator("td").nth(2).inner_text() for r in ranking.all()] == ["1000", "1000"]
        wins = {"causal": 0, "t5": 0}
        for vote in range(6):
            expect(page.get_by_role("button", name="A is better")).to_be_enabled()
            # Labels stay hidden until the vote.
            assert page.locator('[data-role="reveal"]').all_inner_texts() == ["", ""]
            if vote == 4:
                page.get_by_role("button", name="Both are bad").click()
            else:
                page.keyboard.press("a")  # "A is better"
            reveal = page.locator('#answer-a [data-role="reveal"]')
            expect(reveal).not_to_have_text("")
            winner = reveal.inner_text().removeprefix("· ")
            if vote != 4:
                wins[winner] += 1
            expect(page.locator("#ranking-count")).to_have_text(
                f"{vote + 1} vote{'s' if vote else ''} so far."
            )
            page.keyboard.press("n")
        votes = httpx.get(f"{stack.api_url}/v1/comparisons/{ui_run['id']}/votes").json()
        assert len(votes["votes"]) == 6
        assert sum(v["winner"] == "both_bad" for v in votes["votes"]) == 1
        by_label = {r["label"]: r for r in votes["ranking"]}
        assert by_label["causal"]["wins"] == wins["causal"] and by_label["t5"]["wins"] == wins["t5"]
        leader = max(wins, key=wins.__getitem__)
        if wins["causal"] != wins["t5"]:
            assert votes["ranking"][0]["label"] == leader and by_label[leader]["score"] > 1000
        table = [r.locator("td").nth(1).inner_text() for r in page.locator("#ranking-body tr").all()]
        assert table == [r["label"] for r in votes["ranking"]]
        # Every pair and row is covered evenly: six votes over six rows of one pair.
        assert sorted(v["row"] for v in votes["votes"]) == list(range(len(ROWS)))

        links = httpx.get(f"{stack.api_url}/v1/comparisons/{ui_run['id']}").json()["mlflow"]
        parent = links["parent_run_id"]
        deadline = time.monotonic() + 90
        table_rows = 0
        while time.monotonic() < deadline:
            try:
                # What mlflow.load_table("human_votes.json", run_ids=[parent]) reads in the
                # comparison's experiment, without making it this process's active experiment.
                logged = mlflow_client.load_table(
                    links["experiment_id"], "human_votes.json", run_ids=[parent]
                )
                table_rows = len(logged)
            except Exception:  # noqa: BLE001 - not logged yet
                table_rows = 0
            if table_rows == 6:
                break
            time.sleep(0.5)
        assert table_rows == 6
        history = mlflow_client.get_metric_history(parent, f"arena/{leader}/score")
        assert history and math.isclose(history[-1].value, by_label[leader]["score"], rel_tol=1e-9)


class TestLayout:
    @pytest.mark.parametrize("width", [1280, 390])
    def test_every_page_fits_the_screen(self, ui_run, browser, stack, width):
        context = browser.new_context(viewport={"width": width, "height": 800}, base_url=stack.api_url)
        try:
            page = context.new_page()
            for path in (
                "/ui",
                "/ui/new",
                f"/ui/comparisons/{ui_run['id']}",
                f"/ui/comparisons/{ui_run['id']}/arena",
            ):
                page.goto(path)
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, (path, width, overflow)
                unlabelled = page.evaluate(
                    """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                        .filter(el => !el.labels?.length && !el.getAttribute('aria-label'))
                        .filter(el => !el.closest('[aria-hidden=true]'))
                        .map(el => el.id || el.name)"""
                )
                assert unlabelled == [], (path, unlabelled)
        finally:
            context.close()


def test_cancel_from_the_page(context, client: ComparisonClient, tiny_models):
    rows = [{"input": f"Count to {i} and keep going"} for i in range(400)]
    spec = {
        "name": "to-be-cancelled",
        "experiment": "e2e-browser",
        "candidates": [
            {"label": "a", "model": str(tiny_models["causal"]), "generation": {"max_new_tokens": 64}},
            {
                "label": "b",
                "model": str(tiny_models["causal"]),
                "generation": {"max_new_tokens": 64, "seed": 1},
            },
        ],
        "dataset": {"rows": rows},
        "metrics": ["output_words"],
        "cache": False,
    }
    created = client.submit(spec)
    problems: list[str] = []
    page = new_page(context, problems)
    page.goto(f"/ui/comparisons/{created['id']}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status-badge")).to_have_text("cancelled", timeout=30_000)
    assert client.get(created["id"])["status"] == "cancelled"
    final = client.wait(created["id"], timeout=120, poll_s=0.5)
    assert final["status"] == "cancelled"
    assert problems == []
