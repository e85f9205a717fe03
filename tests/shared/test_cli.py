"""The ``llm-compare`` command against the real API over HTTP (uvicorn, real Redis).

No worker consumes the ``api_only`` queue, so ``FakeWorker`` plays its part: it waits for the
comparison the command submits, then writes progress, outputs, metrics and final states into
Redis through ``ComparisonStore``, as a worker does, while ``run --wait`` is watching.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner, Result

from scripts.stack import Stack, free_port
from shared import cli
from shared.client import ApiError, ComparisonClient, parse_sse
from shared.schemas import CandidateState, ComparisonStatus
from shared.store import ComparisonStore, utcnow

ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris"},
    {"input": "What is 2 + 2?", "reference": "4"},
    {"input": "Name the largest planet.", "reference": "Jupiter"},
]
LONG_OUTPUT = (
    "Jupiter is the largest planet in the Solar System, more than twice as massive as all the "
    "other planets combined, and it is mostly hydrogen and helium"
)
OUTPUTS = {"a": ["Paris", "4", LONG_OUTPUT], "b": ["Lyon", "5", "Saturn"]}


def aggregate(mean: float, ci_low: float, ci_high: float, method: str) -> dict[str, Any]:
    return {
        "n": 3,
        "mean": mean,
        "std": 0.5,
        "stderr": 0.3,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "ci_method": method,
    }


AGGREGATES = {
    "a": {
        "exact_match": aggregate(2 / 3, 0.208, 0.939, "wilson"),
        "output_tokens": aggregate(10.0, 1.0, 24.5, "bootstrap"),
    },
    "b": {
        "exact_match": aggregate(0.0, 0.0, 0.561, "wilson"),
        "output_tokens": aggregate(1.0, 1.0, 1.0, "bootstrap"),
    },
}
DECIDED = "a better on exact_match: +0.667 [+0.333, +1] (a − b, p=0.031, n=3)"
UNDECIDED = "no significant difference on output_tokens: +9 [-2, +20] (a − b, p=0.25, n=3)"


def pair(metric: str, better: str | None, verdict: str) -> dict[str, Any]:
    return {
        "metric": metric,
        "a": "a",
        "b": "b",
        "n": 3,
        "mean_a": 0.667,
        "mean_b": 0.0,
        "mean_diff": 0.667,
        "ci_low": 0.333,
        "ci_high": 1.0,
        "p_value": 0.031,
        "wins": 2,
        "ties": 1,
        "losses": 0,
        "better": better,
        "verdict": verdict,
    }


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "cli-test",
        "experiment": "cli-tests",
        "candidates": [
            {"label": "a", "model": "smollm2-135m-instruct"},
            {"label": "b", "model": "smollm2-135m-instruct", "generation": {"do_sample": True}},
        ],
        "dataset": {"rows": ROWS},
        "metrics": ["output_tokens", "exact_match"],
    }
    body.update(overrides)
    return body


# ---------------------------------------------------------------- the worker's part


Script = Callable[[ComparisonStore, str], None]


class FakeWorker:
    """Finds the comparison submitted after it was created and runs ``script`` on it."""

    def __init__(self, store: ComparisonStore, script: Script):
        self.store = store
        self.script = script
        self.known = set(store.list_ids(status=None, limit=100_000, offset=0)[0])
        self.comparison_id: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 30
            while self.comparison_id is None:
                assert time.monotonic() < deadline, "the command submitted no comparison"
                ids, _ = self.store.list_ids(status=None, limit=20, offset=0)
                new = [i for i in ids if i not in self.known]
                if new:
                    self.comparison_id = new[0]
                else:
                    time.sleep(0.05)
            self.script(self.store, self.comparison_id)
        except BaseException as exc:  # re-raised in the test's thread by __exit__
            self.error = exc


def start_running(store: ComparisonStore, cid: str, labels: list[str]) -> None:
    store.set_fields(cid, experiment_id="7", parent_run_id="parent1", started_at=utcnow())
    assert store.transition(cid, ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
    for label in labels:
        store.transition_candidate(cid, label, CandidateState.running, allowed_from=[CandidateState.queued])


def succeed(outputs: dict[str, list[str]] = OUTPUTS, *, step_s: float = 0.7) -> Script:
    """Progress one row at a time (slower than the stream's 0.5 s poll), then success."""

    def script(store: ComparisonStore, cid: str) -> None:
        labels = list(outputs)
        rows = store.rows(cid)
        start_running(store, cid, labels)
        for done in range(1, len(rows) + 1):
            for label in labels:
                store.set_progress(
                    cid,
                    label,
                    done=done,
                    total=len(rows),
                    tokens_per_second=123.4,
                    eta_s=(len(rows) - done) * 5,
                )
            time.sleep(step_s)
        for label in labels:
            scored = [
                {
                    "output": output,
                    "scores": {"exact_match": float(output == row["reference"]), "output_tokens": 1.0},
                }
                for output, row in zip(outputs[label], rows, strict=True)
            ]
            store.save_outputs(cid, label, scored)
            aggregates = AGGREGATES.get(label, {})
            store.set_candidate_fields(
                cid,
                label,
                metrics={k: float(v["mean"]) for k, v in aggregates.items()},
                aggregates=aggregates,
            )
            store.transition_candidate(
                cid, label, CandidateState.succeeded, allowed_from=[CandidateState.running]
            )
        store.set_fields(
            cid,
            pairwise=json.dumps([pair("exact_match", "a", DECIDED), pair("output_tokens", None, UNDECIDED)]),
        )
        store.transition(cid, ComparisonStatus.succeeded, allowed_from=[ComparisonStatus.running])

    return script


def end_badly(status: ComparisonStatus) -> Script:
    def script(store: ComparisonStore, cid: str) -> None:
        start_running(store, cid, ["a", "b"])
        time.sleep(0.6)
        store.transition_candidate(
            cid,
            "a",
            CandidateState.failed,
            allowed_from=[CandidateState.running],
            error="out of memory while loading the model",
        )
        if status is ComparisonStatus.partially_failed:
            store.save_outputs(cid, "b", [{"output": o, "scores": {}} for o in OUTPUTS["b"]])
            store.set_progress(cid, "b", done=3, total=3)
            end = CandidateState.succeeded
        else:
            end = CandidateState.failed
        store.transition_candidate(cid, "b", end, allowed_from=[CandidateState.running])
        store.transition(cid, status, allowed_from=[ComparisonStatus.running])

    return script


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def store(api_only: Stack, redis_client) -> ComparisonStore:
    return ComparisonStore(redis_client, prefix=api_only.key_prefix)


@pytest.fixture
def invoke(api_only: Stack) -> Callable[..., Result]:
    # An 80-column terminal that is not a terminal: no colours, as in a pipe.
    runner = CliRunner(env={"COLUMNS": "80", "LLM_COMPARE_URL": None, "FORCE_COLOR": None, "NO_COLOR": None})

    def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
        return runner.invoke(cli.app, ["--url", api_only.api_url, *args], env=env)

    return run


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(spec(), indent=2))
    return path


