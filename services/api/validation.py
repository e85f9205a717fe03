"""Checks that need settings or the catalogs, run before anything is queued.

Schema-level problems (types, ranges, ``{input}`` in templates) are caught by pydantic; this
module catches what only the service knows: limits, catalog names, metric needs, model roots.
It returns every problem at once so a client can fix a request in one round trip.
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any

from services.api.errors import FieldProblem, InvalidComparison
from shared.catalog import CATALOG
from shared.endpoints import endpoint_model_problem, parse_endpoint_model
from shared.metrics import DEFAULT_METRICS, ENDPOINT_USAGE_METRICS, METRICS, MetricInfo
from shared.patterns import pattern_problem
from shared.prompts import PromptLength
from shared.results import has_reference
from shared.schemas import (
    CallbackCreate,
    CandidateSpec,
    ComparisonCreate,
    GenerationConfig,
    template_fields,
    text_problem,
)
from shared.settings import Settings
from shared.sources import (
    SourceKind,
    classify_model,
    hub_id_problem,
    is_under_roots,
    mlflow_model_problem,
    revision_problem,
)
from shared.webhook_targets import TargetRefused, check_target, system_resolve


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
    problems += _check_prompts(spec, settings)
    problems += _check_tags(spec.tags)
    problems += _check_dataset(spec, settings)
    problems += callback_problems(spec.callbacks, settings)
    if not problems:
        problems += _check_templates_against_rows(spec)
        problems += _check_rendered_prompts(spec, settings)
        problems += _check_metrics(spec, registry, judge_configured=settings.judge_configured)
        problems += _check_endpoint_metrics(spec, registry)
    if problems:
        raise InvalidComparison(problems)
    return resolve_metrics(spec)


def callback_problems(callbacks: list[CallbackCreate], settings: Settings) -> list[FieldProblem]:
    """Every callback whose URL may not be called: its shape, the operator's allowlist, and the
    addresses its host resolves to now (only hosts the allowlist matches are resolved). The I/O workers
    check again before every attempt, since DNS answers change."""
    problems: list[FieldProblem] = []
    allowlist = settings.webhook_allowlist
    seen: dict[str, int] = {}
    for i, callback in enumerate(callbacks):
        field = f"callbacks[{i}].url"
        if callback.url in seen:
            problems.append(
                FieldProblem(
                    field,
                    f"the same URL as callbacks[{seen[callback.url]}]: list all its events in one callback",
                )
            )
            continue
        seen[callback.url] = i
        try:
            check_target(callback.url, allowlist, resolve=system_resolve)
        except TargetRefused as exc:
            problems.append(FieldProblem(field, str(exc)))
    return problems


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
        if source.kind is SourceKind.endpoint:
            problems += _check_endpoint_candidate(i, candidate, settings)
            continue
        if source.kind is SourceKind.catalog and source.value not in CATALOG:
            problems.append(
                FieldProblem(
                    f"candidates[{i}].model",
                    f"unknown catalog name {source.value!r}; use one of {sorted(CATALOG)} "
                    "(GET /v1/models), a Hugging Face hub id like 'org/name', an absolute local "
                    "path, or models:/<name>/<version> for a registered model on MLFLOW_MODEL_ALLOWLIST",
                )
            )
        if source.kind is SourceKind.hub and (problem := hub_id_problem(source.value)):
            problems.append(FieldProblem(f"candidates[{i}].model", problem))
        if source.kind is SourceKind.mlflow and (
            problem := mlflow_model_problem(source.value, settings.mlflow_model_allowlist)
        ):
            problems.append(FieldProblem(f"candidates[{i}].model", problem))
        if candidate.revision is not None and (problem := revision_problem(candidate.revision)):
            problems.append(FieldProblem(f"candidates[{i}].revision", problem))
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


def _check_endpoint_candidate(i: int, candidate: CandidateSpec, settings: Settings) -> list[FieldProblem]:
    """A candidate on a remote endpoint: a configured one, and only settings its API can take. A
    setting it cannot take is refused rather than dropped, so no comparison silently differs
    from what was asked."""
    at = f"candidates[{i}]"
    problem = endpoint_model_problem(candidate.model, settings.endpoints)
    parsed = parse_endpoint_model(candidate.model)
    if problem or parsed is None:
        return [FieldProblem(f"{at}.model", problem or "not an endpoint model")]
    endpoint = settings.endpoints[parsed[0]]
    on = f"endpoint {endpoint.name!r} ({endpoint.api} API)"
    gen, defaults = candidate.generation, GenerationConfig()
    problems: list[FieldProblem] = []
    if candidate.revision is not None:
        problems.append(
            FieldProblem(
                f"{at}.revision",
                f"{on} serves its own models: leave revision out and name the model in the model id",
            )
        )
    if gen.top_k != defaults.top_k:
        problems.append(
            FieldProblem(
                f"{at}.generation.top_k",
                f"{on} takes no top_k: leave it at its default ({defaults.top_k}) and use top_p, or "
                "compare on a local model",
            )
        )
    if gen.repetition_penalty != defaults.repetition_penalty:
        problems.append(
            FieldProblem(
                f"{at}.generation.repetition_penalty",
                f"{on} takes no repetition_penalty: leave it at its default "
                f"({defaults.repetition_penalty:g}), or compare on a local model",
            )
        )
    if endpoint.api == "completions" and candidate.use_chat_template is True:
        problems.append(
            FieldProblem(
                f"{at}.use_chat_template",
                f"{on} sends the rendered prompt as it is, with no chat template: set it to 'auto' or "
                "false, or use an endpoint whose api is chat",
            )
        )
    if endpoint.api == "chat" and candidate.use_chat_template is False:
        problems.append(
            FieldProblem(
                f"{at}.use_chat_template",
                f"{on} always applies the server's chat template: set it to 'auto' or true, or use an "
                "endpoint whose api is completions",
            )
        )
    return problems


def _check_endpoint_metrics(spec: ComparisonCreate, registry: dict[str, MetricInfo]) -> list[FieldProblem]:
    """Metrics counted with the candidate's tokenizer: endpoint candidates have none, and get only
    the counts their server reports in its usage (ENDPOINT_USAGE_METRICS)."""
    endpoints = [
        (i, c.label)
        for i, c in enumerate(spec.candidates)
        if classify_model(c.model).kind is SourceKind.endpoint
    ]
    if not endpoints or spec.metrics is None:
        return []
    problems: list[FieldProblem] = []
    for j, name in enumerate(spec.metrics):
        info = registry.get(name)
        if info is None or not info.needs_tokenizer or name in ENDPOINT_USAGE_METRICS:
            continue
        i, label = endpoints[0]
        problems.append(
            FieldProblem(
                f"metrics[{j}]",
                f"{name} is counted with the candidate's own tokenizer, which endpoint candidate "
                f"candidates[{i}] ({label!r}) does not have; endpoints report only "
                f"{', '.join(sorted(ENDPOINT_USAGE_METRICS))}: drop the metric or the candidate",
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
        problems += _check_row_cells(i, row, settings)
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str | int | float):
            problems.append(
                FieldProblem(f"dataset.rows[{i}].reference", "reference must be a string when given")
            )
        if len(problems) >= 20:
            break
    return problems


# Column names become template placeholders, CSV headers and MLflow table columns.
MAX_COLUMN_NAME_CHARS = 200


def _check_row_cells(i: int, row: dict[str, Any], settings: Settings) -> list[FieldProblem]:
    """Every cell of a row: a scalar, finite, storable and at most MAX_CELL_CHARS long. Each cell
    is stored in Redis, rendered into prompts and sent to MLflow with every candidate."""
    if len(row) > settings.max_columns:
        return [
            FieldProblem(
                f"dataset.rows[{i}]",
                f"{len(row)} columns; at most {settings.max_columns} (setting MAX_COLUMNS)",
            )
        ]
    problems: list[FieldProblem] = []
    for name, value in row.items():
        field = f"dataset.rows[{i}].{name}"
        if len(name) > MAX_COLUMN_NAME_CHARS or text_problem(name) is not None:
            problems.append(
                FieldProblem(
                    f"dataset.rows[{i}]",
                    f"column names are text of at most {MAX_COLUMN_NAME_CHARS} characters without NUL "
                    "or unpaired surrogates",
                )
            )
        elif isinstance(value, str):
            if len(value) > settings.max_cell_chars:
                problems.append(
                    FieldProblem(
                        field,
                        f"at most {settings.max_cell_chars} characters "
                        f"(setting MAX_CELL_CHARS; got {len(value)})",
                    )
                )
            elif problem := text_problem(value):
                problems.append(FieldProblem(field, problem))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(FieldProblem(field, "must be a finite number"))
        elif value is not None and not isinstance(value, bool | int | float):
            problems.append(
                FieldProblem(
                    field,
                    "cells are text, numbers, booleans or null; send a nested value as a JSON string",
                )
            )
    return problems


def _check_prompts(spec: ComparisonCreate, settings: Settings) -> list[FieldProblem]:
    """Templates and system prompts go into every row's prompt: bound them on their own too, so
    the refusal names them rather than each row."""
    problems: list[FieldProblem] = []
    limit = settings.max_prompt_chars
    for i, candidate in enumerate(spec.candidates):
        for name in ("prompt_template", "system_prompt"):
            value = getattr(candidate, name)
            if value is not None and len(value) > limit:
                problems.append(
                    FieldProblem(
                        f"candidates[{i}].{name}",
                        f"at most {limit} characters (setting MAX_PROMPT_CHARS; got {len(value)}): it "
                        "is part of every row's prompt",
                    )
                )
    return problems


def _check_rendered_prompts(spec: ComparisonCreate, settings: Settings) -> list[FieldProblem]:
    """Each prompt as a worker renders it (template filled with the row, plus the system prompt)
    within MAX_PROMPT_CHARS; one problem per candidate, naming its first row over the limit."""
    problems: list[FieldProblem] = []
    limit = settings.max_prompt_chars
    for i, candidate in enumerate(spec.candidates):
        length = PromptLength(candidate.prompt_template, candidate.system_prompt)
        over = [
            (j, chars)
            for j, row in enumerate(spec.dataset.rows)
            if (chars := length.exceeds(row, limit)) is not None
        ]
        if not over:
            continue
        j, chars = over[0]
        parts = "prompt_template" + (" and system_prompt" if candidate.system_prompt else "")
        more = f" ({len(over) - 1} more rows are over it too)" if len(over) > 1 else ""
        problems.append(
            FieldProblem(
                f"dataset.rows[{j}]",
                f"rendered with candidates[{i}].{parts} this row's prompt is {chars} characters; at "
                f"most {limit} (setting MAX_PROMPT_CHARS): shorten the row or the template{more}",
            )
        )
    return problems


# MLflow's own rules for tags (mlflow/utils/validation.py: MAX_ENTITY_KEY_LENGTH,
# MAX_TAG_VAL_LENGTH, validate_param_and_metric_name, path_not_unique): a tag it refuses would
# fail the comparison on a worker after it was queued. The gateway does not import mlflow.
TAG_KEY_MAX_CHARS = 250
TAG_VALUE_MAX_CHARS = 8000
_TAG_KEY = re.compile(r"^[/\w.\- :]*$")
# mlflow.* steer the MLflow UI and run hierarchy (mlflow.runName, mlflow.parentRunId); the
# service finds its own runs by llm_compare.*.
RESERVED_TAG_PREFIXES = ("mlflow.", "llm_compare.")


def _check_tags(tags: dict[str, str]) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    for key, value in tags.items():
        field = f"tags.{key}"
        if not key.strip():
            problems.append(FieldProblem("tags", "tag keys must not be empty or blank"))
        elif len(key) > TAG_KEY_MAX_CHARS:
            problems.append(
                FieldProblem(field, f"tag keys are at most {TAG_KEY_MAX_CHARS} characters (got {len(key)})")
            )
        elif not _TAG_KEY.match(key):
            problems.append(
                FieldProblem(
                    field,
                    "tag keys hold only letters, digits, '_', '-', '.', ' ', ':' and '/' (MLflow's rule)",
                )
            )
        elif key.startswith(RESERVED_TAG_PREFIXES):
            problems.append(
                FieldProblem(
                    field,
                    "tag keys starting with 'mlflow.' or 'llm_compare.' are reserved for MLflow and "
                    "this service; choose another key",
                )
            )
        elif _resolves_elsewhere(key):
            problems.append(
                FieldProblem(
                    field,
                    "MLflow treats tag keys as paths: no leading '/', no '.', '..' or '//' parts, no "
                    "trailing '/'",
                )
            )
        if len(value) > TAG_VALUE_MAX_CHARS:
            problems.append(
                FieldProblem(
                    field, f"tag values are at most {TAG_VALUE_MAX_CHARS} characters (got {len(value)})"
                )
            )
    return problems


def _resolves_elsewhere(key: str) -> bool:
    normal = posixpath.normpath(key)
    return normal != key or normal == "." or normal.startswith(("..", "/"))


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
        # The same translation the worker runs it with (shared/patterns.py): a pattern that
        # needs backtracking is refused here instead of stalling a worker.
        problem = pattern_problem(spec.regex)
        if problem is not None:
            problems.append(FieldProblem("regex", problem))
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
