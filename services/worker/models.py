"""Loading a candidate's model and tokenizer, from whatever source its ``model`` string names.

Everything here runs inside a worker process (never at import time, never in a prefork parent:
CUDA does not survive a fork). Loaded models are kept in a small per-process cache so that
several candidates or comparisons on the same model load it once.

Nothing a request names may run code here: every load passes ``trust_remote_code=False``, hub
ids are checked to be hub ids (transformers loads any existing directory it is given), and
MLflow models are read as files (never through ``mlflow.transformers.load_model``, which puts
the logged ``code/`` folder on ``sys.path`` and trusts remote code for classes transformers
does not know).
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
from shared.sources import (
    MlflowModelRef,
    ModelSource,
    SourceKind,
    classify_model,
    hub_id_problem,
    is_under_roots,
    mlflow_model_problem,
    parse_mlflow_model,
    revision_problem,
)

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
    # False when what was loaded cannot be pinned down (a hub load without a commit hash): its
    # outputs are then neither served from nor written to the response cache.
    cacheable: bool = True

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    return "cpu", torch.float32


# Digests by (path, size, mtime): a file is read again only once it has changed.
_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _digests_lock:
        _digests[key] = digest.hexdigest()
    return _digests[key]


# Files up to this size are hashed whole; bigger ones (weights) count by size and mtime.
HASHED_FILE_MAX_BYTES = 16 * 1024 * 1024


def directory_fingerprint(path: Path) -> str:
    """What a local model directory holds, cheaply: every file's relative path, and for small
    files (configs, tokenizers, chat templates) their content hash, for big ones (weights) their
    size and modification time.

    Hashing the weights themselves would cost seconds to minutes per load on every run, each
    time the worker checks whether its loaded copy is still current. Any ordinary replacement
    (save_pretrained, cp, rsync, an unpacked archive) writes new files with new mtimes, so size
    plus mtime catches it; what it misses is a rewrite that keeps both size and mtime on purpose
    (``touch -d`` after writing). Copies made with ``cp -p`` or ``rsync -a`` keep mtimes, so two
    hosts holding the same files still share response-cache entries. Small files are hashed,
    cached by mtime, because a changed chat template or tokenizer changes outputs too.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        if stat.st_size <= HASHED_FILE_MAX_BYTES:
            part = _sha256(file)
        else:
            part = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{file.relative_to(path).as_posix()}\0{part}\n".encode())
    return digest.hexdigest()


def _local_dir_resolved(path: Path) -> str:
    return f"{path} files:{directory_fingerprint(path)[:16]}"


def _gguf_resolved(path: Path) -> str:
    return f"{path} sha256:{_sha256(path)[:16]}"


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
    # Code shipped with a model (auto_map in its config) never runs here.
    kwargs: dict[str, Any] = {"trust_remote_code": False}
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


def _check_hub_id(hub_id: str, revision: str | None) -> None:
    # The gateway checked both; a request queued before an upgrade, or sent around it, was not.
    problem = hub_id_problem(hub_id) or (revision_problem(revision) if revision is not None else None)
    if problem is not None:
        raise ModelLoadError(problem)
    # from_pretrained loads a directory of that name relative to the working directory first.
    if Path(hub_id).exists():
        raise ModelLoadError(
            f"{hub_id!r} names a path on worker {os.uname().nodename}, not only a hub id; give local "
            "models as absolute paths under MODEL_ROOTS"
        )


def _mlflow_client(settings: Settings) -> Any:
    from mlflow.tracking import MlflowClient

    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mlflow_version(uri: str, settings: Settings) -> Any:
    """The registry's model version an allowlisted ``models:/`` URI names right now."""
    problem = mlflow_model_problem(uri, settings.mlflow_model_allowlist)
    ref = parse_mlflow_model(uri)
    # The gateway checked this at submit time; the allowlist may have shrunk since.
    if problem is not None or ref is None:
        raise ModelLoadError(problem or f"{uri!r} is not a registered model URI")
    from services.worker.tracking import unavailable_as_transient  # imports mlflow: only when used

    client = _mlflow_client(settings)
    # The server's own trouble (unreachable, 5xx) is transient: the task retries it.
    with unavailable_as_transient():
        return _registry_version(client, uri, ref)


