from __future__ import annotations

import pytest

from shared.sources import (
    MlflowModelRef,
    SourceKind,
    classify_model,
    hub_id_problem,
    is_under_roots,
    mlflow_model_problem,
    parse_mlflow_model,
    revision_problem,
)


@pytest.mark.parametrize(
    ("model", "kind", "value"),
    [
        ("smollm2-135m-instruct", SourceKind.catalog, "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", SourceKind.hub, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("hf:gpt2", SourceKind.hub, "gpt2"),
        ("/models/tiny", SourceKind.local_dir, "/models/tiny"),
        ("/models/x/../tiny/", SourceKind.local_dir, "/models/tiny"),
        ("/models/smol.Q4_1.gguf", SourceKind.gguf_file, "/models/smol.Q4_1.gguf"),
        ("models:/my-model/3", SourceKind.mlflow, "models:/my-model/3"),
        ("runs:/abc123/model", SourceKind.mlflow, "runs:/abc123/model"),
    ],
)
def test_classify_model(model, kind, value):
    source = classify_model(model)
    assert (source.kind, source.value) == (kind, value)


@pytest.mark.parametrize(
    ("path", "roots", "inside"),
    [
        ("/models/tiny", ["/models"], True),
        ("/models", ["/models"], True),
        ("/models-evil/tiny", ["/models"], False),
        ("/models/../etc/passwd", ["/models"], False),
        ("/data/m", ["/models", "/data"], True),
        ("/etc", [], False),
    ],
)
def test_is_under_roots(path, roots, inside):
    assert is_under_roots(path, roots) is inside


@pytest.mark.parametrize("hub_id", ["gpt2", "org/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "a_b/c.d-e"])
def test_hub_ids_the_hub_allows(hub_id):
    assert hub_id_problem(hub_id) is None


@pytest.mark.parametrize(
    "hub_id",
    [
        "/etc",
        "/etc/passwd",
        "..",
        "../models",
        "org/..",
        "org/a..b",
        "a--b",
        "a/b/c",
        "-x",
        "x.",
        "",
        "a" * 97,
    ],
)
def test_text_that_could_name_a_directory_is_not_a_hub_id(hub_id):
    assert hub_id_problem(hub_id) is not None


@pytest.mark.parametrize(
    ("uri", "allow", "problem"),
    [
        ("models:/vetted/3", ["vetted"], None),
        ("models:/vetted/latest", ["vetted"], None),
        ("models:/vetted@champion", ["vetted"], None),
        ("models:/vetted/3", [], "MLFLOW_MODEL_ALLOWLIST"),
        ("models:/other/3", ["vetted"], "'other' is not on the operator's allowlist (vetted)"),
        ("runs:/abc123/model", ["vetted"], "runs:/ URIs are not accepted"),
        ("models:/vetted/Production", ["vetted"], "models:/<name>/<version>"),
        ("models:/vetted/3/model", ["vetted"], "models:/<name>/<version>"),
        ("models:/m-0123456789abcdef", ["vetted"], "models:/<name>/<version>"),
        ("models:/../3", [".."], "models:/<name>/<version>"),
    ],
)
def test_mlflow_models_only_by_allowlisted_registered_name(uri, allow, problem):
    found = mlflow_model_problem(uri, allow)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_registered_model_reference_reads_back_as_its_uri():
    assert parse_mlflow_model("models:/vetted@champion") == MlflowModelRef("vetted", None, "champion")
    assert parse_mlflow_model("models:/vetted/12").uri == "models:/vetted/12"
    assert parse_mlflow_model("runs:/x/model") is None


@pytest.mark.parametrize(
    "revision", ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"]
)
def test_revisions(revision):
    assert revision_problem(revision) is None


@pytest.mark.parametrize("revision", ["../../etc", "/abs", "a b", ""])
def test_revisions_that_are_paths_are_refused(revision):
    assert revision_problem(revision) is not None
