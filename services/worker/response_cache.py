"""Generated outputs cached in Redis, keyed by everything that decides them.

Re-running a comparison, or adding a candidate to one already run, generates only what is new.
The key covers the model as loaded (``LoadedModel.resolved``: the hub commit, the GGUF file's
hash, a local directory's file fingerprint, the registry version number), dtype, the
generation settings, template, system prompt, the rendered prompt, and, when sampling, which
occurrence of that prompt in the dataset the row is (so repeated prompts get their own samples).
A cached row keeps the latency measured when it was generated.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from services.worker.cache_keys import row_keys
from services.worker.generation import Generated
from services.worker.models import LoadedModel
from shared.schemas import CandidateSpec
from shared.store import ComparisonStore

# 2: latency_s is the row's own latency. Entries written before held their batch's average,
# which would make the rows served from them look alike again; a new version leaves them unread.
# 3: local directories are keyed by a fingerprint of their files and registry models by version
# number, where entries before held only the name: replaced weights reused old outputs.
KEY_VERSION = 3


def cache_keys(*, candidate: CandidateSpec, loaded: LoadedModel, prompts: list[str], chat: bool) -> list[str]:
    base = {
        "v": KEY_VERSION,
        "source": loaded.source.kind.value,
        "model": loaded.source.value,
        "resolved": loaded.resolved,
        "dtype": loaded.dtype,
        "generation": candidate.generation.model_dump(),
        "template": candidate.prompt_template,
        "system_prompt": candidate.system_prompt,
        "chat": chat,
    }
    return row_keys(base, prompts, do_sample=candidate.generation.do_sample)


class ResponseCache:
    """Generated outputs by key digest; the Redis keys themselves belong to the store."""

    def __init__(self, store: ComparisonStore, *, ttl_s: int):
        self.store = store
        self.ttl_s = ttl_s

    def get_many(self, digests: list[str]) -> list[Generated | None]:
        found = self.store.cached_responses(digests)
        return [None if raw is None else Generated(**json.loads(raw)) for raw in found]

    def put_many(self, items: dict[str, Generated]) -> None:
        self.store.cache_responses(
            {digest: json.dumps(asdict(generated)) for digest, generated in items.items()}, ttl_s=self.ttl_s
        )
