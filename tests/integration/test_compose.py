"""The production stack's deployment files: docker-compose.yml, the Dockerfile, .env.example, the Dagster
workspace, Prometheus and Grafana provisioning.

No Docker engine runs here. `docker-compose config` (Debian's docker-compose 1.29) validates and
normalizes the compose file with a copy of .env.example as its only environment, and the tests read the
normalized result: every service the code expects is declared and reachable under the names the settings
use, secrets come from the environment, each recloop container gets settings that recloop's own
`Settings.from_env()` accepts, Prometheus scrapes declared services, and every PromQL query of the
dashboard and the alert rules names metrics that recloop/serving/metrics.py exposes. On PostgreSQL, the
init script creates the databases and Grafana's read-only role, and the dashboard's drift panels run
against MLflow's real schema, filled by `Registry.log_drift_report`.

docker-compose missing: the tests skip on a developer machine and fail when CI=true (`.ci/run` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from recloop.config import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"
MONITORING = REPO_ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "recloop.json"
INIT_SCRIPT = REPO_ROOT / "deploy" / "postgres" / "init-databases.sh"

CORE_SERVICES = {
    "postgres", "redis", "minio", "minio-create-bucket", "mlflow", "code-location", "dagster-webserver",
    "dagster-daemon", "serving", "prometheus", "grafana",
}
AIRFLOW_SERVICES = {"airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"}
# RECLOOP_DAGSTER_EXECUTOR=celery: the broker and the workers (profile `celery`).
CELERY_SERVICES = {"rabbitmq", "celery-worker"}
PROFILES = ("airflow", "celery")
ONE_SHOT = {"minio-create-bucket", "airflow-init"}
# Services running recloop code, and so reading recloop's settings.
RECLOOP_SERVICES = {"code-location", "dagster-webserver", "dagster-daemon", "serving", "airflow-scheduler",
                    "airflow-dag-processor", "celery-worker"}
# The port each service listens on inside the compose network.
LISTENS = {"postgres": 5432, "redis": 6379, "minio": 9000, "mlflow": 5000, "code-location": 4000,
           "dagster-webserver": 3000, "serving": 8000, "prometheus": 9090, "grafana": 3000,
           "airflow-api-server": 8080, "rabbitmq": 5672}
# What each health check must probe.
HEALTH_PROBES = {
    "postgres": "pg_isready", "redis": "redis-cli ping", "minio": "mc ready local",
    "mlflow": "http://localhost:5000/health", "code-location": "dagster api grpc-health-check --port 4000",
    "dagster-webserver": "http://localhost:3000/server_info", "dagster-daemon": "dagster-daemon liveness-check",
    "serving": "http://localhost:8000/healthz", "prometheus": "http://localhost:9090/-/healthy",
    "grafana": "http://localhost:3000/api/health", "airflow-api-server": "http://localhost:8080/api/v2/version",
    "airflow-scheduler": "http://localhost:8974/health", "airflow-dag-processor": "airflow jobs check",
    "rabbitmq": "rabbitmq-diagnostics -q ping", "celery-worker": "inspect ping -d \"worker@$$HOSTNAME\"",
}
# Where the stateful services keep their state: a named volume each.
STATE = {"postgres": "/var/lib/postgresql/data", "redis": "/data", "minio": "/data", "prometheus": "/prometheus",
         "grafana": "/var/lib/grafana", "code-location": "/var/lib/recloop", "serving": "/var/lib/recloop",
         "airflow-scheduler": "/var/lib/recloop", "rabbitmq": "/var/lib/rabbitmq", "celery-worker": "/var/lib/recloop"}
# What the stack publishes on the host (docs/deployment.md lists the same).
PUBLISHED = {"dagster-webserver": 3000, "mlflow": 5000, "serving": 8000, "grafana": 3001, "prometheus": 9090,
             "minio": 9001, "airflow-api-server": 8080}
# Secrets compose must refuse to start without.
SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "GRAFANA_PG_PASSWORD",
           "GF_SECURITY_ADMIN_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW__CORE__FERNET_KEY",
           "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "RECLOOP_API_KEYS", "RABBITMQ_PASSWORD"}
# RECLOOP_* names the code mentions that are not deployment settings: recloop sets them itself, for Feast's
# feature_store.yaml, from RECLOOP_FEAST_DATA_DIR (recloop.features.feast_environment).
INTERNAL_VARIABLES = {"RECLOOP_FEAST_REGISTRY", "RECLOOP_FEAST_ONLINE_PATH"}


# --------------------------------------------------------------------------------------------------
# docker-compose config
# --------------------------------------------------------------------------------------------------


def _compose_binary() -> str:
    path = shutil.which("docker-compose")
    if path:
        return path
    message = ("docker-compose is needed to validate docker-compose.yml but is not installed "
               "(Debian: `apt-get install docker-compose`; .ci/run installs it)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def compose(env_file: Path, *args: str, profiles: tuple[str, ...] = PROFILES) -> subprocess.CompletedProcess:
    """`docker-compose config ...` with `env_file` as the only source of variables: the caller's shell
    environment would override .env values, so the process gets nothing else but PATH and a HOME."""
    binary = _compose_binary()
    command = [binary, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    for profile in profiles:
        command += ["--profile", profile]
    return subprocess.run([*command, "config", *args], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                             "HOME": str(env_file.parent)},
                          capture_output=True, text=True, timeout=60)


def parse_env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(assignments, names documented as commented-out assignments) of a .env file."""
    values, documented = {}, set()
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line):
            values[m.group(1)] = m.group(2)
        elif m := re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line):
            documented.add(m.group(1))
    return values, documented


