from __future__ import annotations

import pytest

from shared.sources import SourceKind, classify_model, is_under_roots


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
