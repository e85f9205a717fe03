"""Response-cache keys, one per row, for local models (response_cache.py) and remote endpoints
(remote.py) alike. Light on purpose: the I/O workers import it without torch."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any


def row_keys(base: dict[str, Any], prompts: list[str], *, do_sample: bool) -> list[str]:
    """A key per prompt: a hash of ``base`` (what decides the output besides the prompt) and the
    prompt. When sampling, repeated prompts are told apart by which occurrence in the dataset
    each row is, so each gets its own sample; greedy rows with one prompt share one output."""
    seen: Counter[str] = Counter()
    keys = []
    for prompt in prompts:
        sample_index = seen[prompt] if do_sample else 0
        seen[prompt] += 1
        payload = json.dumps({**base, "prompt": prompt, "sample": sample_index}, sort_keys=True)
        keys.append(hashlib.sha256(payload.encode()).hexdigest())
    return keys
