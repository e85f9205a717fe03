"""Remote model endpoints an operator declares, and how a candidate names one.

``ENDPOINTS_FILE`` (YAML or JSON) lists OpenAI-compatible servers — vLLM, TGI, Ollama, a gateway,
a hosted API — that candidates may be generated on::

    - name: vllm-prod
      base_url: http://vllm:8000/v1
      api: chat                      # chat: /chat/completions; completions: /completions
      api_key_env: VLLM_API_KEY      # the variable on the I/O workers that holds the key
      max_concurrency: 16            # requests in flight at once, across every I/O worker
      price_per_1k_input: 0.0005     # optional: cost per 1,000 prompt tokens
      price_per_1k_output: 0.0015    # optional: cost per 1,000 generated tokens
      timeout_s: 60                  # optional: the whole reply of one request

A candidate names a model on one as ``endpoint:<endpoint-name>/<model-id>``. Requests never
carry a base URL or a key: the gateway accepts only names from this file, so a request cannot
make a worker call an address of its choosing, and keys stay in the workers' environment (never
in a spec, in Redis or in MLflow).

The gateway and the workers parse the file with this module, once, at start-up
(``Settings.endpoints``); a wrong file stops the process with a message naming the entry and
the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.sources import ENDPOINT_PREFIX

ENDPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
# A model id as servers spell them: "gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct",
# "llama3.1:8b" (Ollama). Printable, no whitespace.
_MODEL_ID = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")


class EndpointsFileError(ValueError):
    """ENDPOINTS_FILE cannot be used; the message names the file, the entry and the field."""


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ENDPOINT_NAME_PATTERN)
    base_url: str = Field(max_length=2000)
    api: Literal["chat", "completions"]
    api_key_env: str | None = Field(None, pattern=_ENV_NAME_PATTERN)
    max_concurrency: int = Field(ge=1, le=1024)
    price_per_1k_input: float | None = Field(None, ge=0)
    price_per_1k_output: float | None = Field(None, ge=0)
    timeout_s: float = Field(120.0, gt=0, le=3600)

    @field_validator("base_url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. http://vllm:8000/v1")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials; name the variable holding the key in api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or a fragment")
        return value.strip().rstrip("/")

    @property
    def path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"

    def cost(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        """What one request cost by the price table; None when a price or a count is unknown."""
        if self.price_per_1k_input is None or self.price_per_1k_output is None:
            return None
        if input_tokens is None or output_tokens is None:
            return None
        return input_tokens / 1000 * self.price_per_1k_input + output_tokens / 1000 * self.price_per_1k_output


def load_endpoints(path: Path) -> dict[str, EndpointConfig]:
    """Parse and check ENDPOINTS_FILE: a list of endpoints (or ``{endpoints: [...]}``), by name.
    Raises EndpointsFileError naming every wrong entry and field."""
    where = f"ENDPOINTS_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointsFileError(f"{where} cannot be read: {exc}") from exc
    try:
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise EndpointsFileError(f"{where} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"endpoints"}:
        data = data["endpoints"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise EndpointsFileError(f"{where} must hold a list of endpoints (or a mapping 'endpoints: [...]')")
    problems: list[str] = []
    endpoints: dict[str, EndpointConfig] = {}
    for index, entry in enumerate(data):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(entry, dict):
            problems.append(f"{label}: must be a mapping with name, base_url, api and max_concurrency")
            continue
        try:
            endpoint = EndpointConfig.model_validate(entry)
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"]) or "(entry)"
                message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
                problems.append(f"{label}, field {field}: {message}")
            continue
        if endpoint.name in endpoints:
            problems.append(f"{label}, field name: {endpoint.name!r} is declared twice; names must be unique")
            continue
        endpoints[endpoint.name] = endpoint
    if problems:
        raise EndpointsFileError(f"{where}: " + "; ".join(problems))
    return endpoints


def parse_endpoint_model(model: str) -> tuple[str, str] | None:
    """(endpoint name, model id) of ``endpoint:<name>/<model-id>``, or None when it is not one."""
    model = model.strip()
    if not model.startswith(ENDPOINT_PREFIX):
        return None
    name, slash, model_id = model[len(ENDPOINT_PREFIX) :].partition("/")
    if not slash or not re.match(ENDPOINT_NAME_PATTERN, name) or not _MODEL_ID.match(model_id):
        return None
    return name, model_id


def endpoint_model_problem(model: str, endpoints: dict[str, EndpointConfig]) -> str | None:
    """Why ``model`` does not name a model on a configured endpoint, or None."""
    configured = ", ".join(sorted(endpoints)) if endpoints else "none are configured (setting ENDPOINTS_FILE)"
    parsed = parse_endpoint_model(model)
    if parsed is None:
        return (
            f"{model!r} is not an endpoint model: use endpoint:<endpoint-name>/<model-id>, e.g. "
            f"endpoint:{next(iter(sorted(endpoints)), 'vllm-prod')}/my-model (configured endpoints: "
            f"{configured})"
        )
    name, _ = parsed
    if name not in endpoints:
        return f"unknown endpoint {name!r}; configured endpoints: {configured} (GET /v1/models)"
    return None
