"""Loading a candidate's model and tokenizer, from whatever source its ``model`` string names.

Everything here runs inside a worker process (never at import time, never in a prefork parent:
CUDA does not survive a fork). Loaded models are kept in a small per-process cache so that
several candidates or comparisons on the same model load it once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog

from shared.catalog import CATALOG
from shared.settings import Settings
from shared.sources import ModelSource, SourceKind, classify_model, is_under_roots

log = structlog.get_logger()


class ModelLoadError(Exception):
    """The model cannot be loaded from what the request names: retrying will not help."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    # What exactly was loaded: a hub commit, a GGUF file and its hash, a directory, an MLflow URI.
    resolved: str
    device: str
    dtype: str
    is_seq2seq: bool
    params: dict[str, str] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    return "cpu", torch.float32


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_local(path_text: str, settings: Settings, *, want_file: bool) -> Path:
    path = Path(path_text).expanduser()
    resolved = path.resolve()
    # The gateway checked the path as text; symlinks can only be resolved here, on the worker.
    if not is_under_roots(str(resolved), [str(r) for r in settings.model_roots]):
        raise ModelLoadError(f"{path} resolves to {resolved}, outside the model roots {settings.model_roots}")
    if want_file and not resolved.is_file():
        raise ModelLoadError(f"model file {path} does not exist on worker {os.uname().nodename}")
    if not want_file and not resolved.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist on worker {os.uname().nodename}")
    return resolved


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _from_pretrained(
    where: str, *, revision: str | None = None, gguf_file: str | None = None
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device()
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    # HF_TOKEN and HF_HUB_OFFLINE are read by huggingface_hub itself.
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    # A GGUF file carries no separate config to peek at; all GGUF text models here are causal.
    model_class = (
        AutoModelForCausalLM if gguf_file else _auto_class(AutoConfig.from_pretrained(where, **kwargs))
    )
    model: Any = model_class.from_pretrained(where, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def _gguf_cache_dir(gguf_path: Path, digest: str, settings: Settings) -> Path:
    return settings.model_cache_dir / f"{gguf_path.stem}-{digest[:16]}"


def converted_gguf_dir(gguf_path: Path, settings: Settings) -> Path:
    """Where the de-quantised copy of a GGUF file lives (it exists once the file has been loaded)."""
    return _gguf_cache_dir(gguf_path, _sha256(gguf_path), settings)


def _load_gguf(gguf_path: Path, digest: str, settings: Settings) -> tuple[Any, Any]:
    """Load a GGUF file through a de-quantised copy kept on disk.

    Parsing and de-quantising the GGUF (and rebuilding its tokenizer) takes most of a minute on
    two cores; the converted folder loads in seconds, so each file is converted once per host.
    """
    cached = _gguf_cache_dir(gguf_path, digest, settings)
    if (cached / "config.json").is_file():
        return _from_pretrained(str(cached))
    model, tokenizer = _from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        _write_converted(model, tokenizer, cached)
    except OSError as exc:  # a read-only or full cache only costs speed
        log.warning("model.cache_write_failed", path=str(cached), error=str(exc))
    return model, tokenizer


def _write_converted(model: Any, tokenizer: Any, target: Path) -> None:
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        # transformers refuses save_pretrained on a GGUF-loaded model, and safetensors refuses
        # shared tensors: tied output embeddings are rebuilt from the input embeddings on load.
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2))
        try:
            staging.rename(target)  # atomic: a concurrent worker either sees all of it or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_mlflow(uri: str) -> tuple[Any, Any]:
    import mlflow.transformers

    components = mlflow.transformers.load_model(uri, return_type="components")
    device, dtype = pick_device()
    model = components["model"].to(device=device, dtype=dtype).eval()
    return model, components["tokenizer"]


def load_model(model: str, *, revision: str | None, settings: Settings) -> LoadedModel:
    source = classify_model(model)
    try:
        return _load(source, revision=revision, settings=settings)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        # transformers raises OSError for missing repos/files, ValueError/KeyError for configs it
        # does not understand, RuntimeError for weights that do not fit the architecture.
        raise ModelLoadError(f"could not load {model!r}: {type(exc).__name__}: {exc}") from exc