def _registry_version(client: Any, uri: str, ref: MlflowModelRef) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version == "latest":
            versions = client.search_model_versions(f"name = '{ref.name}'")
            if not versions:
                raise ModelLoadError(f"registered model {ref.name!r} has no versions")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelLoadError(f"{uri}: {exc.message}") from exc
        raise


def _mlflow_resolved(name: str, version: Any) -> str:
    # A version number is immutable, but a deleted and re-created model starts again at 1:
    # the source it was registered from tells those apart.
    return f"models:/{name}/{version.version} source:{version.source}"


def _inside(root: Path, relative: object, what: str) -> Path:
    target = (root / str(relative)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ModelLoadError(f"the logged model's {what} path {relative!r} leaves the model's folder")
    if not target.is_dir():
        raise ModelLoadError(f"the logged model has no {what} folder ({relative})")
    return target


def _load_logged_transformers(root: Path) -> tuple[Any, Any]:
    """A transformers model logged to MLflow, read from its downloaded files alone.

    The flavour's own loader is not used: it prepends the logged ``code/`` folder to sys.path
    and loads with trust_remote_code=True whenever the logged class is not a transformers class,
    which lets whoever logged the model run code on the worker. Here the ``code/`` folder is
    ignored, only classes transformers ships are accepted, nothing is fetched from the hub and
    weights must be safetensors (no pickle).
    """
    import transformers
    import yaml
    from transformers import AutoConfig, AutoTokenizer

    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"the logged model has no readable MLmodel file: {exc}") from exc
    flavor = (mlmodel.get("flavors") or {}).get("transformers") if isinstance(mlmodel, dict) else None
    if not isinstance(flavor, dict):
        raise ModelLoadError("the logged model was not logged with the transformers flavour")
    if flavor.get("source_model_revision") or flavor.get("local_base_model_path"):
        raise ModelLoadError(
            "the logged model holds no weights of its own (logged with save_pretrained=False or a "
            "local base model); log it with its weights"
        )
    if flavor.get("peft_adaptor"):
        raise ModelLoadError("PEFT adapters logged to MLflow are not supported; log the merged model")
    for key in ("pipeline_model_type", "tokenizer_type"):
        class_name = str(flavor.get(key) or "")
        if not class_name or not hasattr(transformers, class_name):
            raise ModelLoadError(
                f"the logged model's {key.split('_')[0]} class {class_name!r} is not a transformers "
                "class; loading it would run code logged with the model, which workers never do"
            )
    if flavor.get("code"):
        log.info("model.mlflow_code_ignored", code=str(flavor["code"]))
    model_dir = _inside(root, flavor.get("model_binary", "model"), "model")
    tokenizer_dir = _inside(root, "components/tokenizer", "tokenizer")
    safe: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **safe)
    config = AutoConfig.from_pretrained(str(model_dir), **safe)
    device, dtype = pick_device()
    model: Any = _auto_class(config).from_pretrained(
        str(model_dir), config=config, dtype=dtype, use_safetensors=True, **safe
    )
    return model.to(device).eval(), tokenizer


def _load_mlflow(uri: str, settings: Settings) -> tuple[Any, Any, str]:
    import tempfile

    import mlflow.artifacts

    from services.worker.tracking import unavailable_as_transient

    version = _mlflow_version(uri, settings)
    ref = parse_mlflow_model(uri)
    assert ref is not None  # _mlflow_version refuses anything else
    with tempfile.TemporaryDirectory(prefix="llmc-mlflow-") as tmp, unavailable_as_transient():
        # Where the version's files are, asked of our registry. Handing "models:/…" itself to
        # download_artifacts would let MLflow resolve it with a client of the process-wide default
        # URI (a ./mlflow.db in the worker's directory), whatever registry_uri says.
        files = _mlflow_client(settings).get_model_version_download_uri(ref.name, version.version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=files, dst_path=tmp, tracking_uri=settings.mlflow_tracking_uri
        )
        model, tokenizer = _load_logged_transformers(Path(local))
    return model, tokenizer, _mlflow_resolved(ref.name, version)