@pytest.fixture
def seen_states(monkeypatch) -> list[dict[str, Any]]:
    """Every state the progress bars were drawn from."""
    seen: list[dict[str, Any]] = []
    original = cli.CandidateBars.update

    def update(self: cli.CandidateBars, state: dict[str, Any]) -> None:
        seen.append(state)
        original(self, state)

    monkeypatch.setattr(cli.CandidateBars, "update", update)
    return seen


def unwrap(text: str) -> str:
    """Table text with borders and line breaks collapsed to single spaces, to find wrapped cells."""
    for border in "│┃|":
        text = text.replace(border, " ")
    return " ".join(text.split())


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the boxed tables in ``text``, each cell's wrapped lines joined."""
    rows: list[list[str]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("│"):
            parts = [p.strip() for p in line.strip().strip("│").split("│")]
            current = current or [[] for _ in parts]
            for cell, part in zip(current, parts, strict=True):
                if part:
                    cell.append(part)
        elif line.startswith(("├", "└")) and current:
            rows.append([" ".join(cell) for cell in current])
            current = []
    return rows


def submit(api_client: ComparisonClient, **overrides: Any) -> str:
    return api_client.submit(spec(**overrides))["id"]


def finish(store: ComparisonStore, cid: str) -> None:
    """Run the successful worker script on a comparison submitted through the client."""
    succeed(step_s=0)(store, cid)


# ---------------------------------------------------------------- run


class TestRunWait:
    def test_json_spec_shows_live_progress_then_the_table_metrics_and_verdict(
        self, invoke, store, spec_file, seen_states
    ):
        with FakeWorker(store, succeed()) as worker:
            result = invoke("run", str(spec_file), "--wait")
        cid = worker.comparison_id
        assert result.exit_code == 0, result.output
        out = result.stdout

        # Live: the bars were drawn from intermediate states while it ran, not only the end.
        partial = [
            s
            for s in seen_states
            if s["status"] == "running" and 0 < s["candidates"][0]["progress"]["done"] < 3
        ]
        assert partial, [s["status"] for s in seen_states]
        assert seen_states[-1]["status"] == "succeeded"
        assert "Waiting for cli-test" in out
        assert "3/3" in out and "succeeded" in out

        # The side-by-side table: every output, wrapped rather than cut, with the per-row score.
        assert max(len(line) for line in out.splitlines()) <= 80
        assert "Outputs, 3 rows (per-row exact_match)" in out
        assert table_rows(out)[:3] == [
            ["0", ROWS[0]["input"], "Paris", "Paris exact_match 1", "Lyon exact_match 0"],
            ["1", ROWS[1]["input"], "4", "4 exact_match 1", "5 exact_match 0"],
            ["2", ROWS[2]["input"], "Jupiter", f"{LONG_OUTPUT} exact_match 0", "Saturn exact_match 0"],
        ]
        assert "…" not in out
        flat = unwrap(out)

        # Metrics as mean [interval], the decided verdict only, the links.
        assert "0.667 [0.208, 0.939]" in flat
        assert "0 [0, 0.561]" in flat
        assert "10 [1, 24.5]" in flat
        assert DECIDED in flat
        assert UNDECIDED not in flat
        assert f"/ui/comparisons/{cid}" in out
        assert "MLflow" in out and "#/experiments/7/runs/parent1" in out

    def test_yaml_spec_with_csv_data(self, invoke, store, tmp_path, api_client):
        body = spec(tags={"day": "ignored"})
        del body["dataset"]
        # An unquoted date in YAML is a date object; it must reach the API as text.
        text = yaml.safe_dump(body, sort_keys=False).replace("day: ignored", "day: 2024-05-01")
        spec_path = tmp_path / "comparison.yaml"
        spec_path.write_text(text)
        data_path = tmp_path / "rows.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["input", "reference"])
        writer.writeheader()
        writer.writerows(ROWS)
        data_path.write_text(buffer.getvalue())

        with FakeWorker(store, succeed(step_s=0.3)) as worker:
            result = invoke("run", str(spec_path), "--data", str(data_path), "--wait")
        assert result.exit_code == 0, result.output
        rows = table_rows(result.stdout)
        assert [row[1] for row in rows[:3]] == [r["input"] for r in ROWS]
        assert rows[2][3:] == [f"{LONG_OUTPUT} exact_match 0", "Saturn exact_match 0"]
        assert DECIDED in unwrap(result.stdout)
        state = api_client.get(worker.comparison_id)
        assert state["tags"] == {"day": "2024-05-01"}
        assert state["rows"] == 3

    @pytest.mark.parametrize("status", [ComparisonStatus.failed, ComparisonStatus.partially_failed])
    def test_a_comparison_that_did_not_succeed_exits_1(self, invoke, store, spec_file, status):
        with FakeWorker(store, end_badly(status)):
            result = invoke("run", str(spec_file), "--wait")
        assert result.exit_code == 1, result.output
        flat = unwrap(result.stdout)
        assert f"Status {status.value}" in flat
        assert "a failed: out of memory while loading the model" in flat
        assert "No paired verdicts" in flat
        if status is ComparisonStatus.failed:
            assert "No candidate produced outputs." in flat
        else:
            assert [row[3:] for row in table_rows(result.stdout)] == [["—", o] for o in OUTPUTS["b"]]

    def test_json_output_is_the_final_state(self, invoke, store, spec_file):
        with FakeWorker(store, succeed(step_s=0.2)) as worker:
            result = invoke("--json", "run", str(spec_file), "--wait")
        assert result.exit_code == 0, result.output
        final = json.loads(result.stdout)
        assert final["id"] == worker.comparison_id
        assert final["status"] == "succeeded"
        assert final["candidates"][0]["aggregates"]["exact_match"]["n"] == 3

    def test_falls_back_to_polling_when_the_stream_fails(self, invoke, store, spec_file, monkeypatch):
        def broken(self, comparison_id, **kwargs):
            raise httpx.ReadError("connection reset")
            yield  # a generator, like the real one

        monkeypatch.setattr(ComparisonClient, "events", broken)
        with FakeWorker(store, succeed(step_s=0.2)):
            result = invoke("run", str(spec_file), "--wait")
        assert result.exit_code == 0, result.output
        assert "Live updates stopped (connection reset); polling every second." in unwrap(result.stdout)
        assert DECIDED in unwrap(result.stdout)

    def test_timeout_stops_waiting_and_leaves_it_queued(self, invoke, spec_file, api_client):
        started = time.monotonic()
        result = invoke("run", str(spec_file), "--wait", "--timeout", "1.5")
        assert time.monotonic() - started < 10
        assert result.exit_code == 1, result.output
        assert "Stopped waiting after 1.5 s" in unwrap(result.stderr)
        cid = unwrap(result.stderr).split("comparison ")[1].split(" ")[0]
        assert api_client.get(cid)["status"] == "queued"


class TestRunSubmit:
    def test_without_wait_prints_the_id_and_urls(self, invoke, spec_file, api_only, api_client):
        result = invoke("run", str(spec_file))
        assert result.exit_code == 0, result.output
        page = api_client.list(limit=1)
        cid = page["items"][0]["id"]
        assert f"id        {cid}" in result.stdout
        assert f"{api_only.api_url}/ui/comparisons/{cid}" in result.stdout
        assert f"{api_only.api_url}/v1/comparisons/{cid}" in result.stdout
        assert f"llm-compare --url {api_only.api_url} show {cid}" in result.stdout
        assert "Submitted cli-test (2 candidates × 3 rows), queued" in result.stdout

    def test_json_without_wait_is_the_created_comparison(self, invoke, spec_file, api_client):
        result = invoke("--json", "run", str(spec_file))
        assert result.exit_code == 0, result.output
        created = json.loads(result.stdout)
        assert created["status"] == "queued"
        assert api_client.get(created["id"])["name"] == "cli-test"


class TestRunRefused:
    def refused_spec(self, tmp_path: Path) -> Path:
        body = spec()
        body["candidates"][1]["label"] = "bad label"
        body["candidates"][0]["prompt_template"] = "Q: {question}"
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(body))
        return path

    def test_every_field_error_is_printed_in_red_and_exit_2(self, invoke, tmp_path):
        result = invoke("run", str(self.refused_spec(tmp_path)), env={"FORCE_COLOR": "1"})
        assert result.exit_code == 2, result.output
        # Rich's red (forced here as on a terminal) starts each field's line.
        lines = [line for line in result.stderr.splitlines() if line.startswith("  \x1b[31mcandidates[")]
        assert len(lines) == 2, result.stderr
        assert "candidates[0].prompt_template: prompt_template must contain the placeholder" in lines[0]
        assert "candidates[1].label: String should match pattern" in lines[1]
        assert "The API refused the comparison (HTTP 422); nothing was queued:" in result.stderr

    def test_json_refusal_is_the_api_error_body(self, invoke, tmp_path):
        result = invoke("--json", "run", str(self.refused_spec(tmp_path)))
        assert result.exit_code == 2
        body = json.loads(result.stdout)
        assert body["error"] == "invalid_request"
        assert {f["field"] for f in body["fields"]} == {
            "candidates[1].label",
            "candidates[0].prompt_template",
        }

    def test_refused_data_file(self, invoke, tmp_path):
        body = spec()
        del body["dataset"]
        (tmp_path / "s.json").write_text(json.dumps(body))
        (tmp_path / "rows.csv").write_text("question,answer\nq,a\n")
        result = invoke("run", str(tmp_path / "s.json"), "--data", str(tmp_path / "rows.csv"))
        assert result.exit_code == 2
        assert "file: the CSV needs a header row with an 'input' column" in unwrap(result.stderr)


