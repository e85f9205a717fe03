"""Generated outputs cached in Redis, keyed by everything that decides them.

Re-running a comparison, or adding a candidate to one already run, generates only what is new.
The key covers the model as loaded (source and resolved revision or file hash), dtype, the
generation settings, template, system prompt, the rendered prompt, and, when sampling, which
occurrence of that prompt in the dataset the row is (so repeated prompts get their own samples).
A cached row keeps the latency measured when it was generated.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from typing import Any

from services.worker.generation import Generated
from services.worker.models import LoadedModel
from shared.schemas import CandidateSpec

# 2: latency_s is the row's own latency. Entries written before held their batch's average,
# which would make the rows served from them look alike again; a new version leaves them unread.
KEY_VERSION = 2


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
    seen: Counter[str] = Counter()
    keys = []
    for prompt in prompts:
        sample_index = seen[prompt] if candidate.generation.do_sample else 0
        seen[prompt] += 1
        payload = json.dumps({**base, "prompt": prompt, "sample": sample_index}, sort_keys=True)
        keys.append(hashlib.sha256(payload.encode()).hexdigest())
    return keys


class ResponseCache:
    def __init__(self, redis_client: Any, *, prefix: str, ttl_s: int):
        self.r = redis_client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, digest: str) -> str:
        return f"{self.prefix}:gen:{digest}"

    def get_many(self, digests: list[str]) -> list[Generated | None]:
        if not digests:
            return []
        found = self.r.mget([self._key(d) for d in digests])
        return [None if raw is None else Generated(**json.loads(raw)) for raw in found]

    def put_many(self, items: dict[str, Generated]) -> None:
        if not items:
            return
        pipe = self.r.pipeline(transaction=False)
        for digest, generated in items.items():
            pipe.set(self._key(digest), json.dumps(asdict(generated)), ex=self.ttl_s)
        pipe.execute()