def load_model(model: str, *, revision: str | None, settings: Settings) -> LoadedModel:
    source = classify_model(model)
    if source.kind is SourceKind.endpoint:
        # Its outputs come from the remote endpoint (services/worker/remote.py): nothing to load.
        raise ModelLoadError(f"{model!r} is served by a remote endpoint and is not loaded by a worker")
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
        cacheable = True
        if packaged is not None:
            digest = _sha256(packaged)
            model, tokenizer = _load_gguf(packaged, digest, settings)
            resolved = f"{packaged.name} sha256:{digest[:16]}"
            kind_detail = "gguf-package"
        elif entry.hub_id:
            model, tokenizer = _from_pretrained(entry.hub_id, revision=revision)
            resolved, cacheable = _hub_resolved(entry.hub_id, model, revision)
            kind_detail = "hub"
        else:
            raise ModelLoadError(f"catalog entry {entry.name!r} has neither packaged weights nor a hub id")
        params = {"catalog_source": kind_detail}
    elif source.kind is SourceKind.hub:
        _check_hub_id(source.value, revision)
        model, tokenizer = _from_pretrained(source.value, revision=revision)
        resolved, cacheable = _hub_resolved(source.value, model, revision)
        params = {}
    elif source.kind is SourceKind.gguf_file:
        path = _check_local(source.value, settings, want_file=True)
        digest = _sha256(path)
        model, tokenizer = _load_gguf(path, digest, settings)
        resolved = _gguf_resolved(path)
        params = {}
        cacheable = True
    elif source.kind is SourceKind.local_dir:
        path = _check_local(source.value, settings, want_file=False)
        # Fingerprinted before loading: a directory rewritten meanwhile keys the next run apart.
        # A directory that is no model (no config.json; a whole model root, say) is not walked:
        # loading it fails below.
        resolved = _local_dir_resolved(path) if (path / "config.json").is_file() else str(path)
        model, tokenizer = _from_pretrained(str(path))
        params = {}
        cacheable = True
    else:
        model, tokenizer, resolved = _load_mlflow(source.value, settings)
        params = {}
        cacheable = True
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
        cacheable=cacheable,
    )


def _hub_resolved(hub_id: str, model: Any, revision: str | None) -> tuple[str, bool]:
    """The hub commit that was loaded, and whether it is known: a branch name alone (main)
    moves, so outputs generated from it must not be reused once it has."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return f"{hub_id}@{commit}", True
    return f"{hub_id}@{revision or 'main'}", False


def current_resolution(model: str, *, settings: Settings) -> str | None:
    """What ``model`` would resolve to if loaded now, for sources that can change under the
    same name (local directories and files, registry versions by ``latest`` or alias); None
    for the others. Cheap: file stats, small-file hashes cached by mtime, one registry call."""
    source = classify_model(model)
    if source.kind is SourceKind.local_dir:
        return _local_dir_resolved(_check_local(source.value, settings, want_file=False))
    if source.kind is SourceKind.gguf_file:
        return _gguf_resolved(_check_local(source.value, settings, want_file=True))
    if source.kind is SourceKind.mlflow:
        ref = parse_mlflow_model(source.value)
        if ref is not None and ref.version != "latest" and ref.alias is None:
            return None  # a version number never moves
        version = _mlflow_version(source.value, settings)
        return _mlflow_resolved(ref.name if ref else source.value, version)
    return None


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
                cached = self._models[key]
                if self._still_current(model, cached, settings):
                    self._models.move_to_end(key)
                    return cached
                # Same name, other weights (a rewritten directory, a new registry version):
                # serving the old copy would label old outputs with the new files.
                log.info("model.changed", model=model, was=cached.resolved)
                del self._models[key]
                self._sizes.pop(key, None)
                _release(cached)
            loaded = load_model(model, revision=revision, settings=settings)
            self._models[key] = loaded
            self._sizes[key] = model_bytes(loaded)
            budget = self.max_bytes if self.max_bytes is not None else settings.model_cache_max_bytes
            while len(self._models) > 1 and sum(self._sizes.values()) > budget:
                evicted_key, evicted = self._models.popitem(last=False)
                log.info("model.evicted", model=evicted_key[0], freed_bytes=self._sizes.pop(evicted_key))
                _release(evicted)
            return loaded

    @staticmethod
    def _still_current(model: str, cached: LoadedModel, settings: Settings) -> bool:
        try:
            current = current_resolution(model, settings=settings)
        except (ModelLoadError, OSError):
            return False  # gone or unreadable now: loading again reports why
        return current is None or current == cached.resolved

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
