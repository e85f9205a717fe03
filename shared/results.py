"""The side-by-side table: one entry per dataset row with every candidate's output and scores.

Both the gateway (``/results``) and the worker (the summary on the parent run) build it here,
so the two always agree.
"""

from __future__ import annotations

from typing import Any

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
