from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.celery_config import celery_config
from shared.settings import Settings


def test_model_roots_from_env_path_list(monkeypatch):
    monkeypatch.setenv("MODEL_ROOTS", "/models:/data/models")
    assert Settings().model_roots == [Path("/models"), Path("/data/models")]


def test_model_roots_from_json(monkeypatch):
    monkeypatch.setenv("MODEL_ROOTS", '["/a", "/b"]')
    assert Settings().model_roots == [Path("/a"), Path("/b")]


@pytest.mark.parametrize(("limit", "visibility"), [(None, 11_400), ("7200", 7_800), ("120", 720)])
def test_the_broker_redelivers_only_after_the_hard_time_limit(monkeypatch, limit, visibility):
    """A task still running (alive, within its time limit) must never be delivered a second time
    by the broker: what Celery is configured with, not the property's own formula."""
    if limit:
        monkeypatch.setenv("TASK_TIME_LIMIT_S", limit)
    config = celery_config(Settings())
    assert config["broker_transport_options"]["visibility_timeout"] == visibility
    assert config["task_time_limit"] == int(limit or 10_800)
    assert config["task_soft_time_limit"] < config["task_time_limit"] < visibility


def test_delivery_defaults(monkeypatch):
    config = celery_config(Settings())
    assert (config["task_acks_late"], config["task_reject_on_worker_lost"]) == (True, True)
    assert config["worker_prefetch_multiplier"] == 1
    # Nothing reads task results: no backend stores them.
    assert "result_backend" not in config and config["task_ignore_result"] is True
    assert config["worker_soft_shutdown_timeout"] == 10.0
    settings = Settings()
    assert (settings.candidate_lease_s, settings.max_worker_deaths) == (20, 2)
    assert (settings.reconcile_interval_s, settings.reconcile_grace_s) == (15.0, 30.0)


def test_a_lease_longer_than_half_the_time_limit_is_refused(monkeypatch):
    monkeypatch.setenv("TASK_TIME_LIMIT_S", "600")
    monkeypatch.setenv("CANDIDATE_LEASE_S", "301")
    with pytest.raises(ValidationError, match=r"CANDIDATE_LEASE_S \(301\) must be at most half"):
        Settings()
    monkeypatch.setenv("CANDIDATE_LEASE_S", "300")
    assert Settings().candidate_lease_s == 300


@pytest.mark.parametrize(("name", "value"), [("WORKER_SOFT_SHUTDOWN_S", "-1"), ("MAX_WORKER_DEATHS", "-1")])
def test_delivery_settings_are_validated(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_public_url_defaults_to_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000/")
    assert Settings().mlflow_ui_url == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_PUBLIC_URL", "http://localhost:5000")
    assert Settings().mlflow_ui_url == "http://localhost:5000"
