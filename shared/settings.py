"""Typed settings shared by the gateway and the workers.

Every knob is read once from the environment (UPPER_CASE names) and validated at start-up.
MLflow's own ``MLFLOW_TRACKING_URI`` is reused rather than inventing a twin.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    # Infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    # The address people open in a browser; differs from the tracking URI inside compose,
    # where workers reach the server as http://mlflow:5000.
    mlflow_public_url: str | None = None
    queue_name: str = "llm-compare"
    key_prefix: str = "llmc"

    # API keys are required unless this is set explicitly (the local `make dev` stack sets it).
    auth_disabled: bool = False

    # LLM-as-judge: an OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI...) or a local model.
    # Set on the gateway too, which refuses judge metrics when no judge is configured.
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    judge_local_model: str | None = None

    # Limits enforced at submit time
    max_candidates: int = Field(8, ge=2)
    max_rows: int = Field(2000, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(20_000, ge=1)
    default_experiment: str = "llm-compare"

    # Local paths a candidate may load from (directories or .gguf files below these).
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("/models")])
    # Python modules whose METRICS list adds metrics (see examples/custom_metrics.py).
    custom_metric_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Worker behaviour
    # De-quantised copies of GGUF files, so each file is converted once per host.
    model_cache_dir: Path = Path.home() / ".cache" / "llm-compare" / "models"
    # Rows generated together. Decoding reads every weight once per step whatever the batch, so
    # bigger batches are nearly free until compute binds; on out-of-memory a batch is halved.
    generation_batch_size: int = Field(64, ge=1)
    # Attention cache one CPU batch may take (longest prompt + max_new_tokens, every row): a CPU
    # out-of-memory kills the worker instead of raising, so long rows get smaller batches. GPUs
    # use most of their free memory instead, and halve a batch on out-of-memory. 0: no cap.
    generation_kv_cache_mb: float = Field(384, ge=0)
    # Weights a worker process keeps loaded across tasks; least recently used models go first.
    model_cache_max_gb: float = Field(4.0, gt=0)
    torch_threads: int | None = None
    # Weights and arithmetic on CPU workers. bfloat16 halves the memory and, on CPUs with AMX or
    # AVX-512 BF16, about doubles generation speed; its outputs differ slightly from fp32's, and
    # a batched greedy row can differ from the same row generated alone. GPUs use bf16/fp16.
    cpu_dtype: Literal["float32", "bfloat16"] = "float32"
    # Longest a single candidate task may run; the broker's visibility timeout sits above it
    # so that a task is only redelivered when its worker really died.
    task_time_limit_s: int = Field(3 * 3600, ge=60)
    # A running candidate renews its lease after every batch; a redelivered copy waits until the
    # lease lapses (its worker died) before taking over. Keep it above the slowest batch.
    candidate_lease_s: int = Field(600, ge=5)
    task_max_retries: int = Field(3, ge=0)
    result_ttl_s: int = Field(30 * 24 * 3600, ge=60)

    @field_validator("custom_metric_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(",", ":").split(":") if part.strip()]
        return value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        # MODEL_ROOTS=/models:/data/models, like PATH; JSON lists work too.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part for part in value.split(":") if part]
        return value

    @property
    def model_cache_max_bytes(self) -> int:
        return int(self.model_cache_max_gb * 1024**3)

    @property
    def kv_cache_budget_bytes(self) -> int | None:
        return int(self.generation_kv_cache_mb * 1024**2) or None

    @property
    def judge_configured(self) -> bool:
        return bool((self.judge_base_url and self.judge_model) or self.judge_local_model)

    @property
    def visibility_timeout_s(self) -> int:
        return self.task_time_limit_s + 600

    @property
    def mlflow_ui_url(self) -> str:
        return (self.mlflow_public_url or self.mlflow_tracking_uri).rstrip("/")


@lru_cache
def get_settings() -> Settings:
    return Settings()
