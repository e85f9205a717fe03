"""The new-comparison form: a comparison spec as flat form values and back.

Every control is named by the path the API uses for it in error messages
(``candidates[1].generation.temperature``), so a 422 from the same validation the API runs lands
next to the control it names. The form is plain HTML: adding or removing a candidate is a submit
button, so it works without JavaScript.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from services.api.errors import FieldProblem, InvalidComparison
from services.api.uploads import parse_dataset_file

GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
CANDIDATE_TEXT_FIELDS = ("label", "model", "revision", "prompt_template", "system_prompt")
MIN_CANDIDATES = 2
_INDEX = re.compile(r"^candidates\[(\d+)\]\.")


@dataclass
class FormState:
    """What the form shows: control values by name, checked metrics, problems by control."""

    values: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    candidates: int = MIN_CANDIDATES
    errors: dict[str, list[str]] = field(default_factory=dict)
    # Every problem in order, with the control it was attached to, for the summary at the top.
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def value(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def checked(self, name: str) -> bool:
        return self.values.get(name) == "on"


def control_id(name: str) -> str:
    """A DOM id for a control name: ``candidates[1].label`` -> ``f-candidates-1-label``."""
    return "f-" + re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")


def rows_as_jsonl(rows: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)


def state_from_spec(spec: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> FormState:
    """The form filled with a spec (the bundled example, or a comparison to run again)."""
    values: dict[str, str] = {
        "name": str(spec.get("name") or ""),
        "experiment": str(spec.get("experiment") or ""),
        "model_type": str(spec.get("model_type") or ""),
        "regex": str(spec.get("regex") or ""),
        "judge_rubric": str(spec.get("judge_rubric") or ""),
        "tags": "\n".join(f"{k}={v}" for k, v in (spec.get("tags") or {}).items()),
    }
    if spec.get("cache", True):
        values["cache"] = "on"
    if spec.get("pairwise_judge"):
        values["pairwise_judge"] = "on"
    candidates = spec.get("candidates") or []
    for i, candidate in enumerate(candidates):
        prefix = f"candidates[{i}]."
        for name in CANDIDATE_TEXT_FIELDS:
            values[prefix + name] = str(candidate.get(name) or "")
        values[prefix + "prompt_template"] = str(candidate.get("prompt_template") or "{input}")
        chat = candidate.get("use_chat_template", "auto")
        values[prefix + "use_chat_template"] = "auto" if chat == "auto" else ("true" if chat else "false")
        generation = candidate.get("generation") or {}
        for name in GENERATION_FIELDS:
            if generation.get(name) is not None:
                values[f"{prefix}generation.{name}"] = str(generation[name])
        if generation.get("do_sample"):
            values[f"{prefix}generation.do_sample"] = "on"
        values[f"{prefix}generation.stop"] = "\n".join(generation.get("stop") or [])
    dataset_rows = rows if rows is not None else (spec.get("dataset") or {}).get("rows") or []
    values["dataset"] = rows_as_jsonl(dataset_rows)
    return FormState(
        values=values,
        metrics=list(spec.get("metrics") or []),
        candidates=max(MIN_CANDIDATES, len(candidates)),
    )


def state_from_form(form: Any) -> FormState:
    """Read the submitted controls back (``form`` is Starlette's FormData, or any multi-dict)."""
    values = {key: value for key, value in form.multi_items() if isinstance(value, str) and key != "metrics"}
    indices = {int(m.group(1)) for key in values if (m := _INDEX.match(key))}
    count = max([MIN_CANDIDATES, *(i + 1 for i in indices)])
    return FormState(
        values=values, metrics=[m for m in form.getlist("metrics") if isinstance(m, str)], candidates=count
    )


def add_candidate(state: FormState) -> None:
    """One more candidate, copying the last one's model and settings under a new label."""
    last = state.candidates - 1
    new = state.candidates
    for key, value in list(state.values.items()):
        if key.startswith(f"candidates[{last}]."):
            state.values[f"candidates[{new}]." + key.split("].", 1)[1]] = value
    state.values[f"candidates[{new}].label"] = f"candidate-{new + 1}"
    state.candidates += 1


def remove_candidate(state: FormState, index: int) -> None:
    if state.candidates <= MIN_CANDIDATES or not 0 <= index < state.candidates:
        return
    shifted: dict[str, str] = {}
    for key, value in state.values.items():
        match = _INDEX.match(key)
        if not match:
            shifted[key] = value
            continue
        i = int(match.group(1))
        rest = key[match.end() :]
        if i < index:
            shifted[key] = value
        elif i > index:
            shifted[f"candidates[{i - 1}].{rest}"] = value
    state.values = shifted
    state.candidates -= 1


def spec_from_state(
    state: FormState,
    upload: tuple[str, bytes] | None,
    *,
    max_rows: int | None = None,
    max_columns: int | None = None,
) -> dict[str, Any]:
    """The comparison the form describes, in the API's shape. Problems only the form can have
    (unreadable pasted data, tag lines without '=') raise InvalidComparison; everything else is
    left to the API's own validation, so the page and the API refuse the same things."""
    v = state.values
    problems: list[FieldProblem] = []
    spec: dict[str, Any] = {"name": v.get("name", "").strip() or "comparison"}
    if v.get("experiment", "").strip():
        spec["experiment"] = v["experiment"].strip()
    if v.get("model_type"):
        spec["model_type"] = v["model_type"]
    candidates = []
    for i in range(state.candidates):
        prefix = f"candidates[{i}]."
        candidate: dict[str, Any] = {
            "label": v.get(prefix + "label", "").strip(),
            "model": v.get(prefix + "model", "").strip(),
            "prompt_template": v.get(prefix + "prompt_template") or "{input}",
        }
        if v.get(prefix + "revision", "").strip():
            candidate["revision"] = v[prefix + "revision"].strip()
        if v.get(prefix + "system_prompt", "").strip():
            candidate["system_prompt"] = v[prefix + "system_prompt"]
        chat = v.get(prefix + "use_chat_template", "auto")
        candidate["use_chat_template"] = "auto" if chat == "auto" else chat == "true"
        generation: dict[str, Any] = {"do_sample": v.get(prefix + "generation.do_sample") == "on"}
        for name in GENERATION_FIELDS:
            raw = v.get(f"{prefix}generation.{name}", "").strip()
            if raw:
                # Strings are fine: the API's validation converts them and names a bad one.
                generation[name] = raw
        stops = [line for line in v.get(prefix + "generation.stop", "").splitlines() if line.strip()]
        if stops:
            generation["stop"] = stops
        candidate["generation"] = generation
        candidates.append(candidate)
    spec["candidates"] = candidates

    rows: list[dict[str, Any]] = []
    try:
        if upload is not None:
            rows = parse_dataset_file(*upload, max_rows=max_rows, max_columns=max_columns)
        elif v.get("dataset", "").strip():
            text = v["dataset"].strip()
            kind = "pasted.jsonl" if text.startswith("{") else "pasted.csv"
            rows = parse_dataset_file(kind, text.encode(), max_rows=max_rows, max_columns=max_columns)
    except InvalidComparison as exc:
        problems += [FieldProblem("dataset", p.message) for p in exc.fields]
    if not rows and not problems:
        problems.append(
            FieldProblem(
                "dataset",
                "paste rows (JSONL, one object per line, or CSV with a header) or upload a file; "
                "each row needs an 'input'",
            )
        )
    spec["dataset"] = {"rows": rows}

    if not state.metrics:
        problems.append(FieldProblem("metrics", "pick at least one metric"))
    spec["metrics"] = list(dict.fromkeys(state.metrics))
    for name in ("regex", "judge_rubric"):
        if v.get(name, "").strip():
            spec[name] = v[name].strip()
    spec["cache"] = v.get("cache") == "on"
    spec["pairwise_judge"] = v.get("pairwise_judge") == "on"
    tags: dict[str, str] = {}
    for number, line in enumerate(v.get("tags", "").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            problems.append(FieldProblem("tags", f"line {number} must look like key=value"))
            continue
        tags[key.strip()] = value.strip()
    spec["tags"] = tags
    if problems:
        raise InvalidComparison(problems)
    return spec


def attach_problems(state: FormState, problems: list[FieldProblem], submitted_metrics: list[str]) -> None:
    """Put each problem next to the control it names, or the nearest enclosing part of the form."""
    controls = set(state.values) | {"dataset", "metrics", "tags", "regex", "judge_rubric", "name"}
    for problem in problems:
        target = _control_for(problem.field, controls, submitted_metrics)
        state.errors.setdefault(target, []).append(problem.message)
        state.problems.append((problem.field, target, problem.message))


def _control_for(path: str, controls: set[str], submitted_metrics: list[str]) -> str:
    if path in controls:
        return path
    if path == "file" or path.startswith("dataset"):
        return "dataset"
    metric = re.fullmatch(r"metrics\[(\d+)\]", path)
    if metric:
        index = int(metric.group(1))
        return f"metric:{submitted_metrics[index]}" if index < len(submitted_metrics) else "metrics"
    candidate = re.match(r"^(candidates\[\d+\])", path)
    if candidate:
        # candidates[1].generation.stop[0] -> the stop control; candidates[1] -> the fieldset.
        trimmed = path
        while trimmed not in controls and "." in trimmed[len(candidate.group(1)) :]:
            trimmed = re.sub(r"(\[\d+\]|\.[^.\[]+)$", "", trimmed)
        return trimmed if trimmed in controls else candidate.group(1)
    if path.startswith("candidates"):
        return "candidates"
    return "form"