class TestUnreadableSpec:
    @pytest.mark.parametrize(
        ("name", "content", "expected"),
        [
            ("missing.json", None, "Cannot read the spec file {path}: No such file or directory"),
            ("bad.json", '{\n  "name": "x",\n  "candidates": [\n}\n', "{path} line 4, column 1:"),
            ("bad.yaml", "name: x\ncandidates:\n  - label: a\n   model: b\n", "{path} line 4, column"),
            ("list.yml", "- a\n- b\n", "{path}: the spec must be a mapping"),
            ("spec.txt", "{}", "{path}: the spec must be a .json, .yaml or .yml file"),
        ],
    )
    def test_exit_2_saying_what_and_where(self, invoke, tmp_path, name, content, expected):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        result = invoke("run", str(path))
        assert result.exit_code == 2, result.output
        assert expected.format(path=path) in unwrap(result.stderr)

    def test_dataset_in_both_places(self, invoke, spec_file, tmp_path):
        (tmp_path / "rows.jsonl").write_text('{"input": "x"}\n')
        result = invoke("run", str(spec_file), "--data", str(tmp_path / "rows.jsonl"))
        assert result.exit_code == 2
        assert "'dataset'" in result.stderr and "--data" in result.stderr

    def test_json_mode_reports_it_as_json(self, invoke, tmp_path):
        result = invoke("--json", "run", str(tmp_path / "nope.yaml"))
        assert result.exit_code == 2
        assert json.loads(result.stdout)["error"] == "invalid_spec_file"


