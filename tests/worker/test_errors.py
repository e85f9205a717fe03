"""Which failures are retried: classified by type where they arise, never by message text."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from celery import Celery, Task
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError
from mlflow.exceptions import MlflowException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scripts.stack import free_port
from services.worker import errors, tracking
from services.worker.errors import TrackingUnavailable, describe, is_transient
from shared.settings import Settings


class TestTransient:
    @pytest.mark.parametrize(
        "exc",
        [
            RedisConnectionError("Connection refused"),
            RedisTimeoutError("Timeout reading from socket"),
            ReadOnlyError("You can't write against a read only replica."),
            OperationalError("Error 111 connecting to redis:6379"),
            TrackingUnavailable("MLflow is restarting"),
        ],
    )
    def test_infrastructure_that_comes_back(self, exc):
        assert is_transient(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            ValueError("bad template"),
            ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
            # Its text names a network error, yet nothing about its type says the server was away.
            MlflowException("API request to http://mlflow:5000 failed: Connection refused 503"),
            RuntimeError("Max retries exceeded"),
        ],
    )
    def test_anything_else_is_permanent(self, exc):
        assert not is_transient(exc)


class Answers(BaseHTTPRequestHandler):
    status = 503
    body = b"<html>service unavailable</html>"
    content_type = "text/html"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[Answers]]]:
    handler = type("Handler", (Answers,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_mlflow_retries(monkeypatch):
    # MLflow's client retries with back-off by itself (minutes); what it raises after is the point.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


class TestTrackingServer:
    def test_nothing_listening_is_unavailable(self):
        client = tracking.client(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(TrackingUnavailable) as raised:
            client.get_experiment_by_name("x")
        assert is_transient(raised.value)

    @pytest.mark.parametrize("status", [502, 503, 504])
    def test_a_proxy_answering_5xx_is_unavailable(self, server, status):
        url, handler = server
        handler.status = status
        with pytest.raises(TrackingUnavailable):
            tracking.client(url).get_run("0" * 32)

    def test_a_server_error_is_unavailable(self, server):
        url, handler = server
        handler.status, handler.content_type = 500, "application/json"
        handler.body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "database is locked"}).encode()
        with pytest.raises(TrackingUnavailable):
            tracking.client(url).get_run("0" * 32)

    @pytest.mark.parametrize(
        ("status", "code"), [(400, "INVALID_PARAMETER_VALUE"), (404, "RESOURCE_DOES_NOT_EXIST")]
    )
    def test_a_refusal_is_permanent(self, server, status, code):
        url, handler = server
        handler.status, handler.content_type = status, "application/json"
        handler.body = json.dumps({"error_code": code, "message": "no such run"}).encode()
        with pytest.raises(MlflowException) as raised:
            tracking.client(url).get_run("0" * 32)
        assert not is_transient(raised.value)


class TestDescribe:
    def test_time_limits_say_what_to_change(self):
        for exc in (SoftTimeLimitExceeded(), TimeLimitExceeded(10800)):
            assert describe(exc, time_limit_s=10800) == (
                "the candidate ran longer than TASK_TIME_LIMIT_S (10800 s); use fewer rows or a "
                "smaller max_new_tokens, or raise TASK_TIME_LIMIT_S"
            )

    def test_transient_errors_that_outlived_their_retries(self):
        assert describe(TrackingUnavailable("ConnectionError: refused")) == (
            "the MLflow tracking server stayed unreachable after retries: ConnectionError: refused"
        )
        assert describe(RedisConnectionError("refused")).startswith("Redis or the broker stayed unreachable")

    def test_anything_else_names_its_type(self):
        assert describe(ValueError("bad template")) == "ValueError: bad template"


class TestRetryWhileBusy:
    """A candidate whose lease another delivery holds is checked again once that lease could
    have lapsed, for as long as a candidate may run (TASK_TIME_LIMIT_S), then dropped."""

    @pytest.fixture
    def busy_task(self, monkeypatch) -> Iterator[Task]:
        settings = Settings(task_time_limit_s=100, candidate_lease_s=20)  # patience 100 // 20 + 2 = 7
        monkeypatch.setattr(errors, "get_settings", lambda: settings)
        app = Celery("busy-check", broker="memory://", set_as_current=False)

        @app.task(bind=True, name="check.busy", max_retries=3)
        def busy(self: Task) -> None:
            return None

        yield busy

    def run_with_retries(self, task: Task, retries: int) -> Retry | None:
        task.push_request(retries=retries, id=f"busy-{retries}", args=(), kwargs={}, called_directly=False)
        try:
            return errors.retry_while_busy(task, RuntimeError("lease held"), 4.5)
        finally:
            task.pop_request()

    def test_checks_back_after_the_lease_time_past_the_tasks_own_retry_limit(self, busy_task):
        retry = self.run_with_retries(busy_task, 6)  # past the task's max_retries of 3
        assert isinstance(retry, Retry) and retry.when == 4.5 and str(retry.exc) == "lease held"
        # The longer patience is not left on the task for its later transient failures.
        assert not hasattr(busy_task, "override_max_retries") and busy_task.max_retries == 3

    def test_gives_up_once_a_candidate_could_no_longer_be_running(self, busy_task):
        assert self.run_with_retries(busy_task, 7) is None
