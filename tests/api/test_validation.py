"""Submit-time checks of what a candidate may load and which patterns may run, called directly
with the settings an operator would give (the HTTP path is covered in test_http_api.py)."""

from __future__ import annotations

from typing import Any

import pytest

from services.api.errors import InvalidComparison
from services.api.validation import validate_comparison
from shared.schemas import ComparisonCreate
from shared.settings import Settings


def spec(*models: str, **extra: Any) -> ComparisonCreate:
    return ComparisonCreate.model_validate(
        {
            "candidates": [{"label": f"c{i}", "model": model} for i, model in enumerate(models)],
            "dataset": {"rows": [{"input": "What is the capital of France?", "reference": "Paris"}]},
            "metrics": ["output_words"],
            **extra,
        }
    )


def problems(comparison: ComparisonCreate, settings: Settings) -> dict[str, str]:
    with pytest.raises(InvalidComparison) as refused:
        validate_comparison(comparison, settings)
    return {f.field: f.message for f in refused.value.fields}


class TestMlflowModels:
    def test_allowlisted_registered_names_are_accepted(self):
        settings = Settings(mlflow_model_allowlist=["vetted"])
        comparison = spec("models:/vetted/3", "models:/vetted@champion", "models:/vetted/latest")
        assert validate_comparison(comparison, settings) == ["output_words"]

    def test_nothing_is_accepted_by_default(self):
        found = problems(spec("smollm2-135m-instruct", "models:/vetted/3"), Settings())
        assert "MLFLOW_MODEL_ALLOWLIST" in found["candidates[1].model"]

    def test_an_unlisted_name_and_run_uris_are_refused(self):
        settings = Settings(mlflow_model_allowlist=["vetted"])
        found = problems(spec("models:/other/1", "runs:/0123abcd/model", "models:/vetted/Staging"), settings)
        assert "'other' is not on the operator's allowlist (vetted)" in found["candidates[0].model"]
        assert "runs:/ URIs are not accepted" in found["candidates[1].model"]
        assert "models:/<name>/<version>" in found["candidates[2].model"]


class TestHubIds:
    @pytest.mark.parametrize("model", ["hf:/etc", "hf:/etc/passwd", "hf:../models", "hf:a/b/c", "org/.."])
    def test_text_that_is_not_a_hub_id_is_refused(self, model):
        found = problems(spec("smollm2-135m-instruct", model), Settings())
        assert "is not a Hugging Face hub id" in found["candidates[1].model"]

    def test_hub_ids_are_accepted(self):
        comparison = spec("hf:gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct")
        assert validate_comparison(comparison, Settings()) == ["output_words"]

    def test_a_revision_that_is_a_path_is_refused(self):
        comparison = ComparisonCreate.model_validate(
            {
                "candidates": [
                    {"label": "a", "model": "hf:gpt2", "revision": "../../snapshots/x"},
                    {"label": "b", "model": "hf:gpt2", "revision": "main"},
                ],
                "dataset": {"rows": [{"input": "q"}]},
                "metrics": ["output_words"],
            }
        )
        found = problems(comparison, Settings())
        assert set(found) == {"candidates[0].revision"}


class TestRegex:
    def test_a_pattern_needing_backtracking_is_refused_saying_what(self):
        found = problems(spec("hf:gpt2", "hf:gpt2", regex=r"(\w+) \1"), Settings())
        assert found["regex"].startswith(r"backreferences (\1, (?P=name)) are not supported")

    def test_lookaround_is_refused(self):
        found = problems(spec("hf:gpt2", "hf:gpt2", regex=r"\d+(?= dollars)"), Settings())
        assert "lookahead" in found["regex"]

    def test_the_catastrophic_pattern_is_accepted_since_it_runs_in_linear_time(self):
        comparison = spec("hf:gpt2", "hf:gpt2", regex=r"^(\w+\s?)*$", metrics=["regex_match"])
        assert validate_comparison(comparison, Settings()) == ["regex_match"]
