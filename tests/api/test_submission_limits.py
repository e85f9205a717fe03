"""Submit-time limits and parser errors, in-process: FastAPI's TestClient against real Redis.

Each behaviour here was a way to make the gateway (or, later, a worker) spend memory or CPU
without bound, answer 500, or leak internal error text. tests/api/test_hostile_input.py sends
the same kinds of requests over real HTTP; this module checks the logic and the messages.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scripts.stack import free_port
from services.api.errors import InvalidComparison
from services.api.main import create_app
from services.api.service import results_csv
from services.api.uploads import parse_dataset_file
from shared.schemas import ComparisonResults
from shared.settings import Settings
from tests.fixtures.hostile import spec, with_candidate, with_generation, with_row

SUBMIT = "/v1/comparisons"


@pytest.fixture
def settings(redis_url, redis_prefix) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=redis_prefix,
        queue_name=redis_prefix,
        auth_disabled=True,
        mlflow_tracking_uri="http://127.0.0.1:9",
        max_body_bytes=8 * 1024 * 1024,
        max_rows=100,
        max_prompt_chars=2000,
        max_cell_chars=1500,
        max_columns=6,
    )


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def problems(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error", "message", "fields"}, body
    return {f["field"]: f["message"] for f in body["fields"]}


def submit_file(client: TestClient, filename: str, content: bytes) -> Any:
    data = spec()
    del data["dataset"]
    return client.post(SUBMIT, data={"spec": json.dumps(data)}, files={"file": (filename, content)})


class TestTextFieldsAreBounded:
    def test_a_long_system_prompt_is_refused_by_name(self, client, redis_client, settings):
        response = client.post(SUBMIT, json=with_candidate(system_prompt="x" * 3_000_000))
        assert response.status_code == 422
        message = problems(response)["candidates[0].system_prompt"]
        assert "at most 2000 characters" in message and "MAX_PROMPT_CHARS" in message
        assert redis_client.llen(settings.queue_name) == 0

    def test_a_long_template_is_refused_by_name(self, client):
        response = client.post(SUBMIT, json=with_candidate(prompt_template="{input}" + "t" * 2000))
        assert response.status_code == 422
        assert "MAX_PROMPT_CHARS" in problems(response)["candidates[0].prompt_template"]

    @pytest.mark.parametrize("column", ["input", "reference", "notes"])
    def test_every_cell_is_bounded(self, client, column):
        response = client.post(SUBMIT, json=with_row(**{column: "c" * 1501}))
        assert response.status_code == 422
        assert problems(response)[f"dataset.rows[0].{column}"] == (
            "at most 1500 characters (setting MAX_CELL_CHARS; got 1501)"
        )

    def test_the_number_of_columns_is_bounded(self, client):
        response = client.post(SUBMIT, json=with_row(**{f"c{i}": i for i in range(6)}))
        assert response.status_code == 422
        assert problems(response)["dataset.rows[0]"] == "7 columns; at most 6 (setting MAX_COLUMNS)"

    def test_the_rendered_prompt_is_bounded(self, client):
        # Each part is within its own limit; rendered together they are not.
        candidate = {"prompt_template": "{context}\n{input}", "system_prompt": "s" * 600}
        rows = [{"input": "q", "context": "c"}, {"input": "i" * 700, "context": "c" * 701}]
        data = with_candidate(**candidate)
        data["dataset"] = {"rows": rows}
        response = client.post(SUBMIT, json=data)
        assert response.status_code == 422
        message = problems(response)["dataset.rows[1]"]
        assert "candidates[0].prompt_template and system_prompt" in message
        assert "2002 characters" in message and "at most 2000 (setting MAX_PROMPT_CHARS)" in message

    def test_doubled_braces_count_as_rendered(self, client):
        # "{{" renders as one brace: 2000 characters rendered, within the limit.
        data = with_candidate(prompt_template="{{}}" * 250 + "{input}")
        data["dataset"] = {"rows": [{"input": "i" * 1500}]}
        response = client.post(SUBMIT, json=data)
        assert response.status_code == 202, response.text

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            ({"name": "n" * 201}, "name"),
            ({"judge_rubric": "j" * 4001}, "judge_rubric"),
            ({"metrics": [f"m{i}" for i in range(65)]}, "metrics"),
            ({"metrics": ["m" * 101]}, "metrics[0]"),
        ],
    )
    def test_request_fields_are_bounded(self, client, overrides, field):
        response = client.post(SUBMIT, json=spec(**overrides))
        assert response.status_code == 422
        assert field in problems(response)

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"model": "m" * 1001}, "candidates[0].model"),
            ({"revision": "r" * 257}, "candidates[0].revision"),
            ({"generation": {"stop": ["s" * 101]}}, "candidates[0].generation.stop[0]"),
        ],
    )
    def test_candidate_fields_are_bounded(self, client, fields, field):
        response = client.post(SUBMIT, json=with_candidate(**fields))
        assert response.status_code == 422
        assert field in problems(response)

    @pytest.mark.parametrize("text", ["a\u0000b", "a\ud800b"])
    def test_text_that_cannot_be_stored_is_refused(self, client, text):
        body = json.dumps(with_row(notes=text, reference="ok"), ensure_ascii=True)
        response = client.post(SUBMIT, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert "dataset.rows[0].notes" in problems(response)

    def test_a_cell_holding_an_object_is_refused(self, client):
        response = client.post(SUBMIT, json=with_row(meta={"a": 1}))
        assert response.status_code == 422
        assert "JSON string" in problems(response)["dataset.rows[0].meta"]

    def test_within_the_limits_is_accepted(self, client):
        data = with_candidate(prompt_template="Context: {notes}\nQ: {input}", system_prompt="s" * 500)
        data["dataset"] = {"rows": [{"input": "q" * 700, "notes": "n" * 700, "reference": "r" * 1500}]}
        response = client.post(SUBMIT, json=data)
        assert response.status_code == 202, response.text


class TestGenerationSettingsAreBounded:
    @pytest.mark.parametrize(
        ("generation", "field", "hint"),
        [
            ({"seed": 2**32}, "seed", "less than 4294967296"),
            ({"seed": -1}, "seed", "greater than or equal to 0"),
            ({"temperature": 10.5}, "temperature", "less than or equal to 10"),
            ({"temperature": 0.001}, "temperature", "do_sample"),
            ({"top_k": 1001}, "top_k", "less than or equal to 1000"),
            ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
            ({"repetition_penalty": 50}, "repetition_penalty", "less than or equal to 5"),
            ({"repetition_penalty": 0.01}, "repetition_penalty", "greater than or equal to 0.5"),
        ],
    )
    def test_absurd_values_are_refused(self, client, generation, field, hint):
        response = client.post(SUBMIT, json=with_generation(**generation))
        assert response.status_code == 422
        assert hint in problems(response)[f"candidates[0].generation.{field}"]

    def test_the_bounds_are_explained_in_the_schema(self, client):
        schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerationConfig"]
        for name in ("temperature", "top_k", "repetition_penalty", "seed"):
            assert schema["properties"][name].get("description"), name
        assert schema["properties"]["seed"]["exclusiveMaximum"] == 2**32

    def test_the_largest_values_are_accepted(self, client):
        generation = {"seed": 2**32 - 1, "temperature": 10, "top_k": 1000, "repetition_penalty": 5}
        response = client.post(SUBMIT, json=with_generation(do_sample=True, **generation))
        assert response.status_code == 202, response.text


class TestTags:
    @pytest.mark.parametrize(
        ("key", "hint"),
        [
            ("mlflow.runName", "reserved"),
            ("mlflow.parentRunId", "reserved"),
            ("llm_compare.comparison_id", "reserved"),
            ("team=search", "letters, digits"),
            ("a/../b", "paths"),
            ("/abs", "paths"),
            ("k" * 251, "at most 250"),
        ],
    )
    def test_keys_mlflow_would_refuse_are_refused_by_name(self, client, key, hint):
        response = client.post(SUBMIT, json=spec(tags={key: "v"}))
        assert response.status_code == 422
        fields = problems(response)
        field = f"tags.{key}" if len(key) < 60 else next(f for f in fields if f.startswith("tags."))
        assert hint in fields[field]

    def test_values_over_mlflows_limit_are_refused(self, client):
        response = client.post(SUBMIT, json=spec(tags={"team": "v" * 8001}))
        assert problems(response)["tags.team"] == "tag values are at most 8000 characters (got 8001)"

    def test_too_many_tags(self, client):
        response = client.post(SUBMIT, json=spec(tags={f"t{i}": "v" for i in range(51)}))
        assert response.status_code == 422 and "tags" in problems(response)

    def test_usual_tags_are_kept(self, client):
        tags = {"team": "search", "run/kind": "nightly build: 2", "owner.email": "a@b.c"}
        response = client.post(SUBMIT, json=spec(tags=tags))
        assert response.status_code == 202, response.text
        assert response.json()["tags"] == tags


class TestJsonBodies:
    @pytest.mark.parametrize(
        ("body", "hint"),
        [
            (b'{"name": NaN}', "NaN is not a JSON number"),
            (b'{"name": -Infinity}', "-Infinity is not a JSON number"),
            (b'{"name": "a", "name": "b"}', "the key 'name' appears twice"),
            (b'{"name": ' + b"1" * 5000 + b"}", "digits"),
            (b'{"name": "caf\xff"}', "line 1 is not UTF-8 (byte 0xff at offset 13)"),
            (b'{\n"name":\n' + b"[" * 9 + b"]" * 9 + b"}", "line 3: JSON nested more than 8 levels"),
            (b'{"name": "a\x00b"}', "Invalid control character"),
            (b"", "line 1, column 1"),
        ],
    )
    def test_parser_errors_are_422_naming_the_body(self, client, body, hint):
        response = client.post(SUBMIT, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert hint in problems(response)["body"]

    def test_a_body_of_more_rows_than_allowed_is_refused_before_it_is_built(self, client):
        body = b'{"dataset": {"rows": [' + b",".join([b'{"input": "a"}'] * 200_000) + b"]}}"
        started = time.perf_counter()
        response = client.post(SUBMIT, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422
        message = problems(response)["body"]
        assert "holds 200003 JSON objects and arrays" in message and "at most 100 rows (MAX_ROWS)" in message
        assert time.perf_counter() - started < 10

    def test_brackets_inside_strings_are_not_containers(self, client):
        data = with_row(notes="[[[{{{" * 200, reference="}}]]" * 100)
        response = client.post(SUBMIT, json=data)
        assert response.status_code == 202, response.text

    def test_thousands_of_candidates_are_refused_by_shape(self, client):
        candidates = [{"label": f"c{i}", "model": "smollm2-135m-instruct"} for i in range(10_000)]
        response = client.post(SUBMIT, json=spec(candidates=candidates))
        assert response.status_code == 422
        assert "MAX_CANDIDATES" in problems(response)["body"]

    def test_a_refusal_lists_at_most_fifty_problems(self, client):
        response = client.post(SUBMIT, json=spec(dataset={"rows": [1] * 60}))
        assert response.status_code == 422
        fields = response.json()["fields"]
        assert len(fields) == 50
        assert fields[-1] == {"field": "body", "message": "11 more problems not listed"}

    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
    def test_other_content_types_are_415(self, client, content_type):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(SUBMIT, content=json.dumps(spec()).encode(), headers=headers)
        assert response.status_code == 415
        assert "application/json" in problems(response)["content-type"]

    def test_json_with_a_charset_and_vendor_json_are_read(self, client):
        for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
            response = client.post(SUBMIT, content=json.dumps(spec()), headers={"content-type": content_type})
            assert response.status_code == 202, (content_type, response.text)


class TestUploads:
    def test_csv_parsing_stops_at_the_row_limit(self):
        content = b"input\n" + b"a\n" * 2_000_000
        started = time.perf_counter()
        with pytest.raises(InvalidComparison) as raised:
            parse_dataset_file("rows.csv", content, max_rows=100)
        assert time.perf_counter() - started < 2
        assert raised.value.fields[0].message.startswith("line 102: more than 100 rows")

    def test_jsonl_parsing_stops_at_the_row_limit(self):
        content = b'{"input": "a"}\n' * 300_000
        with pytest.raises(InvalidComparison) as raised:
            parse_dataset_file("rows.jsonl", content, max_rows=100)
        assert raised.value.fields[0].message.startswith("line 101: more than 100 rows")

    @pytest.mark.parametrize(
        ("filename", "content", "hint"),
        [
            ("rows.csv", b"input\nok\n" + b"x" * 200_000 + b"\n", "line 3: a cell is longer than 131072"),
            ("rows.csv", b"input\nok\nbad \xff\n", "line 3 is not UTF-8"),
            ("rows.csv", b"input\nok\nbad\x00\n", "line 3 holds a NUL character"),
            ("rows.csv", b"input,a,b,c,d,e,f\nq\n", "line 1 has 7 columns; at most 6"),
            ("rows.csv", b"input,x,x\nq,1,2\n", "names the column 'x' twice"),
            ("rows.csv", b"question\nq\n", "'input' column"),
            ("rows.csv", b"input\n" + b"q\n" * 101, "line 102: more than 100 rows"),
            ("rows.jsonl", b'{"input": "ok"}\n{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n", "line 2"),
            ("rows.jsonl", b'{"input": "ok"}\n{"input": "a", "m": {"k": 1}}\n', "line 2 is not one flat"),
            ("rows.jsonl", b'{"input": "ok"}\n{"input": NaN}\n', "line 2: NaN is not a JSON number"),
            ("rows.jsonl", b'{"input": "a", "input": "b"}\n', "line 1: the key 'input' appears twice"),
            ("rows.jsonl", b'{"input": "ok"}\n\n{not json}\n', "line 3 is not valid JSON"),
            ("rows.jsonl", b'["input"]\n', "line 1 must be a JSON object"),
            (
                "rows.jsonl",
                b'{"input": "q", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}\n',
                "line 1 has 7",
            ),
            ("rows.parquet", b"PAR1", "upload a .jsonl or .csv"),
        ],
    )
    def test_parser_errors_are_422_naming_the_line(self, client, filename, content, hint):
        response = submit_file(client, filename, content)
        assert response.status_code == 422, response.text
        assert hint in problems(response)["file"]

    def test_jsonl_lines_holding_unicode_line_separators_stay_whole(self, client):
        rows = [{"input": "first\u2028line", "reference": "a\u0085b"}, {"input": "second"}]
        content = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
        response = submit_file(client, "rows.jsonl", content)
        assert response.status_code == 202, response.text
        assert response.json()["rows"] == 2

    def test_csv_quoted_newlines_and_short_rows(self, client):
        content = b'input,reference,topic\n"two\nlines",r,t\nshort\n'
        response = submit_file(client, "rows.csv", content)
        assert response.status_code == 202, response.text
        comparison_id = response.json()["id"]
        rows = client.get(f"{SUBMIT}/{comparison_id}/results").json()["rows"]
        assert [(r["input"], r["reference"], r.get("topic")) for r in rows] == [
            ("two\nlines", "r", "t"),
            ("short", None, None),
        ]

    @pytest.mark.parametrize(
        ("files", "data"),
        [
            ([("file", ("a.csv", b"input\nq\n")), ("file", ("b.csv", b"input\nq\n"))], {"spec": "{}"}),
            ([("file", ("a.csv", b"input\nq\n"))], {"spec": "{}", "other": "x"}),
        ],
    )
    def test_extra_parts_are_refused(self, client, files, data):
        response = client.post(SUBMIT, data=data, files=files)
        assert response.status_code == 422
        assert "Send one field 'spec' and one file 'file'" in problems(response)["body"]

    def test_a_deeply_nested_spec_is_refused(self, client):
        response = client.post(
            SUBMIT,
            data={"spec": '{"name": ' + "[" * 5000 + "]" * 5000 + "}"},
            files={"file": ("a.csv", b"input\nq\n")},
        )
        assert response.status_code == 422
        assert "MAX_CANDIDATES" in problems(response)["spec"]


class TestBodyLimit:
    def test_an_undeclared_body_over_the_limit_is_413_on_every_route(self, client, settings):
        # No Content-Length (chunked): counted as it arrives. The votes route parses its body
        # itself (FastAPI), which used to read any size.
        def chunks() -> Iterator[bytes]:
            for _ in range(9):
                yield b" " * (1024 * 1024)

        response = client.post(
            f"{SUBMIT}/0123/votes", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        body = response.json()
        assert body["error"] == "payload_too_large"
        assert "limit is 8388608 bytes (setting MAX_BODY_BYTES)" in body["message"]

    def test_a_declared_length_over_the_limit_is_413(self, client):
        response = client.post(
            SUBMIT,
            content=b"{}",
            headers={"content-type": "application/json", "content-length": str(9 * 2**20)},
        )
        assert response.status_code == 413


class TestErrorsDoNotLeak:
    @pytest.fixture
    def offline(self, redis_prefix) -> Iterator[TestClient]:
        port = free_port()  # nothing listens there
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{port}/0",
            key_prefix=redis_prefix,
            queue_name=redis_prefix,
            auth_disabled=True,
            mlflow_tracking_uri=f"http://127.0.0.1:{port}",
        )
        with TestClient(create_app(settings)) as client:
            client.port = port  # type: ignore[attr-defined]
            yield client

    def test_a_redis_failure_is_503_with_a_fixed_message(self, offline):
        response = offline.get(SUBMIT)
        assert response.status_code == 503
        assert response.json() == {
            "error": "unavailable",
            "message": "The state store (Redis) is unavailable; retry later",
            "fields": [],
        }

    def test_readyz_names_what_is_down_without_its_error_text(self, offline):
        response = offline.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"] == {"redis": "unreachable", "mlflow": "unreachable"}
        assert str(offline.port) not in response.text


def _results(**extra: Any) -> ComparisonResults:
    return ComparisonResults.model_validate(
        {
            "id": "c",
            "status": "succeeded",
            "candidates": ["a"],
            "rows": [
                {
                    "index": 0,
                    "input": '=HYPERLINK("http://x","click")',
                    "reference": "+1+1",
                    "=cmd|' /C calc'!A0": "@SUM(A1:A2)",
                    "note": "-2+3",
                    "tabbed": "\tx",
                    "returned": "\rx",
                    "number_text": "-3.5",
                    "plain": "a = b",
                    "outputs": {
                        "a": {
                            "output": "-1",
                            "scores": {"delta": -0.25, "label_score": None},
                            "ratings": {"up": 1, "down": 0, "comments": [{"rater": "=x", "comment": "ok"}]},
                        }
                    },
                    **extra,
                }
            ],
        }
    )


class TestCsvExport:
    def test_cells_a_spreadsheet_would_run_are_quoted(self):
        table = list(csv.DictReader(io.StringIO(results_csv(_results()))))
        row = table[0]
        assert row["input"] == '\'=HYPERLINK("http://x","click")'
        assert row["reference"] == "'+1+1"
        assert row["'=cmd|' /C calc'!A0"] == "'@SUM(A1:A2)"
        assert row["note"] == "'-2+3"
        assert row["tabbed"] == "'\tx"
        assert row["returned"] == "'\rx"
        assert row["a/comments"] == "'=x: ok"

    def test_numbers_stay_numbers(self):
        row = next(csv.DictReader(io.StringIO(results_csv(_results()))))
        assert row["number_text"] == "-3.5"
        assert row["a"] == "-1"
        assert row["a/delta"] == "-0.25"
        assert row["plain"] == "a = b"
        assert row["index"] == "0"

    def test_a_failed_row_has_its_reason_in_an_error_column_like_the_dataframe(self):
        from shared.client import results_dataframe

        def row(index: int, error: str | None) -> dict[str, Any]:
            output = {"output": None if error else "Paris", "scores": {"latency": 0.3}, "error": error}
            return {"index": index, "input": "q", "outputs": {"served": output, "local": {"output": "x"}}}

        results = ComparisonResults.model_validate(
            {
                "id": "c",
                "status": "succeeded",
                "candidates": ["served", "local"],
                "rows": [row(0, None), row(1, "HTTP 500 after 3 attempts: upstream overloaded")],
            }
        )
        table = list(csv.DictReader(io.StringIO(results_csv(results))))
        assert [r["served/error"] for r in table] == ["", "HTTP 500 after 3 attempts: upstream overloaded"]
        assert [r["served"] for r in table] == ["Paris", ""]
        # Only a candidate with a failed row gets the column, as in the client's DataFrame.
        assert "local/error" not in table[0]
        frame_columns = [c for c in results_dataframe(results).columns if c not in ("input", "reference")]
        assert list(table[0])[3:] == frame_columns
