from __future__ import annotations

from pathlib import Path

from shared.settings import Settings


def test_model_roots_from_env_path_list(monkeypatch):
    monkeypatch.setenv("MODEL_ROOTS", "/models:/data/models")
    assert Settings().model_roots == [Path("/models"), Path("/data/models")]


def test_model_roots_from_json(monkeypatch):
    monkeypatch.setenv("MODEL_ROOTS", '["/a", "/b"]')
    assert Settings().model_roots == [Path("/a"), Path("/b")]


def test_visibility_timeout_is_above_the_longest_task(monkeypatch):
    monkeypatch.setenv("TASK_TIME_LIMIT_S", "7200")
    settings = Settings()
    assert settings.visibility_timeout_s > settings.task_time_limit_s


def test_public_url_defaults_to_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000/")
    assert Settings().mlflow_ui_url == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_PUBLIC_URL", "http://localhost:5000")
    assert Settings().mlflow_ui_url == "http://localhost:5000"
