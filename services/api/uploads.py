"""Datasets uploaded as files (JSONL or CSV) instead of inline rows."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from services.api.errors import FieldProblem, InvalidComparison


def parse_dataset_file(filename: str, content: bytes) -> list[dict[str, Any]]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidComparison([FieldProblem("file", "the dataset file must be UTF-8 text")]) from None
    name = filename.lower()
    if name.endswith(".csv"):
        return _parse_csv(text)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return _parse_jsonl(text)
    raise InvalidComparison(
        [FieldProblem("file", f"unsupported file {filename!r}: upload a .jsonl or .csv dataset")]
    )


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidComparison(
                [FieldProblem("file", f"line {number} is not valid JSON ({exc.msg}); one object per line")]
            ) from None
        if not isinstance(row, dict):
            raise InvalidComparison([FieldProblem("file", f"line {number} must be a JSON object")])
        rows.append(row)
    return rows


def _parse_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "input" not in reader.fieldnames:
        raise InvalidComparison(
            [
                FieldProblem(
                    "file", "the CSV needs a header row with an 'input' column (and optionally 'reference')"
                )
            ]
        )
    rows = []
    for row in reader:
        cleaned = {k: v for k, v in row.items() if k is not None}
        if cleaned.get("reference") == "":
            cleaned["reference"] = None
        rows.append(cleaned)
    return rows
