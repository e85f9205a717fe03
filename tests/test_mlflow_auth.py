"""The compose stack's MLflow security, run for real: `mlflow server --app-name basic-auth` with
services/mlflow/basic_auth.ini, the users script that gives the workers their account, and a
client that logs the way workers do. Only the auth database moves from Postgres to SQLite."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from scripts.stack import ROOT, Stack, free_port, http_ok, wait_until

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-password-for-tests"
WORKER_PASSWORD = "worker-password-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    run_dir = tmp_path_factory.mktemp("mlflow-auth")
    config = configparser.ConfigParser()
    config.read(ROOT / "services/mlflow/basic_auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{run_dir / 'auth.db'}"
    ini = run_dir / "basic_auth.ini"
    with ini.open("w") as handle:
        config.write(handle)
    stack = Stack(
        run_dir=run_dir,
        mlflow_port=free_port(),
        extra_env={
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "secret-key-for-tests",
        },
    )
    command = stack.mlflow_command(
        f"sqlite:///{run_dir / 'mlflow.db'}", run_dir / "artifacts", "127.0.0.1", stack.mlflow_port
    )
    # As compose runs it; one server worker is enough here.
    command[command.index("--workers") + 1] = "1"
    proc = stack._spawn("mlflow", [*command, "--app-name", "basic-auth"])
    try:
        wait_until(
            lambda: http_ok(f"{stack.mlflow_url}/health"),
            timeout=120,
            what="mlflow server (basic-auth)",
            proc=proc,
            log=stack.log_path("mlflow"),
        )
        yield stack.mlflow_url
    finally:
        stack.stop()


def create_worker_user(url: str, wait_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MLFLOW_WAIT_S": str(wait_s),
        "MLFLOW_URL": url,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_WORKER_USERNAME": "llm-compare",
        "MLFLOW_WORKER_PASSWORD": WORKER_PASSWORD,
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "services/mlflow/users.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def client_as(url: str, user: str, password: str, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(url)


def test_anonymous_requests_are_refused_but_health_is_open(server):
    assert httpx.get(f"{server}/health").status_code == 200
    response = httpx.post(f"{server}/api/2.0/mlflow/experiments/search", json={"max_results": 1})
    assert response.status_code == 401


def test_workers_get_their_own_account_and_log_with_it(server, monkeypatch):
    first = create_worker_user(server)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "MLflow user 'llm-compare' created"
    # Run again (every `docker compose up`): the password is set again, not an error.
    again = create_worker_user(server)
    assert again.returncode == 0 and again.stdout.strip() == "MLflow user 'llm-compare' updated"

    worker = client_as(server, "llm-compare", WORKER_PASSWORD, monkeypatch)
    experiment_id = worker.create_experiment("auth-test")
    run = worker.create_run(experiment_id)
    worker.log_metric(run.info.run_id, "latency", 1.5)
    assert worker.get_run(run.info.run_id).data.metrics["latency"] == 1.5

    wrong = client_as(server, "llm-compare", "not-the-password", monkeypatch)
    with pytest.raises(MlflowException) as refused:
        wrong.get_run(run.info.run_id)
    assert "401" in str(refused.value) or "Unauthorized" in str(refused.value)

    # default_permission = NO_PERMISSIONS: another MLflow user cannot read the workers' runs.
    admin_auth = ("admin", ADMIN_PASSWORD)
    created = httpx.post(
        f"{server}/api/2.0/mlflow/users/create",
        json={"username": "someone", "password": "someone-password-123"},
        auth=admin_auth,
    )
    assert created.status_code == 200
    someone = client_as(server, "someone", "someone-password-123", monkeypatch)
    with pytest.raises(MlflowException) as forbidden:
        someone.get_run(run.info.run_id)
    assert "403" in str(forbidden.value) or "Permission" in str(forbidden.value)


def test_the_script_gives_up_with_a_message_when_no_server_answers():
    started = create_worker_user(f"http://127.0.0.1:{free_port()}", wait_s=3)
    assert started.returncode == 1 and "did not answer" in started.stderr


def test_the_committed_config_is_what_compose_loads():
    config = configparser.ConfigParser()
    config.read(Path(ROOT) / "services/mlflow/basic_auth.ini")
    assert config["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config["mlflow"]["auth_cache_ttl_seconds"] == "60"
