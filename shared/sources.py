"""How a candidate's ``model`` string names its weights.

Used by the gateway (to refuse what cannot work before queueing) and by the worker (to load).
Local paths must be absolute (``/models/x``) or start with ``./`` or ``~``; a bare ``org/name``
is a Hugging Face hub id (``hf:gpt2`` names a hub id without an organisation); a bare name
without a slash is a catalog name.

MLflow model URIs are accepted only as ``models:/<name>/<version>``, ``models:/<name>/latest``
or ``models:/<name>@<alias>`` for registered names an operator lists in
``MLFLOW_MODEL_ALLOWLIST``: a logged model carries files a run chose (a ``code/`` folder,
configuration that names Python modules), and only names someone vetted may reach a worker.
``runs:/`` URIs are refused: any run of the tracking server could be named, and no allowlist of
names can cover it.

``endpoint:<endpoint-name>/<model-id>`` names a model served by a remote endpoint the operator
declared in ENDPOINTS_FILE (shared/endpoints.py); I/O workers generate its outputs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# One part of a hub id (the organisation or the name), as the hub allows it: letters, digits,
# "-", "_" and ".", at most 96, neither starting nor ending with "-" or ".".
_HUB_PART = re.compile(r"^[A-Za-z0-9_](?:[\w.\-]{0,94}[A-Za-z0-9_])?$", re.ASCII)
# Registered model names the allowlist can hold, and the version or alias that follows.
_MLFLOW_MODEL_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9][\w.\-]{0,199})"
    r"(?:/(?P<version>[1-9][0-9]{0,9}|latest)|@(?P<alias>[A-Za-z0-9][\w\-]{0,99}))$",
    re.ASCII,
)


# How a candidate names a model on a remote endpoint: endpoint:<endpoint-name>/<model-id>.
ENDPOINT_PREFIX = "endpoint:"


class SourceKind(StrEnum):
    catalog = "catalog"
    hub = "hub"
    local_dir = "local_dir"
    gguf_file = "gguf_file"
    mlflow = "mlflow"
    # A model on a remote endpoint from ENDPOINTS_FILE; value: "<endpoint-name>/<model-id>".
    endpoint = "endpoint"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    value: str


def classify_model(model: str) -> ModelSource:
    model = model.strip()
    if model.startswith(ENDPOINT_PREFIX):
        return ModelSource(SourceKind.endpoint, model.removeprefix(ENDPOINT_PREFIX))
    if model.startswith(("models:/", "runs:/")):
        return ModelSource(SourceKind.mlflow, model)
    if model.startswith("hf:"):
        return ModelSource(SourceKind.hub, model[3:])
    if model.startswith(("/", "./", "../", "~")):
        path = os.path.normpath(os.path.expanduser(model))
        kind = SourceKind.gguf_file if path.lower().endswith(".gguf") else SourceKind.local_dir
        return ModelSource(kind, path)
    if HUB_ID.match(model):
        return ModelSource(SourceKind.hub, model)
    return ModelSource(SourceKind.catalog, model)


def is_under_roots(path: str, roots: list[str]) -> bool:
    """Whether ``path`` lies inside one of ``roots``, judged on the normalised text.

    The gateway may not see the workers' disks, so this cannot resolve symlinks; the worker
    checks again on the resolved path before loading.
    """
    candidate = PurePosixPath(os.path.normpath(os.path.abspath(path)))
    for root in roots:
        root_path = PurePosixPath(os.path.normpath(os.path.abspath(root)))
        if candidate == root_path or root_path in candidate.parents:
            return True
    return False


def hub_id_problem(hub_id: str) -> str | None:
    """Why ``hub_id`` is not a Hugging Face hub id, or None.

    transformers loads any existing directory it is given, so text that reaches it as a hub id
    must not be able to name one: no leading "/", no "..", only the hub's characters.
    """
    parts = hub_id.split("/")
    if len(parts) > 2 or not all(_HUB_PART.match(part) for part in parts):
        return (
            f"{hub_id!r} is not a Hugging Face hub id: use 'name' or 'org/name' with letters, digits, "
            "'-', '_' and '.', at most 96 characters each, not starting or ending with '-' or '.'"
        )
    if any(".." in part or "--" in part for part in parts):
        return f"{hub_id!r} is not a Hugging Face hub id: '..' and '--' are not allowed"
    return None


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` is not a hub revision (branch, tag or commit), or None."""
    if (
        not revision
        or len(revision) > 200
        or revision.startswith("/")
        or ".." in revision
        or not re.fullmatch(r"[\w.\-/]+", revision, re.ASCII)
    ):
        return (
            f"{revision!r} is not a revision: give a branch, tag or commit hash (letters, digits, "
            "'-', '_', '.', '/'; no '..')"
        )
    return None


@dataclass(frozen=True)
class MlflowModelRef:
    """A registered model named by version number, by ``latest``, or by alias."""

    name: str
    version: str | None  # a number, or "latest"
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_mlflow_model(uri: str) -> MlflowModelRef | None:
    """The registered model a ``models:/`` URI names, or None when it is not one this service takes."""
    match = _MLFLOW_MODEL_URI.match(uri)
    if match is None:
        return None
    return MlflowModelRef(name=match["name"], version=match["version"], alias=match["alias"])


def mlflow_model_problem(uri: str, allowlist: list[str]) -> str | None:
    """Why an MLflow model URI may not be loaded here, or None."""
    if uri.startswith("runs:/"):
        return (
            "runs:/ URIs are not accepted: register the model and use models:/<name>/<version> (or "
            "@<alias>) with a name the operator lists in MLFLOW_MODEL_ALLOWLIST"
        )
    ref = parse_mlflow_model(uri)
    if ref is None:
        return (
            f"{uri!r} is not a registered model URI this service takes: use models:/<name>/<version>, "
            "models:/<name>/latest or models:/<name>@<alias>"
        )
    if ref.name not in allowlist:
        listed = ", ".join(sorted(allowlist)) if allowlist else "none are listed"
        return (
            f"registered model {ref.name!r} is not on the operator's allowlist ({listed}); an operator "
            "must add it to the setting MLFLOW_MODEL_ALLOWLIST"
        )
    return None
