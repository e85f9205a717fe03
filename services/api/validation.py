"""Checks that need settings or the catalogs, run before anything is queued.

Schema-level problems (types, ranges, ``{input}`` in templates) are caught by pydantic; this
module catches what only the service knows: limits, catalog names, metric needs, model roots.
It returns every problem at once so a client can fix a request in one round trip.
"""

from __future__ import annotations

import re

from services.api.errors import FieldProblem, InvalidComparison
from shared.catalog import CATALOG
from shared.metrics import DEFAULT_METRICS, METRICS, MetricInfo
from shared.results import has_reference
from shared.schemas import ComparisonCreate, template_fields
from shared.settings import Settings
from shared.sources import SourceKind, classify_model, is_under_roots


def resolve_metrics(spec: ComparisonCreate) -> list[str]:
    """The metrics a comparison will compute: those asked for, else the defaults that apply."""
    if spec.metrics is not None:
        return list(dict.fromkeys(spec.metrics))
    every_row_has_reference = all(has_reference(row) for row in spec.dataset.rows)
    chosen = [m for m in DEFAULT_METRICS if every_row_has_reference or not METRICS[m].needs_reference]
    if spec.regex is not None:
        chosen.append("regex_match")
    return chosen


def validate_comparison(
    spec: ComparisonCreate, settings: Settings, registry: dict[str, MetricInfo] | None = None
) -> list[str]:
    """Raise InvalidComparison listing every problem; return the metrics to compute.

    ``registry`` is every metric the workers can run (built-in plus published custom ones).
    """
    registry = registry if registry is not None else METRICS
    problems: list[FieldProblem] = []
    problems += _check_candidates(spec, settings)
    problems += _check_dataset(spec, settings)
    if not problems:
        problems += _check_templates_against_rows(spec)
        problems += _check_metrics(spec, registry, judge_configured=settings.judge_configured)
    if problems:
        raise InvalidComparison(problems)
    return resolve_metrics(spec)


def _check_candidates(spec: ComparisonCreate, settings: Settings) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    count = len(spec.candidates)
    if count < 2:
        problems.append(FieldProblem("candidates", f"give at least 2 candidates to compare (got {count})"))
    if count > settings.max_candidates:
        problems.append(
            FieldProblem(
                "candidates",
                f"at most {settings.max_candidates} candidates per comparison (got {count}); "
                "split the comparison",
            )
        )
    first_index: dict[str, int] = {}
    roots = [str(r) for r in settings.model_roots]
    for i, candidate in enumerate(spec.candidates):
        if candidate.label in first_index:
            problems.append(
                FieldProblem(
                    f"candidates[{i}].label",
                    f"label {candidate.label!r} is already used by "
                    f"candidates[{first_index[candidate.label]}]; labels must be unique",
                )
            )
        first_index.setdefault(candidate.label, i)
        if candidate.generation.max_new_tokens > settings.max_new_tokens:
            problems.append(
                FieldProblem(
                    f"candidates[{i}].generation.max_new_tokens",
                    f"at most {settings.max_new_tokens} (got {candidate.generation.max_new_tokens})",
                )
            )
        source = classify_model(candidate.model)
        if source.kind is SourceKind.catalog and source.value not in CATALOG:
            problems.append(
                FieldProblem(
                    f"candidates[{i}].model",
                    f"unknown catalog name {source.value!r}; use one of {sorted(CATALOG)} "
                    "(GET /v1/models), a Hugging Face hub id like 'org/name', an absolute local "
                    "path, or a models:/ or runs:/ MLflow URI",
                )
            )
        if source.kind in (SourceKind.local_dir, SourceKind.gguf_file) and not is_under_roots(
            source.value, roots
        ):
            problems.append(
                FieldProblem(
                    f"candidates[{i}].model",
                    f"local path {source.value!r} is outside the model roots {roots}; put the model "
                    "under one of them (setting MODEL_ROOTS)",
                )
            )
    return problems


def _check_dataset(spec: ComparisonCreate, settings: Settings) -> list[FieldProblem]:
    rows = spec.dataset.rows
    if not rows:
        return [FieldProblem("dataset.rows", "the dataset is empty: give at least one row with an 'input'")]
    if len(rows) > settings.max_rows:
        return [
            FieldProblem(
                "dataset.rows",
                f"at most {settings.max_rows} rows per comparison (got {len(rows)}); split the dataset",
            )
        ]
    problems: list[FieldProblem] = []
    for i, row in enumerate(rows):
        value = row.get("input")
        if not isinstance(value, str) or not value.strip():
            problems.append(
                FieldProblem(f"dataset.rows[{i}].input", "each row needs a non-empty string 'input'")
            )
        elif len(value) > settings.max_prompt_chars:
            problems.append(
                FieldProblem(
                    f"dataset.rows[{i}].input",
                    f"at most {settings.max_prompt_chars} characters (got {len(value)})",
                )
            )
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str | int | float):
            problems.append(
                FieldProblem(f"dataset.rows[{i}].reference", "reference must be a string when given")
            )
        if len(problems) >= 20:
            break
    return problems


def _check_templates_against_rows(spec: ComparisonCreate) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    rows = spec.dataset.rows
    for i, candidate in enumerate(spec.candidates):
        for name in sorted(template_fields(candidate.prompt_template) - {"input"}):
            missing = [j for j, row in enumerate(rows) if name not in row]
            if missing:
                problems.append(
                    FieldProblem(
                        f"candidates[{i}].prompt_template",
                        f"placeholder {{{name}}} is not a column of dataset rows {missing[:5]}; add the "
                        f"column or escape the braces as {{{{{name}}}}}",
                    )
                )
    return problems


def _check_metrics(
    spec: ComparisonCreate, registry: dict[str, MetricInfo], *, judge_configured: bool
) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    if spec.pairwise_judge and not judge_configured:
        problems.append(
            FieldProblem(
                "pairwise_judge",
                "needs an LLM judge and none is configured; set JUDGE_BASE_URL and JUDGE_MODEL or "
                "JUDGE_LOCAL_MODEL on the service, or set pairwise_judge to false",
            )
        )
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as exc:
            problems.append(FieldProblem("regex", f"not a valid regular expression ({exc})"))
    if spec.metrics is None:
        return problems
    if not spec.metrics:
        problems.append(
            FieldProblem("metrics", f"give at least one metric, or omit the field for {DEFAULT_METRICS}")
        )
    without_reference = [i for i, row in enumerate(spec.dataset.rows) if not has_reference(row)]
    for i, name in enumerate(spec.metrics):
        info = registry.get(name)
        if info is None:
            problems.append(
                FieldProblem(f"metrics[{i}]", f"unknown metric {name!r}; known metrics: {sorted(registry)}")
            )
        elif info.needs_reference and without_reference:
            problems.append(
                FieldProblem(
                    f"metrics[{i}]",
                    f"{name} needs a 'reference' on every row, but rows {without_reference[:5]} have "
                    "none; add references or drop the metric",
                )
            )
        elif info.needs_judge and not judge_configured:
            problems.append(
                FieldProblem(
                    f"metrics[{i}]",
                    f"{name} needs an LLM judge and none is configured on this service; set "
                    "JUDGE_BASE_URL and JUDGE_MODEL (any OpenAI-compatible endpoint) or JUDGE_LOCAL_MODEL, "
                    "or drop the metric",
                )
            )
        elif info.needs_option and getattr(spec, info.needs_option) is None:
            problems.append(
                FieldProblem(
                    f"metrics[{i}]",
                    f"{name} needs the field '{info.needs_option}'; set it or drop the metric",
                )
            )
    return problems
