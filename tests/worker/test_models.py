"""Loading candidates from each kind of source the worker supports (no hub here)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.stack import Stack, free_port
from services.worker.models import ModelCache, ModelLoadError, load_model, model_bytes
from shared.settings import Settings


@pytest.fixture(scope="module")
def settings(model_root):
    return Settings(model_roots=[model_root])


def test_local_causal_directory(tiny_models, settings):
    loaded = load_model(str(tiny_models["causal"]), revision=None, settings=settings)
    assert loaded.source.kind.value == "local_dir"
    # The directory and a fingerprint of what it holds (see test_response_cache.py).
    assert loaded.resolved.startswith(f"{tiny_models['causal'].resolve()} files:")
    assert (loaded.device, loaded.dtype, loaded.is_seq2seq) == ("cpu", "float32", False)
    assert loaded.has_chat_template


def test_cpu_dtype_bfloat16_casts_the_weights_and_generates(tiny_models, model_root):
    import torch

    from services.worker.generation import generate_outputs
    from shared.schemas import CandidateSpec

    settings = Settings(model_roots=[model_root], cpu_dtype="bfloat16")
    loaded = load_model(str(tiny_models["causal"]), revision=None, settings=settings)
    assert loaded.dtype == "bfloat16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    full = load_model(str(tiny_models["causal"]), revision=None, settings=Settings(model_roots=[model_root]))
    assert model_bytes(loaded) * 2 == model_bytes(full)
    candidate = CandidateSpec(label="b", model="m", generation={"max_new_tokens": 5})
    outputs = generate_outputs(
        candidate=candidate, loaded=loaded, prompts=["hello", "a longer prompt"], batch_size=2
    )
    assert [0 < g.output_tokens <= 5 for g in outputs] == [True, True]


def test_local_seq2seq_directory(tiny_models, settings):
    loaded = load_model(str(tiny_models["seq2seq"]), revision=None, settings=settings)
    assert loaded.is_seq2seq
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"


def test_missing_directory_is_a_readable_error(model_root, settings):
    with pytest.raises(ModelLoadError, match="does not exist on worker"):
        load_model(str(model_root / "no-such-model"), revision=None, settings=settings)


def test_symlink_escaping_the_roots_is_refused(model_root, settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = model_root / "sneaky"
    os.symlink(outside, link)
    with pytest.raises(ModelLoadError, match="outside the model roots"):
        load_model(str(link), revision=None, settings=settings)


def test_bad_weights_are_a_readable_error(model_root, settings):
    broken = model_root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(broken), revision=None, settings=settings)


def test_unreachable_hub_id_is_a_readable_error(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model", revision="main", settings=settings)


# ------------------------------------------------------------------------------ MLflow models
# Importing any of these writes the marker file: a test fails if one of them ever ran.
MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('imported: ' + __name__)\n"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory) -> Iterator[str]:
    stack = Stack(run_dir=tmp_path_factory.mktemp("models-mlflow"), mlflow_port=free_port())
    try:
        stack.start_mlflow()
        yield stack.mlflow_url
    finally:
        stack.stop()


@contextlib.contextmanager
def _logging_to(url: str) -> Iterator[None]:
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def _log_tiny(url: str, folder: Path, name: str, code: Path, seed: int = 0) -> str:
    """Log the tiny causal model from ``folder`` with ``code`` as its code path; register it."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    if seed:
        torch.manual_seed(seed)
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter)
    with _logging_to(url):
        mlflow.set_experiment("model-loading")
        with mlflow.start_run():
            # Explicit requirements: the inferred ones would ask for torchvision, not installed here.
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": AutoTokenizer.from_pretrained(folder)},
                name="model",
                task="text-generation",
                pip_requirements=["torch", "transformers"],
                code_paths=[str(code)],
            )
        return mlflow.register_model(info.model_uri, name).version


def _log_custom_class(url: str, folder: Path, name: str, code: Path, marker: Path, work: Path) -> None:
    """A logged model that says it needs its own Python class, shipped in its folder: the
    flavour's own loader imports that module (trust_remote_code=True)."""
    import mlflow
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = work / "custom-model"
    with _logging_to(url):
        mlflow.transformers.save_model(
            {
                "model": AutoModelForCausalLM.from_pretrained(folder),
                "tokenizer": AutoTokenizer.from_pretrained(folder),
            },
            path=str(saved),
            task="text-generation",
            pip_requirements=["torch", "transformers"],
            code_paths=[str(code)],
        )
        (saved / "model" / "llmc_marker_config.py").write_text(MARKER_CODE.format(marker=str(marker)))
        config_path = saved / "model" / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = ["LlmcMarkerForCausalLM"]
        config["auto_map"] = {
            "AutoConfig": "llmc_marker_config.LlmcMarkerConfig",
            "AutoModelForCausalLM": "llmc_marker_config.LlmcMarkerForCausalLM",
        }
        config_path.write_text(json.dumps(config))
        mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
        mlmodel["flavors"]["transformers"]["pipeline_model_type"] = "LlmcMarkerForCausalLM"
        (saved / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        mlflow.set_experiment("model-loading")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(saved), "model")
        mlflow.register_model(f"runs:/{run.info.run_id}/model", name)