def _load(source: ModelSource, *, revision: str | None, settings: Settings) -> LoadedModel:
    device, dtype = pick_device()
    dtype_name = str(dtype).removeprefix("torch.")
    if source.kind is SourceKind.catalog:
        entry = CATALOG.get(source.value)
        if entry is None:
            raise ModelLoadError(f"unknown catalog name {source.value!r}")
        packaged = entry.packaged_path()
        if packaged is not None:
            digest = _sha256(packaged)
            model, tokenizer = _load_gguf(packaged, digest, settings)
            resolved = f"{packaged.name} sha256:{digest[:16]}"
            kind_detail = "gguf-package"
        elif entry.hub_id:
            model, tokenizer = _from_pretrained(entry.hub_id, revision=revision)
            resolved = f"{entry.hub_id}@{getattr(model.config, '_commit_hash', None) or revision or 'main'}"
            kind_detail = "hub"
        else:
            raise ModelLoadError(f"catalog entry {entry.name!r} has neither packaged weights nor a hub id")
        params = {"catalog_source": kind_detail}
    elif source.kind is SourceKind.hub:
        model, tokenizer = _from_pretrained(source.value, revision=revision)
        resolved = f"{source.value}@{getattr(model.config, '_commit_hash', None) or revision or 'main'}"
        params = {}
    elif source.kind is SourceKind.gguf_file:
        path = _check_local(source.value, settings, want_file=True)
        digest = _sha256(path)
        model, tokenizer = _load_gguf(path, digest, settings)
        resolved = f"{path} sha256:{digest[:16]}"
        params = {}
    elif source.kind is SourceKind.local_dir:
        path = _check_local(source.value, settings, want_file=False)
        model, tokenizer = _from_pretrained(str(path))
        resolved = str(path)
        params = {}
    else:
        model, tokenizer = _load_mlflow(source.value)
        resolved = source.value
        params = {}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device == "cpu" and settings.cpu_dtype != "float32":
        # Loaded (and, for GGUF, cached on disk) in fp32 first; the cast is a fraction of a second.
        import torch

        dtype = getattr(torch, settings.cpu_dtype)
        dtype_name = settings.cpu_dtype
        model = model.to(dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        resolved=resolved,
        device=device,
        dtype=dtype_name,
        is_seq2seq=bool(getattr(model.config, "is_encoder_decoder", False)),
        params=params,
    )


@lru_cache(maxsize=1)
def shared_model_cache() -> ModelCache:
    """The models this worker process keeps loaded, shared by candidates and local judges."""
    return ModelCache()


def model_bytes(loaded: LoadedModel) -> int:
    """Memory held by a model's weights and buffers."""
    model = loaded.model
    if model is None:
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Models kept loaded in this worker process within a memory budget, least recently used
    evicted first. The model just loaded always stays, even alone over the budget."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple[str, str | None], LoadedModel] = OrderedDict()
        self._sizes: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()

    def get(self, model: str, *, revision: str | None, settings: Settings) -> LoadedModel:
        key = (model, revision)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = load_model(model, revision=revision, settings=settings)
            self._models[key] = loaded
            self._sizes[key] = model_bytes(loaded)
            budget = self.max_bytes if self.max_bytes is not None else settings.model_cache_max_bytes
            while len(self._models) > 1 and sum(self._sizes.values()) > budget:
                evicted_key, evicted = self._models.popitem(last=False)
                log.info("model.evicted", model=evicted_key[0], freed_bytes=self._sizes.pop(evicted_key))
                _release(evicted)
            return loaded

    @property
    def loaded_keys(self) -> list[tuple[str, str | None]]:
        return list(self._models)

    def clear(self) -> None:
        with self._lock:
            while self._models:
                _release(self._models.popitem()[1])
            self._sizes.clear()


def _release(loaded: LoadedModel) -> None:
    import gc

    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
