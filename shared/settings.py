"""Typed settings shared by the gateway and the workers.

Every knob is read once from the environment (UPPER_CASE names) and validated at start-up.
MLflow's own ``MLFLOW_TRACKING_URI`` is reused rather than inventing a twin.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.endpoints import EndpointConfig, load_endpoints
from shared.webhook_targets import AllowedHost, parse_allowed_hosts


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
    # Per API key (a key may carry its own): submissions a minute, comparisons queued or running.
    rate_limit_submissions_per_minute: int = Field(60, ge=1)
    max_running_comparisons: int = Field(10, ge=1)
    # Per comparison: rows × max_new_tokens summed over candidates, and calls to the LLM judge.
    max_generated_tokens: int = Field(4_000_000, ge=1)
    max_judge_calls: int = Field(20_000, ge=0)

    # LLM-as-judge: an OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI...) or a local model.
    # Set on the gateway too, which refuses judge metrics when no judge is configured.
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    judge_local_model: str | None = None
    # One judge request, retries apart: the whole reply must arrive within this many seconds.
    judge_timeout_s: float = Field(60.0, gt=0)
    # Retries of a request the judge answered with 429 or 5xx, or not at all, with exponential
    # back-off and jitter from judge_retry_base_s. A Retry-After is honoured up to
    # judge_retry_max_s; a longer one, or a request still failing after the retries, makes the
    # judge unavailable for the rest of that candidate (its judge metrics are left unscored).
    judge_max_retries: int = Field(4, ge=0, le=10)
    judge_retry_base_s: float = Field(1.0, ge=0)
    judge_retry_max_s: float = Field(30.0, ge=0)

    # Limits enforced at submit time
    # A request holds at most 64 candidates whatever this says (shared/schemas.py), so a body
    # of thousands is refused before each one is validated.
    max_candidates: int = Field(8, ge=2, le=64)
    max_rows: int = Field(2000, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    # Counted while the body streams in, chunked or not; an upload's file counts towards it.
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # A rendered prompt: the template filled with one row, plus the system prompt. Also bounds
    # prompt_template and system_prompt themselves. Every prompt is rendered into every row, so
    # a long one costs rows x candidates on the workers.
    max_prompt_chars: int = Field(20_000, ge=1)
    # Any one dataset cell (input, reference or another column), and columns per row.
    max_cell_chars: int = Field(20_000, ge=1)
    max_columns: int = Field(32, ge=1)
    # Checked on the worker once the candidate's tokenizer is known: a longer rendered prompt
    # fails the candidate before it generates (so does one that, with max_new_tokens, does not
    # fit the model's context length).
    max_prompt_tokens: int = Field(8192, ge=1)
    default_experiment: str = "llm-compare"

    # Local paths a candidate may load from (directories or .gguf files below these).
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("/models")])
    # Python modules whose METRICS list adds metrics (see examples/custom_metrics.py).
    custom_metric_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Registered MLflow model names candidates may load (models:/<name>/<version>, /latest or
    # @<alias>); comma-separated. Empty: no MLflow model is accepted. A logged model's files
    # are chosen by whoever logged it, so only names an operator vetted reach a worker.
    mlflow_model_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)

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
    # A running step's lease is renewed by a heartbeat thread every third of this; a redelivered
    # copy waits until the lease lapses (its process died) before taking over, so this bounds how
    # long a killed worker's candidate stays locked. Keep it above the longest pause of a process
    # (a stall this long counts as death, and the stalled process stops writing). The heartbeat
    # is a thread that generation does not block (torch releases the GIL), so 20 s is ample.
    candidate_lease_s: int = Field(20, ge=3)
    # The reconciler queues a lost step again at most this often.
    task_max_retries: int = Field(3, ge=0)
    # Transient failures (Redis, the broker, the MLflow server) are retried this often with
    # exponential back-off capped at 60 s and full jitter: 10 tries wait about four minutes in
    # all, which rides out a restart of Redis or of the MLflow server.
    transient_max_retries: int = Field(10, ge=0)
    # On SIGTERM a worker gives its running tasks this long to finish, then stops them and hands
    # their messages back to the queue (Celery's soft shutdown). Keep the orchestrator's grace
    # period (docker stop_grace_period, Kubernetes terminationGracePeriodSeconds) above it.
    worker_soft_shutdown_s: float = Field(10.0, ge=0, le=300)
    # Starts of a candidate that killed their worker process (out of memory, SIGKILL) before the
    # candidate fails instead of being delivered again.
    max_worker_deaths: int = Field(2, ge=0)
    # Every worker runs the reconciler in its main process; across workers one sweep runs per
    # period. A step with no live lease and no task queued for it is requeued (or failed, or
    # finalised) once it has looked abandoned for the grace period.
    reconcile_interval_s: float = Field(15.0, gt=0)
    reconcile_grace_s: float = Field(30.0, ge=0)
    result_ttl_s: int = Field(30 * 24 * 3600, ge=60)

    # Webhooks (README "Webhooks"). Hosts callbacks may be sent to, comma-separated: names or IP
    # literals, optionally with a port, or wildcards (*.example.com, *). Empty: no callbacks.
    # Non-public addresses (private, loopback, link-local...) only for hosts listed by name or
    # address, never through a wildcard.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Seconds before each attempt of a delivery, counted from the one before (the first from the
    # event): Standard Webhooks' schedule, about 28 h in all. A delivery still failing after
    # the last one is marked failed.
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    # One attempt, connecting, sending, the status line and the capped response body together.
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    # Response bytes read before the connection is closed (the body is not used).
    webhook_max_response_bytes: int = Field(64 * 1024, ge=0, le=10 * 1024 * 1024)
    # Redirects followed per attempt, only 307 and 308 (they keep the POST and its body), each
    # target checked as the first one is. 0: a 3xx is a failed attempt.
    webhook_max_redirects: int = Field(0, ge=0, le=5)
    # After a rotation, deliveries are signed with the previous secret as well for this long.
    webhook_secret_grace_s: int = Field(24 * 3600, ge=0)
    # How often each I/O worker looks for deliveries whose retry is due.
    webhook_sweep_interval_s: float = Field(1.0, gt=0, le=60)
    # The gateway's address as people and services reach it, for the links in webhook bodies;
    # unset, links are paths (/v1/comparisons/<id>).
    api_public_url: str | None = None

    # Remote model endpoints (shared/endpoints.py): the YAML or JSON file that declares them, read
    # once at start-up by the gateway and the workers alike. Unset: no endpoint candidates.
    endpoints_file: Path | None = None
    # A row still failing after its retries is recorded as failed; the candidate fails only when
    # more than this share of its rows did.
    endpoint_max_error_rate: float = Field(0.10, ge=0, le=1)
    # Retries of a request answered 429 or 5xx, timed out or dropped: exponential back-off with
    # jitter from endpoint_retry_base_s, a Retry-After honoured up to endpoint_retry_max_s (a
    # longer one fails the row at once).
    endpoint_max_retries: int = Field(5, ge=0, le=20)
    endpoint_retry_base_s: float = Field(0.5, ge=0)
    endpoint_retry_max_s: float = Field(60.0, ge=0)
    _endpoints: dict[str, EndpointConfig] = PrivateAttr(default_factory=dict)

    @field_validator("custom_metric_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(",", ":").split(":") if part.strip()]
        return value

    @field_validator("mlflow_model_allowlist", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _load_endpoints(self) -> Settings:
        # Here, so that a wrong file stops the gateway or worker at start with the entry and field.
        self._endpoints = load_endpoints(self.endpoints_file) if self.endpoints_file else {}
        return self

    @property
    def endpoints(self) -> dict[str, EndpointConfig]:
        """The endpoints ENDPOINTS_FILE declares, by name."""
        return self._endpoints

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: list[str]) -> list[str]:
        parse_allowed_hosts(value)  # refuses a malformed entry at start-up, naming it
        return value

    @field_validator("webhook_retry_schedule_s", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule_bounded(cls, value: list[float]) -> list[float]:
        if not 1 <= len(value) <= 20 or any(not 0 <= delay <= 7 * 24 * 3600 for delay in value):
            raise ValueError(
                "WEBHOOK_RETRY_SCHEDULE_S: 1 to 20 comma-separated delays in seconds, each 0 to 604800"
            )
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
    def webhook_allowlist(self) -> tuple[AllowedHost, ...]:
        return parse_allowed_hosts(self.webhook_allowed_hosts)

    @property
    def judge_configured(self) -> bool:
        return bool((self.judge_base_url and self.judge_model) or self.judge_local_model)

    @model_validator(mode="after")
    def _delivery_limits_agree(self) -> Settings:
        if self.candidate_lease_s * 2 > self.task_time_limit_s:
            raise ValueError(
                f"CANDIDATE_LEASE_S ({self.candidate_lease_s}) must be at most half of "
                f"TASK_TIME_LIMIT_S ({self.task_time_limit_s})"
            )
        return self

    @property
    def visibility_timeout_s(self) -> int:
        # The broker redelivers an unacknowledged task after this: above the longest a task may
        # run, so that a slow but alive worker is never duplicated by the broker.
        return self.task_time_limit_s + 600

    @property
    def io_queue_name(self) -> str:
        """Where work that only waits on the network goes (remote endpoints, webhook deliveries):
        served by I/O workers that run many tasks at once in threads and load no model."""
        return f"{self.queue_name}.io"

    @property
    def mlflow_ui_url(self) -> str:
        return (self.mlflow_public_url or self.mlflow_tracking_uri).rstrip("/")

    def mlflow_link(self, experiment_id: str | None, run_id: str | None = None) -> str | None:
        """The MLflow UI page of an experiment, or of one of its runs; None without an experiment."""
        if not experiment_id:
            return None
        return f"{self.mlflow_ui_url}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")


@lru_cache
def get_settings() -> Settings:
    return Settings()
