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


def side_by_side(
    rows: list[dict[str, Any]], labels: list[str], outputs: dict[str, list[dict[str, Any]] | None]
) -> list[dict[str, Any]]:
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
                }
            else:
                per_candidate[label] = {"output": None, "scores": {}}
        entry["outputs"] = per_candidate
        table.append(entry)
    return table
