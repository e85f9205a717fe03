"""The side-by-side table: one entry per dataset row with every candidate's output and scores.

Both the gateway (``/results``) and the worker (the summary on the parent run) build it here,
so the two always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.schemas import ComparisonResults

_ROW_KEYS = ("index", "input", "reference", "outputs")


def has_reference(row: dict[str, Any]) -> bool:
    """A row counts as having a reference when the value is present and not blank."""
    value = row.get("reference")
    return value is not None and str(value).strip() != ""


def rating_summary(ratings: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """People's ratings per output cell: thumbs counted, comments kept with who wrote them."""
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    for entry in ratings:
        cell = cells.setdefault(
            (int(entry["row"]), str(entry["label"])), {"up": 0, "down": 0, "comments": []}
        )
        if entry.get("rating") in ("up", "down"):
            cell[entry["rating"]] += 1
        if entry.get("comment"):
            cell["comments"].append(
                {"rater": entry.get("rater"), "rating": entry.get("rating"), "comment": entry["comment"]}
            )
    return cells


def side_by_side(
    rows: list[dict[str, Any]],
    labels: list[str],
    outputs: dict[str, list[dict[str, Any]] | None],
    ratings: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    rated = rating_summary(ratings or [])
    table = []
    for index, row in enumerate(rows):
        reference = row.get("reference")
        entry: dict[str, Any] = {
            "index": index,
            "input": row["input"],
            "reference": None if reference is None else str(reference),
        }
        entry.update({k: v for k, v in row.items() if k not in _ROW_KEYS})
        per_candidate = {}
        for label in labels:
            produced = outputs.get(label)
            if produced is not None and index < len(produced):
                per_candidate[label] = {
                    "output": produced[index]["output"],
                    "scores": produced[index].get("scores", {}),
                    # Why an endpoint row has no output (its request failed after retries).
                    "error": produced[index].get("error"),
                }
                if ratings is not None:
                    per_candidate[label]["ratings"] = rated.get(
                        (index, label), {"up": 0, "down": 0, "comments": []}
                    )
            else:
                per_candidate[label] = {"output": None, "scores": {}, "error": None}
        entry["outputs"] = per_candidate
        table.append(entry)
    return table


@dataclass(frozen=True)
class ResultColumns:
    """The columns of a results table, one rule for ``?format=csv`` and the client's DataFrame:
    the dataset's columns besides input and reference, then per candidate its output, a score
    column per metric it was scored on, ``<label>/error`` when one of its rows failed, and the
    people's ratings."""

    extra: list[str]
    scores: dict[str, list[str]]
    with_errors: frozenset[str]

    def of_candidate(self, label: str) -> list[str]:
        return [
            label,
            *(f"{label}/{metric}" for metric in self.scores[label]),
            *([f"{label}/error"] if label in self.with_errors else []),
            f"{label}/thumbs_up",
            f"{label}/thumbs_down",
            f"{label}/comments",
        ]


def result_columns(results: ComparisonResults) -> ResultColumns:
    extra: dict[str, None] = {}
    scores: dict[str, dict[str, None]] = {label: {} for label in results.candidates}
    with_errors: set[str] = set()
    for row in results.rows:
        extra.update(dict.fromkeys(row.model_extra or {}))
        for label, out in row.outputs.items():
            scores.setdefault(label, {}).update(dict.fromkeys(out.scores))
            if out.error is not None:
                with_errors.add(label)
    return ResultColumns(
        extra=list(extra),
        scores={label: list(names) for label, names in scores.items()},
        with_errors=frozenset(with_errors),
    )
