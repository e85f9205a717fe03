"""How a candidate's ``model`` string names its weights.

Used by the gateway (to refuse what cannot work before queueing) and by the worker (to load).
Local paths must be absolute (``/models/x``) or start with ``./`` or ``~``; a bare ``org/name``
is a Hugging Face hub id (``hf:gpt2`` names a hub id without an organisation); a bare name
without a slash is a catalog name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class SourceKind(StrEnum):
    catalog = "catalog"
    hub = "hub"
    local_dir = "local_dir"
    gguf_file = "gguf_file"
    mlflow = "mlflow"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    value: str


def classify_model(model: str) -> ModelSource:
    model = model.strip()
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