class TestUnreachable:
    @pytest.mark.parametrize("args", [["ls"], ["models"], ["run", "SPEC"]])
    def test_exit_3_with_the_url_and_how_to_start_it(self, spec_file, args):
        url = f"http://127.0.0.1:{free_port()}"
        argv = ["--url", url, *[str(spec_file) if a == "SPEC" else a for a in args]]
        result = CliRunner(env={"COLUMNS": "80"}).invoke(cli.app, argv)
        assert result.exit_code == 3, result.output
        flat = unwrap(result.stderr)
        assert f"Cannot reach the llm-compare API at {url}" in flat
        assert "make dev" in flat

    def test_url_from_the_environment(self):
        url = f"http://127.0.0.1:{free_port()}"
        result = CliRunner(env={"LLM_COMPARE_URL": url}).invoke(cli.app, ["--json", "ls"])
        assert result.exit_code == 3
        body = json.loads(result.stdout)
        assert body["error"] == "unreachable" and url in body["message"]


class TestCtrlC:
    def test_leaves_the_comparison_running_and_says_how_to_follow_it(self, api_only, spec_file, api_client):
        script = Path(sys.executable).with_name("llm-compare")
        if not script.exists():
            pytest.fail('The console script is missing: pip install -e ".[api,worker,dev]"')
        proc = subprocess.Popen(
            [str(script), "--url", api_only.api_url, "run", str(spec_file), "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert "Waiting for cli-test" in first
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, stderr
        cid = first.split("(")[1].split(")")[0]
        assert f"Stopped waiting; comparison {cid} keeps running." in stderr
        assert f"llm-compare --url {api_only.api_url} show {cid}" in stderr
        assert api_client.get(cid)["status"] == "queued"


# ---------------------------------------------------------------- ls, show, results, cancel


class TestList:
    def test_newest_first_with_progress_per_candidate(self, invoke, api_client, store):
        older = submit(api_client, name="older-one")
        newer = submit(api_client, name="newer-one")
        store.set_progress(newer, "a", done=2, total=3)
        result = invoke("ls", "--limit", "2")
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert max(len(line) for line in out.splitlines()) <= 80
        assert out.index(newer) < out.index(older)  # full ids, newest first
        lines = out.splitlines()
        assert lines[0].split() == ["name", "/", "id", "status", "done/total", "created", "/", "finished"]
        # Two lines per comparison: name, status, first candidate; id, second candidate.
        at = next(i for i, line in enumerate(lines) if line.startswith(newer))
        assert lines[at - 1].split()[:4] == ["newer-one", "queued", "a", "2/3"]
        assert lines[at].split()[:3] == [newer, "b", "0/3"]
        assert lines[at].split()[3] == "—"  # not finished
        assert "2 of " in lines[-1] and "--limit" in lines[-1]

    def test_status_filter_and_json(self, invoke, api_client, store):
        cid = submit(api_client)
        finish(store, cid)
        result = invoke("--json", "ls", "--status", "succeeded", "--limit", "200")
        assert result.exit_code == 0
        page = json.loads(result.stdout)
        assert cid in [i["id"] for i in page["items"]]
        assert {i["status"] for i in page["items"]} == {"succeeded"}
        table = invoke("ls", "--status", "succeeded", "--limit", "200").stdout
        assert cid in table and "queued" not in table

    def test_unknown_status_is_a_usage_error(self, invoke):
        result = invoke("ls", "--status", "sleeping")
        assert result.exit_code == 2


class TestShow:
    def test_a_finished_comparison(self, invoke, api_client, store, api_only):
        cid = submit(api_client)
        finish(store, cid)
        result = invoke("show", cid)
        assert result.exit_code == 0, result.output
        flat = unwrap(result.stdout)
        assert f"comparison cli-test {cid}" in flat
        assert "status succeeded" in flat
        assert "a smollm2-135m-instruct succeeded 3/3 123 tok/s" in flat
        assert "exact_match ↑ wilson 0.667 [0.208, 0.939] 0 [0, 0.561]" in flat
        assert "output_tokens ↓ bootstrap 10 [1, 24.5] 1 [1, 1]" in flat
        assert DECIDED in flat
        assert f"{api_only.api_url}/ui/comparisons/{cid}" in result.stdout

    def test_a_running_comparison_shows_progress_and_eta(self, invoke, api_client, store):
        cid = submit(api_client)
        start_running(store, cid, ["a", "b"])
        store.set_progress(cid, "a", done=1, total=3, tokens_per_second=50.0, eta_s=75)
        flat = unwrap(invoke("show", cid).stdout)
        assert "a smollm2-135m-instruct running 1/3 50 tok/s ETA 1:15" in flat
        assert "Paired verdicts come when every candidate has finished." in flat

    def test_undecided_verdicts_are_said_so(self, invoke, api_client, store):
        cid = submit(api_client)
        finish(store, cid)
        store.set_fields(cid, pairwise=json.dumps([pair("output_tokens", None, UNDECIDED)]))
        flat = unwrap(invoke("show", cid).stdout)
        assert "No paired verdict: no metric separates the candidates beyond noise" in flat
        assert UNDECIDED not in flat

    def test_judge_ranking(self, invoke, api_client, store):
        cid = submit(api_client)
        finish(store, cid)
        ranking = {
            "judge": "tiny-judge",
            "verdicts": 12,
            "ranking": [
                {"label": "b", "rank": 1, "strength": 1.5, "wins": 8, "ties": 1, "losses": 3},
                {"label": "a", "rank": 2, "strength": 0.67, "wins": 3, "ties": 1, "losses": 8},
            ],
        }
        store.set_fields(cid, judge_ranking=json.dumps(ranking))
        flat = unwrap(invoke("show", cid).stdout)
        assert "Judge ranking (Bradley-Terry over 12 verdicts by tiny-judge)" in flat
        assert "1 b 1.50 8 / 1 / 3" in flat and "2 a 0.67 3 / 1 / 8" in flat

    def test_json_is_the_api_state(self, invoke, api_client):
        cid = submit(api_client)
        result = invoke("--json", "show", cid)
        assert result.exit_code == 0
        assert json.loads(result.stdout) == api_client.get(cid)

    def test_unknown_id_exits_1(self, invoke):
        result = invoke("show", "nope")
        assert result.exit_code == 1
        assert "No comparison with id 'nope'" in result.stderr


class TestResults:
    def test_formats(self, invoke, api_client, store, api_only):
        cid = submit(api_client)
        finish(store, cid)

        csv_out = invoke("results", cid, "--format", "csv")
        assert csv_out.exit_code == 0
        assert csv_out.stdout_bytes == api_client.results_csv(cid).encode()
        table = list(csv.reader(io.StringIO(csv_out.stdout)))
        assert table[0][:3] == ["index", "input", "reference"]
        assert table[1][1:3] == [ROWS[0]["input"], ROWS[0]["reference"]]
        assert table[3][table[0].index("a")] == LONG_OUTPUT

        json_out = invoke("results", cid, "--format", "json")
        assert json.loads(json_out.stdout) == api_client.results(cid)
        assert json.loads(invoke("--json", "results", cid).stdout) == api_client.results(cid)

        text = invoke("results", cid)
        assert text.exit_code == 0
        assert "# ┃ input ┃ reference ┃ a " in " ".join(text.stdout.split())
        rows = table_rows(text.stdout)
        assert rows[0] == ["0", ROWS[0]["input"], "Paris", "Paris exact_match 1", "Lyon exact_match 0"]
        assert rows[2][3] == f"{LONG_OUTPUT} exact_match 0"

    def test_a_queued_comparison_has_no_outputs_yet(self, invoke, api_client):
        cid = submit(api_client)
        rows = table_rows(invoke("results", cid).stdout)
        assert rows[0] == ["0", ROWS[0]["input"], "Paris", "—", "—"]


class TestCancel:
    def test_cancel_then_409(self, invoke, api_client):
        cid = submit(api_client)
        first = invoke("cancel", cid)
        assert first.exit_code == 0, first.output
        assert f"Cancelled cli-test ({cid}): cancelled" in unwrap(first.stdout)
        assert api_client.get(cid)["status"] == "cancelled"
        again = invoke("cancel", cid)
        assert again.exit_code == 1
        assert "has already ended (cancelled); nothing to cancel" in unwrap(again.stderr)
        assert json.loads(invoke("--json", "cancel", cid).stdout)["error"] == "conflict"


class TestCatalog:
    def test_models(self, invoke, api_only):
        catalog = httpx.get(f"{api_only.api_url}/v1/models").json()
        result = invoke("models")
        assert result.exit_code == 0
        assert result.stdout.splitlines()[0].split() == ["name", "offline", "description", "(source)"]
        for model in catalog:
            line = next(line for line in result.stdout.splitlines() if line.startswith(model["name"] + " "))
            assert ("yes" if model["available_offline"] else "no") in line
        assert json.loads(invoke("--json", "models").stdout) == catalog

    def test_metrics(self, invoke, api_only):
        catalog = httpx.get(f"{api_only.api_url}/v1/metrics").json()
        result = invoke("metrics")
        assert result.exit_code == 0
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["name", "dir", "needs", "description"]
        rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line[:1].strip()}
        for metric in catalog:
            cells = rows[metric["name"]]
            assert cells[0] == ("↑" if metric["greater_is_better"] else "↓")
            if metric["needs_reference"]:
                assert cells[1] == "reference"
        assert rows["regex_match"][1:3] == ["regex", "field"]
        assert "judge" in unwrap(result.stdout.split("judge_helpfulness")[1])[:30]
        assert json.loads(invoke("--json", "metrics").stdout) == catalog


# ---------------------------------------------------------------- the client


class TestClientEvents:
    def test_parse_sse(self):
        lines = [
            "retry: 2000",
            "",
            "event: comparison",
            'data: {"a":',
            "data: 1}",
            "",
            ": keep-alive",
            "",
            "data:plain",
            "",
            "event: end",
            "data: {}",
            "",
        ]
        assert list(parse_sse(lines)) == [("comparison", '{"a":\n1}'), ("message", "plain"), ("end", "{}")]

    def test_stream_carries_each_change_then_end(self, api_client, store):
        cid = submit(api_client)
        events = []
        worker = threading.Thread(target=succeed(step_s=0.7), args=(store, cid), daemon=True)
        for event, data in api_client.events(cid):
            events.append((event, json.loads(data)))
            if not worker.is_alive() and len(events) == 1:
                worker.start()  # once the stream has sent the queued state
        worker.join(timeout=30)
        names = [e for e, _ in events]
        assert names[-1] == "end" and set(names[:-1]) == {"comparison"}
        done = [s["candidates"][0]["progress"]["done"] for _, s in events]
        assert done[0] == 0 and done[-1] == 3
        assert any(0 < d < 3 for d in done)
        assert events[-1][1]["status"] == "succeeded"

    def test_unknown_id_raises_api_error(self, api_client):
        with pytest.raises(ApiError) as caught:
            list(api_client.events("nope"))
        assert caught.value.status_code == 404

    def test_models_and_metrics(self, api_client):
        assert "smollm2-135m-instruct" in [m["name"] for m in api_client.models()]
        assert "exact_match" in [m["name"] for m in api_client.metrics()]


class TestFailedRows:
    """An endpoint candidate's rows that failed after their retries: counted per candidate and
    shown with their reason in the outputs table."""

    @staticmethod
    def rendered(table: Any) -> str:
        console = Console(width=160, record=True, color_system=None)
        console.print(table)
        return console.export_text()

    def test_the_candidates_table_counts_them(self):
        candidate = {
            "label": "served",
            "model": "endpoint:vllm/m",
            "status": "succeeded",
            "rows_failed": 2,
            "progress": {"done": 40, "total": 40, "tokens_per_second": 310.0},
        }
        text = self.rendered(
            cli.candidates_table({"candidates": [candidate, {**candidate, "label": "ok", "rows_failed": 0}]})
        )
        served, ok = (line for line in text.splitlines() if "served" in line or "│ ok" in line)
        assert "40/40" in served and "40/40" in ok
        assert text.count("2 failed") == 1

    def test_the_outputs_table_gives_the_reason(self):
        row = {
            "index": 3,
            "input": "q",
            "outputs": {
                "served": {"output": None, "error": "HTTP 503 after 6 attempts", "scores": {}},
                "local": {"output": "Paris", "scores": {"exact_match": 1.0}},
            },
        }
        text = self.rendered(
            cli.results_table({"candidates": ["served", "local"], "rows": [row]}, score_metric="exact_match")
        )
        assert "no output: HTTP 503 after 6 attempts" in text and "exact_match 1" in text