@pytest.fixture(scope="module")
def registered(mlflow_url, tiny_models, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("logged")
    marker = work / "MARKER"
    code = work / "code"
    code.mkdir()
    (code / "llmc_marker_code.py").write_text(MARKER_CODE.format(marker=str(marker)))
    _log_tiny(mlflow_url, tiny_models["causal"], "tiny-llm", code)
    _log_custom_class(mlflow_url, tiny_models["causal"], "custom-code-llm", code, marker, work)
    assert not marker.exists()
    return {"marker": marker, "code": code}


def _mlflow_settings(url: str, model_root: Path, allow: list[str]) -> Settings:
    return Settings(model_roots=[model_root], mlflow_tracking_uri=url, mlflow_model_allowlist=allow)


def test_an_allowlisted_registered_model_loads_without_its_logged_code(mlflow_url, registered, model_root):
    settings = _mlflow_settings(mlflow_url, model_root, ["tiny-llm"])
    path_before = list(sys.path)
    loaded = load_model("models:/tiny-llm/1", revision=None, settings=settings)
    assert loaded.source.kind.value == "mlflow"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.pad_token == "<pad>"
    assert loaded.resolved.startswith("models:/tiny-llm/1 source:")
    # The logged code folder was neither put on the path nor imported.
    assert sys.path == path_before
    assert "llmc_marker_code" not in sys.modules
    assert not registered["marker"].exists()
    # "latest" resolves to that same version number.
    latest = load_model("models:/tiny-llm/latest", revision=None, settings=settings)
    assert latest.resolved == loaded.resolved


def test_a_logged_model_that_needs_its_own_code_is_refused_unrun(mlflow_url, registered, model_root):
    settings = _mlflow_settings(mlflow_url, model_root, ["custom-code-llm"])
    with pytest.raises(ModelLoadError, match="'LlmcMarkerForCausalLM' is not a transformers class"):
        load_model("models:/custom-code-llm/1", revision=None, settings=settings)
    assert not registered["marker"].exists()
    assert "llmc_marker_config" not in sys.modules


@pytest.mark.parametrize(
    ("uri", "allow", "message"),
    [
        ("models:/tiny-llm/1", [], "MLFLOW_MODEL_ALLOWLIST"),
        ("models:/tiny-llm/1", ["other-model"], "not on the operator's allowlist"),
        ("models:/tiny-llm/Production", ["tiny-llm"], "models:/<name>/<version>"),
        ("runs:/0123456789abcdef/model", ["tiny-llm"], "runs:/ URIs are not accepted"),
        ("models:/tiny-llm/99", ["tiny-llm"], "models:/tiny-llm/99"),
    ],
)
def test_the_worker_refuses_what_the_allowlist_does_not_cover(
    mlflow_url, registered, model_root, uri, allow, message
):
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_model(uri, revision=None, settings=_mlflow_settings(mlflow_url, model_root, allow))
    assert not registered["marker"].exists()


def test_a_new_registry_version_is_loaded_under_latest(mlflow_url, registered, tiny_models, model_root):
    settings = _mlflow_settings(mlflow_url, model_root, ["moving-llm"])
    _log_tiny(mlflow_url, tiny_models["causal"], "moving-llm", registered["code"])
    cache = ModelCache()
    first = cache.get("models:/moving-llm/latest", revision=None, settings=settings)
    assert first.resolved.startswith("models:/moving-llm/1 ")
    assert cache.get("models:/moving-llm/latest", revision=None, settings=settings) is first
    _log_tiny(mlflow_url, tiny_models["causal"], "moving-llm", registered["code"], seed=5)
    second = cache.get("models:/moving-llm/latest", revision=None, settings=settings)
    assert second.resolved.startswith("models:/moving-llm/2 ")
    assert first.model is None  # the old version was released, not served again
    assert not registered["marker"].exists()


# --------------------------------------------------------------------------------- hub ids
@pytest.mark.parametrize("hub_id", ["/etc", "/etc/passwd", "../models", "org/..", "a/b/c", "-x/y", "x/y."])
def test_text_that_is_not_a_hub_id_is_refused_before_loading(hub_id, settings):
    with pytest.raises(ModelLoadError, match="not a Hugging Face hub id"):
        load_model(f"hf:{hub_id}", revision=None, settings=settings)


def test_a_hub_id_that_names_a_local_directory_is_refused(tiny_models, settings, monkeypatch):
    # A valid hub id that also exists relative to the working directory: transformers would load
    # the directory, outside the model roots.
    monkeypatch.chdir(tiny_models["causal"].parent.parent)
    relative = f"{tiny_models['causal'].parent.name}/{tiny_models['causal'].name}"
    with pytest.raises(ModelLoadError, match="names a path on worker"):
        load_model(relative, revision=None, settings=settings)


def test_cache_keeps_models_and_evicts_least_recently_used(tiny_models, settings):
    causal_bytes = model_bytes(load_model(str(tiny_models["causal"]), revision=None, settings=settings))
    # 32-wide, 2-layer Llama over a 400-token vocabulary, fp32: embeddings and head dominate.
    assert 60_000 < causal_bytes < 400_000
    cache = ModelCache(max_bytes=causal_bytes + 1)  # room for one tiny model, not two
    first = cache.get(str(tiny_models["causal"]), revision=None, settings=settings)
    assert cache.get(str(tiny_models["causal"]), revision=None, settings=settings) is first
    cache.get(str(tiny_models["seq2seq"]), revision=None, settings=settings)
    assert first.model is None  # released
    again = cache.get(str(tiny_models["causal"]), revision=None, settings=settings)
    assert again is not first and again.model is not None


def test_cache_keeps_several_models_within_the_budget(tiny_models, settings):
    cache = ModelCache(max_bytes=10 * 1024**2)
    cache.get(str(tiny_models["causal"]), revision=None, settings=settings)
    cache.get(str(tiny_models["seq2seq"]), revision=None, settings=settings)
    assert [key[0] for key in cache.loaded_keys] == [str(tiny_models["causal"]), str(tiny_models["seq2seq"])]
    # Using the first again makes the second the least recently used.
    cache.get(str(tiny_models["causal"]), revision=None, settings=settings)
    assert cache.loaded_keys[0][0] == str(tiny_models["seq2seq"])
