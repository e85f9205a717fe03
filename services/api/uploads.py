"""Reading what a client submits: JSON bodies and specs, and datasets uploaded as files (JSONL
or CSV) instead of inline rows.

Everything here is bounded by the size of its input, never by what the input claims: row
counts are checked while parsing (a 4 MiB CSV of one-character rows is two million rows), the
number and depth of JSON containers before ``json.loads`` builds them, and every parser error
becomes a 422 that names the line. These functions are CPU-bound: routes run them in the thread
pool, off the event loop.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from services.api.errors import FieldProblem, InvalidComparison, problems_from_errors
from shared.schemas import MAX_CALLBACKS, ComparisonCreate
from shared.settings import Settings, get_settings

# A valid comparison nests five levels deep (body > candidates > candidate > generation > stop).
MAX_JSON_DEPTH = 8
# Containers a request holds besides its rows and candidates (the body, dataset, lists, tags),
# and its callbacks: their list, and per callback the object and its events.
_FIXED_CONTAINERS = 16 + 1 + 2 * MAX_CALLBACKS
# Per candidate: the object, its generation settings and their stop list.
_CONTAINERS_PER_CANDIDATE = 3

# A JSON string, escapes included; replacing each by "" leaves only the structure, so brackets
# inside prompts are not counted as containers. The closing quote is optional: with it required,
# an unterminated string full of \" escapes makes the scan quadratic (minutes for 1 MB).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _refuse(field: str, message: str) -> InvalidComparison:
    return InvalidComparison([FieldProblem(field, message)])


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _decode(content: bytes, field: str, *, bom: bool = False) -> str:
    try:
        return content.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise _refuse(
            field,
            f"line {line} is not UTF-8 (byte 0x{content[exc.start]:02x} at offset {exc.start}); "
            "save the text as UTF-8",
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The standard library keeps the last of duplicate keys silently; a request that says two
    # things at once is refused instead.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {key[:60]!r} appears twice in one object")
            seen.add(key)
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number or null")


def _loads(text: str, field: str, where: str = "") -> Any:
    """``json.loads`` with every failure a 422 naming the line."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        position = where or f"line {exc.lineno}, column {exc.colno}"
        raise _refuse(field, f"{position} is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise _refuse(field, f"{where or 'the JSON'} is nested too deeply") from None
    except ValueError as exc:  # our hooks, and integers longer than Python converts (4300 digits)
        raise _refuse(field, f"{where + ': ' if where else ''}{exc}") from None


def check_json_shape(text: str, field: str, *, max_containers: int, too_many: str) -> None:
    """Refuse JSON with more objects and arrays than ``max_containers``, or nested deeper than
    MAX_JSON_DEPTH, before parsing it: ``json.loads`` of 10 MiB of ``{},`` builds 3.5 million
    dicts (about 250 MB) and deep nesting ends in a RecursionError."""
    structure = _JSON_STRING.sub('""', text)
    containers = structure.count("{") + structure.count("[")
    if containers > max_containers:
        raise _refuse(field, f"holds {containers} JSON objects and arrays; {too_many}")
    depth = 0
    for match in _BRACKET.finditer(structure):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                # Strings never hold a raw newline, so lines of the structure are the text's.
                line = _line_of(structure, match.start())
                raise _refuse(
                    field,
                    f"line {line}: JSON nested more than {MAX_JSON_DEPTH} levels deep; a comparison "
                    "needs at most 5 (dataset cells are text, numbers, booleans or null)",
                )
        else:
            depth -= 1


def validated_spec(data: Any) -> ComparisonCreate:
    """The submission as a ComparisonCreate, or InvalidComparison naming every field at fault."""
    try:
        return ComparisonCreate.model_validate(data)
    except ValidationError as exc:
        raise InvalidComparison(problems_from_errors(exc.errors())) from None


def parse_json_submission(body: bytes, settings: Settings) -> ComparisonCreate:
    """A comparison sent as a JSON body, rows inline."""
    text = _decode(body, "body")
    check_json_shape(
        text,
        "body",
        max_containers=settings.max_rows
        + _CONTAINERS_PER_CANDIDATE * settings.max_candidates
        + _FIXED_CONTAINERS,
        too_many=f"a comparison holds at most {settings.max_rows} rows (MAX_ROWS), each a flat "
        f"object, and {settings.max_candidates} candidates (MAX_CANDIDATES): split the dataset",
    )
    return validated_spec(_loads(text, "body"))


def parse_upload_submission(
    raw_spec: str, filename: str, content: bytes, settings: Settings
) -> ComparisonCreate:
    """A comparison sent as multipart: the spec as JSON without its dataset, the rows as a file."""
    check_json_shape(
        raw_spec,
        "spec",
        max_containers=_CONTAINERS_PER_CANDIDATE * settings.max_candidates + _FIXED_CONTAINERS,
        too_many=f"a spec holds at most {settings.max_candidates} candidates (MAX_CANDIDATES), "
        "and its dataset comes as the file",
    )
    data = _loads(raw_spec, "spec")
    if not isinstance(data, dict):
        raise _refuse("spec", "must be a JSON object")
    if "dataset" in data:
        raise _refuse("spec.dataset", "give the dataset either inline or as the uploaded file, not both")
    rows = parse_dataset_file(filename, content, max_rows=settings.max_rows, max_columns=settings.max_columns)
    data["dataset"] = {"rows": rows}
    return validated_spec(data)


def parse_dataset_file(
    filename: str, content: bytes, *, max_rows: int | None = None, max_columns: int | None = None
) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .csv file. Parsing stops at the row past ``max_rows`` and at a row
    wider than ``max_columns``, with a 422 naming the line; without them, the process settings'
    MAX_ROWS and MAX_COLUMNS apply, so no caller parses a file unbounded."""
    if max_rows is None or max_columns is None:
        settings = get_settings()
        max_rows = settings.max_rows if max_rows is None else max_rows
        max_columns = settings.max_columns if max_columns is None else max_columns
    name = filename.lower()
    parse: Callable[[str, int | None, int | None], list[dict[str, Any]]]
    if name.endswith(".csv"):
        parse = _parse_csv
    elif name.endswith((".jsonl", ".ndjson", ".json")):
        parse = _parse_jsonl
    else:
        raise _refuse("file", f"unsupported file {filename[:100]!r}: upload a .jsonl or .csv dataset")
    text = _decode(content, "file", bom=True)
    nul = text.find("\x00")
    if nul >= 0:
        raise _refuse("file", f"line {_line_of(text, nul)} holds a NUL character; remove it")
    return parse(text, max_rows, max_columns)


def _too_many_rows(line: int, max_rows: int) -> InvalidComparison:
    return _refuse(
        "file",
        f"line {line}: more than {max_rows} rows; at most {max_rows} rows per comparison "
        "(setting MAX_ROWS): split the dataset",
    )


def _too_wide(line: int, columns: int, max_columns: int) -> InvalidComparison:
    return _refuse("file", f"line {line} has {columns} columns; at most {max_columns} (setting MAX_COLUMNS)")


def _parse_jsonl(text: str, max_rows: int | None, max_columns: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # Lines end at "\n" only: str.splitlines() would also split inside JSON strings holding
    # U+2028 or other characters JSON leaves unescaped.
    for number, line in enumerate(io.StringIO(text, newline="\n"), start=1):
        if not line.strip():
            continue
        if max_rows is not None and len(rows) >= max_rows:
            raise _too_many_rows(number, max_rows)
        where = f"line {number}"
        # A row is one flat object; anything nested is refused before it is built.
        structure = _JSON_STRING.sub('""', line)
        if structure.count("{") + structure.count("[") > 1:
            raise _refuse(
                "file",
                f"{where} is not one flat JSON object: cells are text, numbers, booleans or null "
                "(send nested values as JSON strings)",
            )
        try:
            row = _loads(line, "file", where)
        except InvalidComparison as exc:
            message = exc.fields[0].message
            raise _refuse("file", f"{message}; one object per line") from None
        if not isinstance(row, dict):
            raise _refuse("file", f"{where} must be a JSON object")
        if max_columns is not None and len(row) > max_columns:
            raise _too_wide(number, len(row), max_columns)
        rows.append(row)
    return rows


def _parse_csv(text: str, max_rows: int | None, max_columns: int | None) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict[str, Any]] = []
    try:
        header = next(reader, None)
        if not header or "input" not in header:
            raise _refuse(
                "file", "the CSV needs a header row with an 'input' column (and optionally 'reference')"
            )
        if max_columns is not None and len(header) > max_columns:
            raise _too_wide(reader.line_num, len(header), max_columns)
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise _refuse(
                "file", f"line 1 names the column {duplicated[0][:60]!r} twice; name each column once"
            )
        for record in reader:
            if not record:  # a blank line
                continue
            if max_rows is not None and len(rows) >= max_rows:
                raise _too_many_rows(reader.line_num, max_rows)
            # Cells past the header's columns are dropped; missing ones are empty.
            row: dict[str, Any] = dict(zip(header, record, strict=False))
            for name in header[len(record) :]:
                row[name] = None
            if row.get("reference") == "":
                row["reference"] = None
            rows.append(row)
    except csv.Error as exc:
        message = str(exc)
        if "field limit" in message:
            message = (
                f"a cell is longer than {csv.field_size_limit()} characters; cells hold at most "
                "MAX_CELL_CHARS characters"
            )
        raise _refuse("file", f"line {reader.line_num}: {message}") from None
    return rows