def fill_secrets_command() -> str:
    """The Python code .env.example documents for filling every empty secret of a `.env` at once."""
    line = next(line for line in ENV_EXAMPLE.read_text().splitlines() if line.startswith('#   python3 -c "import base64'))
    return shlex.split(line.removeprefix("#   "))[2]


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env.example copied to .env with its secrets generated by the command it documents, as a user does."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    shutil.copy(ENV_EXAMPLE, path)
    subprocess.run([sys.executable, "-c", fill_secrets_command()], cwd=path.parent, check=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def config(env_file) -> dict[str, Any]:
    proc = compose(env_file)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def services(config) -> dict[str, dict[str, Any]]:
    return config["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> str:
    cmd = service.get("command") or []
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def flag(service: dict[str, Any], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in the service's command."""
    cmd = service.get("command") or []
    for i, arg in enumerate(cmd):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def depends_closure(services: dict[str, dict[str, Any]], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(services[name].get("depends_on") or {})
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(services[dep].get("depends_on") or {})
    return seen


def test_compose_file_declares_every_service_and_volume(env_file, services, config):
    listed = set(compose(env_file, "--services").stdout.split())
    assert CORE_SERVICES | AIRFLOW_SERVICES | CELERY_SERVICES <= listed
    assert set(services) == listed
    assert sorted(compose(env_file, "--profiles").stdout.split()) == ["airflow", "celery"]
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"
    for name in AIRFLOW_SERVICES:
        assert services[name].get("profiles") == ["airflow"], name
    for name in CELERY_SERVICES:
        assert services[name].get("profiles") == ["celery"], name
    volumes = set(compose(env_file, "--volumes").stdout.split())
    assert volumes == set(config["volumes"])
    assert {"postgres-data", "minio-data", "grafana-data", "prometheus-data", "recloop-scratch"} <= volumes


def test_long_running_services_have_health_checks_and_wait_for_each_other(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            assert "healthcheck" not in service, name
            continue
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck") or {}
        assert not check.get("disable"), name
        test = check.get("test") or []
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        probe = HEALTH_PROBES[name]
        assert probe in " ".join(test[1:]), f"{name}: health check {test} does not probe {probe}"
        for dep, condition in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, f"{name} -> {dep}"
    # Each HTTP health check and the code location's probe ask the port the service's command listens on.
    for name in ("mlflow", "dagster-webserver", "serving", "code-location"):
        assert str(LISTENS[name]) == flag(services[name], "port"), name
    assert services["mlflow"]["depends_on"]["minio-create-bucket"]["condition"] == "service_completed_successfully"


def test_state_lives_in_named_volumes_and_bind_mounts_exist(services, config):
    declared = set(config["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: bind mount {source} does not exist"
                assert Path(source).resolve().is_relative_to(REPO_ROOT), f"{name}: {source} outside the repo"
                assert volume.endswith(":ro"), f"{name}: configuration {source} should be read-only"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    for name, path in STATE.items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes") or []}
        assert mounts.get(path) in declared, f"{name}: {path} is not on a named volume"


def test_published_ports_stay_on_localhost_by_default(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports") or []:
            host_ip, host_port, _ = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} is open to the network by default"
            published.setdefault(name, set()).add(int(host_port))
    for name, port in PUBLISHED.items():
        assert port in published.get(name, set()), f"{name} is not published on :{port}"
    assert {"postgres", "redis"}.isdisjoint(published), "databases stay inside the compose network"
    docs = (REPO_ROOT / "docs" / "deployment.md").read_text()
    for port in PUBLISHED.values():
        assert f":{port}" in docs, f"docs/deployment.md does not mention :{port}"


# --------------------------------------------------------------------------------------------------
# Settings: .env.example, the code, the containers
# --------------------------------------------------------------------------------------------------


def serving_variables() -> set[str]:
    from recloop.serving.config import ServingConfig

    return {f"RECLOOP_SERVING_{f.name.upper()}" for f in dataclasses.fields(ServingConfig)}


def variables_read_by_the_code() -> set[str]:
    found: set[str] = set()
    for folder in ("recloop", "pipelines", "dags", "feature_repo"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml", ".yml") and path.is_file():
                found.update(re.findall(r"RECLOOP_[A-Z0-9_]*[A-Z0-9]_?", path.read_text()))
    prefixes = {name for name in found if name.endswith("_")}
    assert prefixes <= {"RECLOOP_SERVING_"}, f"unexpected variable prefixes in the code: {prefixes}"
    test_only = {name for name in found if name.startswith("RECLOOP_TEST_")}
    return (found - prefixes - INTERNAL_VARIABLES - test_only) | serving_variables()


def test_every_setting_the_code_reads_is_in_env_example_and_wired_in(services):
    values, documented = parse_env_file(ENV_EXAMPLE)
    needed = variables_read_by_the_code()
    assert {"RECLOOP_ENV", "RECLOOP_LAKE_URI", "RECLOOP_REDIS_URL", "RECLOOP_DAGSTER_PG_URL"} <= needed
    missing = sorted(needed - set(values) - documented)
    assert not missing, f".env.example lacks settings the code reads: {missing}"
    # Every setting given a value in .env.example reaches a container.
    given = {name for s in services.values() for name in environment(s)}
    not_wired = sorted(n for n in values if n.startswith("RECLOOP_") and n not in given)
    assert not not_wired, f"set in .env.example but passed to no service: {not_wired}"
    assert serving_variables() <= set(environment(services["serving"]))
    for contract in ("DAGSTER_HOME", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "POSTGRES_USER",
                     "MINIO_ROOT_USER", "GF_SECURITY_ADMIN_PASSWORD", "AIRFLOW__CORE__PARALLELISM",
                     "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "GX_ANALYTICS_ENABLED",
                     "DAGSTER_DISABLE_TELEMETRY", "FEAST_USAGE"):
        assert contract in values, contract
    assert values["RECLOOP_ENV"] == "production"
    # Every setting is explained: the line above it (or above its block of settings) is a comment.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            above = lines[i - 1] if i else ""
            assert above.startswith("#") or re.match(r"^[A-Z_][A-Z0-9_]*=", above), f"no comment for {line}"


@pytest.mark.parametrize("name", sorted(RECLOOP_SERVICES))
def test_each_recloop_container_gets_valid_production_settings(name, services, monkeypatch):
    """recloop's own validation (`Settings.from_env`, production: nothing may fall back to a local file)
    accepts the environment compose gives the container."""
    from recloop.config import Settings
    from recloop.serving.config import ServingConfig

    for key in list(os.environ):
        if key.startswith(("RECLOOP_", "AWS_", "MLFLOW_", "DAGSTER_")):
            monkeypatch.delenv(key)
    env = environment(services[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert settings.is_production
    assert settings.lake_uri.startswith("s3://") and settings.landing_uri.startswith("s3://")
    assert urlparse(settings.s3_endpoint_url).hostname == "minio"
    for key in ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "GX_ANALYTICS_ENABLED", "DAGSTER_DISABLE_TELEMETRY",
                "FEAST_USAGE"):
        assert key in env, f"{name}: telemetry opt-out {key} missing"
    if name == "serving":
        assert ServingConfig.from_env() == ServingConfig(), "empty RECLOOP_SERVING_* must mean the defaults"
    if name.startswith("dagster") or name == "code-location":
        assert env["DAGSTER_HOME"] == "/opt/dagster/home"
        dagster_yaml = (REPO_ROOT / "deploy" / "dagster.yaml").read_text()
        for var in re.findall(r"env:\s*([A-Z_][A-Z0-9_]*)", dagster_yaml):
            assert env.get(var), f"{name}: deploy/dagster.yaml reads {var}, which the container lacks"


URL_VALUE = re.compile(r"^[a-z][a-z0-9+]*://")


BROWSER_URLS = {"RECLOOP_MLFLOW_UI_URL", "RECLOOP_DAGSTER_URL"}


def test_stores_are_reachable_under_the_names_the_settings_use(services, config):
    """Every URL a container is given names a declared service on the port it listens on, a service the
    container waits for; database names exist (init script); credentials match the stores' own."""
    pg_env = environment(services["postgres"])
    init = INIT_SCRIPT.read_text()
    databases = set(re.search(r'INIT_DATABASES:-([^"}]+)', init).group(1).split()) | {pg_env["POSTGRES_DB"]}
    bucket = environment(services["minio-create-bucket"])["MINIO_BUCKET"]
    checked = 0
    for name, service in services.items():
        env = environment(service)
        # The UIs' addresses as a browser on the host reaches them (links recloop records) are not stores.
        urls = {k: v for k, v in env.items() if URL_VALUE.match(v) and k not in BROWSER_URLS}
        if name == "mlflow":
            urls["--artifacts-destination"] = flag(service, "artifacts-destination")
        for key, url in urls.items():
            parsed = urlparse(url)
            if parsed.scheme == "s3":
                assert parsed.netloc == bucket, f"{name} {key}: bucket {parsed.netloc} is never created"
                continue
            if parsed.scheme == "rpc":  # Celery's result backend through the broker: no host of its own
                continue
            host, port = parsed.hostname, parsed.port
            assert host in services, f"{name} {key}: host {host} is not a compose service"
            # A service without a profile cannot wait for one of a profile (the broker of profile `celery`
            # is used by the code location only when RECLOOP_DAGSTER_EXECUTOR=celery chose it).
            optional = services[host].get("profiles") and not services[name].get("profiles")
            if host != name and not optional:
                assert host in depends_closure(services, name), f"{name} {key}: does not wait for {host}"
            expected_port = LISTENS[host]
            assert (port or {"http": 80, "redis": 6379}.get(parsed.scheme, 5432)) == expected_port, f"{name} {key}"
            if parsed.scheme.startswith("postgresql"):
                assert parsed.path.lstrip("/") in databases, f"{name} {key}: database {parsed.path} never created"
                assert (parsed.username, parsed.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
            checked += 1
    assert checked >= 20
    code = environment(services["code-location"])
    minio = environment(services["minio"])
    assert code["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert code["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert urlparse(code["RECLOOP_MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    assert environment(services["mlflow"])["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert flag(services["mlflow"], "workers") == "1" and "--serve-artifacts" in services["mlflow"]["command"]
    allowed = environment(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:5000" in allowed, "MLflow 3 rejects Host headers it does not allow: the other containers'"


def test_secrets_come_only_from_the_environment(env_file, tmp_path):
    raw = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", raw))
    assert SECRETS <= required, f"secrets compose would start without: {sorted(SECRETS - required)}"
    # No literal: every secret-looking key of the compose file takes its value from a variable.
    secret_key = r"^\s+([A-Z][A-Z0-9_]*(?:PASSWORD|SECRET|_KEY|TOKEN)[A-Z0-9_]*):\s*(.*)$"
    for key, value in re.findall(secret_key, raw, re.M):
        assert value.startswith("${"), f"{key} has a literal value in docker-compose.yml"
    values, _ = parse_env_file(ENV_EXAMPLE)
    # .env.example ships no secret: each is empty (or refers to another), so a copied file cannot start a
    # stack with a password everyone knows; compose refuses it and names the variables.
    assert all(values[name] == "" or values[name].startswith("${") for name in SECRETS), {
        name: values[name] for name in SECRETS}
    verbatim = tmp_path / "verbatim" / ".env"
    verbatim.parent.mkdir()
    shutil.copy(ENV_EXAMPLE, verbatim)
    proc = compose(verbatim, "-q")
    assert proc.returncode != 0 and "see .env.example" in proc.stderr, proc.stderr
    generated, _ = parse_env_file(env_file)
    for name in SECRETS:
        literal = generated[name]
        if "${" in literal:
            continue
        assert len(literal) >= 32, f"{name}: the documented command generates a long random value"
    from cryptography.fernet import Fernet

    Fernet(generated["AIRFLOW__CORE__FERNET_KEY"].encode())  # a valid key, or Airflow cannot start
    # Without any one of them, `docker-compose config` refuses and names it.
    lines = env_file.read_text().splitlines()
    for name in sorted(required):
        partial = tmp_path / name / ".env"
        partial.parent.mkdir()
        partial.write_text("\n".join(line for line in lines if not line.startswith(f"{name}=")) + "\n")
        proc = compose(partial, "-q")
        assert proc.returncode != 0, f"docker-compose config accepted a missing {name}"
        assert name in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------------


def test_dockerfile_installs_cpu_torch_first_then_the_project_as_a_non_root_user(services):
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)  # continuation lines joined
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages = {m.group(2): m.group(1) for line in lines if (m := re.match(r"FROM (\S+) AS (\S+)", line))}
    assert {"runtime", "app", "airflow"} <= set(stages)
    assert re.search(r"PYTHON_IMAGE=python:3\.11-slim", text)
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line and "pip install" in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch]
    project = next(i for i, line in enumerate(lines)
                   if re.search(r"pip install -c constraints\.txt \.(\s|$)", line))
    assert torch < project
    assert "torch==2.13.0" in (REPO_ROOT / "constraints.txt").read_text().split()
    assert '"torch==2.13.0"' in (REPO_ROOT / "pyproject.toml").read_text()
    # Final stages: non-root, the ports, the entry point; telemetry off in the image itself.
    for stage in ("app", "airflow"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        user = re.findall(r"^USER (\S+)", body, re.M)
        assert user and user[-1] not in ("root", "0"), stage
        assert "/opt/recloop/deploy/entrypoint.sh" in body
    exposed = {int(p) for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert {8000, 4000} <= exposed
    for var in ("DO_NOT_TRACK=1", "MLFLOW_DISABLE_TELEMETRY=true", "GX_ANALYTICS_ENABLED=false",
                "DAGSTER_DISABLE_TELEMETRY=true", "FEAST_USAGE=False"):
        assert var in text, var
    assert "cp deploy/dagster.yaml /opt/dagster/home/dagster.yaml" in text
    assert (REPO_ROOT / "deploy" / "dagster.yaml").is_file(), "deploy/dagster.yaml (the Dagster instance) is missing"
    entrypoint = REPO_ROOT / "deploy" / "entrypoint.sh"
    assert os.access(entrypoint, os.X_OK) and os.access(INIT_SCRIPT, os.X_OK)
    # Every recloop service is built from this Dockerfile, at a stage it has.
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert Path(build["context"]).resolve() == REPO_ROOT, name
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
            assert build["target"] in stages, name
            assert build["target"] == ("airflow" if name.startswith("airflow") else "app"), name
    built = {n for n, s in services.items() if "build" in s}
    assert built == RECLOOP_SERVICES | {"mlflow", "airflow-init", "airflow-api-server"}
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", ".git", ".recloop"):
        assert entry in ignored, f".dockerignore lets {entry} into the image"


def test_dagster_workspace_points_at_the_code_location(services):
    from dagster._core.workspace.config_schema import ensure_workspace_config

    path = REPO_ROOT / "deploy" / "workspace.yaml"
    workspace = yaml.safe_load(path.read_text())
    ensure_workspace_config(workspace, str(path))
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    code = services["code-location"]
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    assert grpc["host"] == "code-location"
    assert str(grpc["port"]) == flag(code, "port")
    assert grpc["location_name"] == flag(code, "location-name") == tool["code_location_name"]
    assert flag(code, "module-name") == tool["module_name"]
    for name in ("dagster-webserver", "dagster-daemon"):
        assert flag(services[name], "workspace") == "/opt/recloop/deploy/workspace.yaml", name
    assert re.search(r"^WORKDIR /opt/recloop$", DOCKERFILE.read_text(), re.M)


# --------------------------------------------------------------------------------------------------
# Prometheus and Grafana
# --------------------------------------------------------------------------------------------------


def exposed_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, as the serving API's /metrics exposes them (every labelled metric given
    one child so that it shows)."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from recloop.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def promql_queries() -> list[tuple[str, str]]:
    """(where, expression) of every PromQL query: the dashboard's panels and the alert rules."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel["datasource"])["type"] == "prometheus":
                out.append((f"panel {panel['title']!r}", target["expr"]))
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            out.append((f"rule {rule['alert']}", rule["expr"]))
    return out


def serving_routes() -> set[str]:
    return set(re.findall(r'@app\.(?:get|post)\("([^"]+)"', (REPO_ROOT / "recloop/serving/app.py").read_text()))


def test_dashboard_and_alert_rules_query_metrics_the_serving_api_exposes():
    from recloop.serving.metrics import STAGES

    exposed = exposed_metrics()
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    routes = serving_routes()
    queries = promql_queries()
    assert len(queries) >= 20
    for where, expr in queries:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        names = set(re.findall(r"\b(recloop_[a-z0-9_]+)", expr))
        assert names or "up{" in expr, f"{where}: queries no recloop metric"
        unknown = names - set(exposed)
        assert not unknown, f"{where}: {sorted(unknown)} not exposed by recloop/serving/metrics.py"
        labels = set().union(*(exposed[n] for n in names)) | {"job", "instance"} if names else {"job", "instance"}
        for metric, matchers in re.findall(r"\b(recloop_[a-z0-9_]+|up)\{([^}]*)\}", expr):
            for label, _, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                assert label in labels, f"{where}: {metric} has no label {label}"
                if label == "stage":
                    assert value in STAGES, f"{where}: no stage {value}"
                if label == "endpoint":
                    assert value in routes, f"{where}: no route {value}"
                if label == "job":
                    assert value in jobs, f"{where}: no scrape job {value}"
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels, f"{where}: aggregates by {label}, a label none of {sorted(names)} has"
    exprs = " ".join(expr for _, expr in queries)
    # The panels the issue asks for.
    for needle in ('rate(recloop_serving_requests_total{endpoint="/v1/recommendations"}',
                   "histogram_quantile(0.5, sum by (le, stage)", "histogram_quantile(0.95, sum by (le, stage)",
                   "histogram_quantile(0.99, sum by (le, stage)",
                   'histogram_quantile(0.99, sum by (le) (rate(recloop_serving_stage_seconds_bucket{stage="total"}',
                   "recloop_serving_errors_total", "sum by (reason) (rate(recloop_serving_fallbacks_total",
                   "max(recloop_serving_model_version)"):
        assert needle in exprs, needle


def test_prometheus_scrapes_declared_services(services):
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == MONITORING / "prometheus.yml"
    (rules_glob,) = prometheus["rule_files"]
    rules_mount = next(target for target in mounts if re.fullmatch(rules_glob.replace("*", ".*"), target))
    assert Path(mounts[rules_mount]) == MONITORING / "prometheus-rules.yml"
    targets = {}
    for job in prometheus["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host != "localhost":
                    assert host in services, f"{job['job_name']}: {host} is not a compose service"
                    assert int(port) == LISTENS[host], f"{job['job_name']}: {host} listens on {LISTENS[host]}"
                targets[job["job_name"]] = (host, job.get("metrics_path", "/metrics"))
    assert targets["recloop-serving"] == ("serving", "/metrics")
    assert "/metrics" in serving_routes()


def test_grafana_provisioning_matches_the_stack(services):
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == MONITORING / "grafana" / "provisioning"
    (datasources_file,) = (provisioning / "datasources").glob("*.yml")
    (providers_file,) = (provisioning / "dashboards").glob("*.yml")
    datasources = {d["uid"]: d for d in yaml.safe_load(datasources_file.read_text())["datasources"]}
    (provider,) = yaml.safe_load(providers_file.read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    env = environment(grafana)
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{provider['options']['path']}/{DASHBOARD.name}"
    for ds in datasources.values():
        for var in re.findall(r"\$__env\{(\w+)\}", json.dumps(ds)):
            assert env.get(var), f"data source {ds['name']} reads {var}, which the grafana service lacks"
        url = ds["url"] if "://" in ds["url"] else f"postgres://{ds['url']}"
        host, port = urlparse(url).hostname, urlparse(url).port
        assert host in services and port == LISTENS[host] and host in depends_closure(services, "grafana")
    (pg,) = [d for d in datasources.values() if d["type"] == "postgres"]
    mlflow_db = urlparse(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]).path.lstrip("/")
    assert pg["jsonData"]["database"] == mlflow_db
    assert env["GRAFANA_PG_USER"] == re.search(r'GRAFANA_PG_USER:-(\w+)', INIT_SCRIPT.read_text()).group(1)
    # The dashboard: valid, each query on a provisioned data source of the right type.
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "recloop"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            ref = target.get("datasource") or panel["datasource"]
            assert ref["uid"] in datasources and ref["type"] == datasources[ref["uid"]]["type"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    # The drift-share panel's line is the decision threshold monitoring/drift.yaml applies.
    from recloop.drift import DriftConfig

    (share,) = [p for p in dashboard["panels"] if p["title"] == "Share of drifted columns per day"]
    steps = share["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == DriftConfig.load().drift_share


# --------------------------------------------------------------------------------------------------
# PostgreSQL: the init script, Grafana's role, and the drift panels on MLflow's real schema
# --------------------------------------------------------------------------------------------------


def drift_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", [])
            if (t.get("datasource") or p["datasource"])["type"] == "postgres"}


def grafana_sql(raw: str, start: str, end: str) -> str:
    """The SQL Grafana's PostgreSQL data source sends for `raw` over [start, end] ($__timeFilter only)."""
    sql = re.sub(r"\$__timeFilter\(([^()]+)\)", lambda m: f"{m.group(1)} BETWEEN '{start}' AND '{end}'", raw)
    assert "$" not in sql, f"a Grafana macro or variable this test does not expand: {sql}"
    return sql


@pytest.fixture()
def stack_databases(pg_dsn, tmp_path) -> Iterator[dict[str, Any]]:
    """deploy/postgres/init-databases.sh run (twice: it is idempotent) on the test server with unique
    database and role names; everything dropped afterwards."""
    import psycopg

    if not shutil.which("psql"):
        message = "psql (postgresql-client) is needed to run deploy/postgres/init-databases.sh"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    prefix = f"rlc{uuid.uuid4().hex[:8]}"
    names = {n: f"{prefix}_{n}" for n in ("dagster", "mlflow", "feast", "recloop", "airflow")}
    reader = f"{prefix}_grafana"
    server = urlparse(pg_dsn)
    env = {"PATH": os.environ["PATH"], "PGHOST": server.hostname or "127.0.0.1", "PGPORT": str(server.port or 5432),
           "POSTGRES_USER": server.username or "postgres", "POSTGRES_DB": server.path.lstrip("/") or "postgres",
           "INIT_DATABASES": " ".join(names.values()), "MLFLOW_DATABASE": names["mlflow"],
           "GRAFANA_PG_USER": reader, "GRAFANA_PG_PASSWORD": "it's a test"}
    if server.password:
        env["PGPASSWORD"] = server.password
    try:
        for _ in range(2):
            proc = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
        yield {"names": names, "reader": reader, "server": server}
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for db in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{reader}"')


@pytest.mark.postgres
def test_grafana_reads_the_drift_reports_mlflow_stores(stack_databases, tmp_path):
    import psycopg

    from recloop.registry import Registry

    names, reader, server = stack_databases["names"], stack_databases["reader"], stack_databases["server"]
    with psycopg.connect(host=server.hostname, port=server.port or 5432, user=server.username or "postgres",
                         password=server.password, dbname=server.path.lstrip("/") or "postgres") as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    assert set(names.values()) <= existing

    # MLflow creates its schema in the database, and recloop logs three days of drift reports the way the
    # monitoring asset does. Day 2 is re-run: the dashboard shows its latest report only.
    auth = f"{server.username or 'postgres'}{':' + server.password if server.password else ''}"
    uri = f"postgresql+psycopg2://{auth}@{server.hostname}:{server.port or 5432}/{names['mlflow']}"
    registry = Registry(uri, "recloop-compose-test", artifact_location=tmp_path.as_uri())
    registry.client.create_registered_model("recloop-compose-test")
    model = registry.client.create_model_version("recloop-compose-test", source="s3://recloop/mlflow/models/m-1")
    version = str(model.version)
    reports = [
        ("2025-01-10", False, {"decided": 1, "drifted": 0, "columns.tested": 20, "columns.drifted": 1,
                               "columns.drifted_share": 0.05, "column.category": 0.04, "column.device": 0.02,
                               "signal.cold_start_users": 0.1, "signal.cold_start_users.training_window": 0.3},
         ["no drift"]),
        ("2025-01-11", False, {"decided": 1, "drifted": 0, "columns.tested": 20, "columns.drifted": 2,
                               "columns.drifted_share": 0.1, "column.category": 0.05}, ["no drift"]),
        ("2025-01-11", True, {"decided": 1, "drifted": 1, "columns.tested": 20, "columns.drifted": 7,
                              "columns.drifted_share": 0.35, "column.category": 0.097, "column.device": 0.21,
                              "signal.cold_start_users": 0.41}, ["category drifted", "device drifted"]),
        ("2025-01-12", False, {"decided": 0, "drifted": 0, "columns.tested": 0, "columns.drifted": 0,
                               "columns.drifted_share": 0.0}, ["no decision: the partition has 12 events < min_rows 1000"]),
    ]
    for partition, drifted, summary, reasons in reports:
        registry.log_drift_report(partition=partition, model_version=version, drifted=drifted, summary=summary,
                                  report_uri=f"s3://recloop/lake/monitoring/drift/date={partition}/report.html",
                                  reasons=reasons)
        time.sleep(0.01)  # distinct start times

    queries = drift_queries()
    assert set(queries) == {"Drifted columns per day", "Share of drifted columns per day",
                            "Column drift statistics per day", "Recommender signals per day", "Drift decisions"}
    # Grafana's role: reads MLflow's tables (created after the role, by default privileges), writes nothing,
    # and cannot even connect to the other databases.
    with psycopg.connect(host=server.hostname, port=server.port or 5432, user=reader, password="it's a test",
                         dbname=names["mlflow"], autocommit=True) as conn:
        def run(title: str, start: str = "2025-01-01T00:00:00Z", end: str = "2025-02-01T00:00:00Z") -> list[tuple]:
            return conn.execute(grafana_sql(queries[title], start, end)).fetchall()

        counts = run("Drifted columns per day")
        assert [(t.date().isoformat(), d, n) for t, d, n in counts] == [
            ("2025-01-10", 1, 20), ("2025-01-11", 7, 20), ("2025-01-12", 0, 0)]
        assert all(t.utcoffset().total_seconds() == 0 and t.hour == 0 for t, _, _ in counts)
        assert [(t.date().isoformat(), d) for t, d, _ in run("Drifted columns per day", "2025-01-11T00:00:00Z")] == [
            ("2025-01-11", 7), ("2025-01-12", 0)]
        assert [round(s, 2) for _, s in run("Share of drifted columns per day")] == [0.05, 0.35, 0.0]
        columns = {(t.date().isoformat(), metric): value for t, metric, value in run("Column drift statistics per day")}
        assert columns == {("2025-01-10", "category"): 0.04, ("2025-01-10", "device"): 0.02,
                           ("2025-01-11", "category"): 0.097, ("2025-01-11", "device"): 0.21}
        signals = {(t.date().isoformat(), metric): value for t, metric, value in run("Recommender signals per day")}
        assert signals == {("2025-01-10", "cold_start_users"): 0.1, ("2025-01-11", "cold_start_users"): 0.41}
        decisions = run("Drift decisions")
        assert decisions == [
            ("2025-01-12", "no decision", version, 0, "no decision: the partition has 12 events < min_rows 1000"),
            ("2025-01-11", "DRIFTED", version, 7, "category drifted; device drifted"),
            ("2025-01-10", "no drift", version, 1, "no drift"),
        ]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM runs")
    with pytest.raises(psycopg.OperationalError, match="CONNECT"):
        psycopg.connect(host=server.hostname, port=server.port or 5432, user=reader, password="it's a test",
                        dbname=names["dagster"]).close()
