"""Loading candidates from each kind of source the worker supports (no hub here)."""

from __future__ import annotations

import os

import pytest

from services.worker.models import ModelCache, ModelLoadError, load_model, model_bytes
from shared.settings import Settings


@pytest.fixture(scope="module")
def settings(model_root):
    return Settings(model_roots=[model_root])


def test_local_causal_directory(tiny_models, settings):
    loaded = load_model(str(tiny_models["causal"]), revision=None, settings=settings)
    assert loaded.source.kind.value == "local_dir"
    assert loaded.resolved == str(tiny_models["causal"].resolve())
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


def test_mlflow_runs_uri(tiny_models, settings, tmp_path, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Other tests may have left an active experiment of another tracking server in this process.
    mlflow.set_experiment("model-loading")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["causal"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["causal"])
    with mlflow.start_run() as run:
        # Explicit requirements: the inferred ones would ask for torchvision, which is not installed.
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=["torch", "transformers"],
        )
    loaded = load_model(f"runs:/{run.info.run_id}/model", revision=None, settings=settings)
    assert loaded.source.kind.value == "mlflow"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.pad_token == "<pad>"
    mlflow.set_tracking_uri(None)


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
