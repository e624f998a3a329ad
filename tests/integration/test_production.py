"""The production deployment (RECLOOP_ENV=production) against real services on this machine: PostgreSQL
(127.0.0.1:5432) for Feast's SQL registry, MLflow's backend store, the alert log and the Dagster instance;
Redis (127.0.0.1:6379) for Feast's online store; and S3 through moto's standalone server on loopback
(S3-compatible, started by the `s3_endpoint` fixture) for the landing zone, the lake and MLflow's
artifacts. Every test has its own bucket, databases and Feast project, all removed afterwards.

When a server is unreachable these tests skip on a developer's machine and fail under CI=true (see
tests/conftest.py `require_server`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from recloop.config import REPO_ROOT, Settings, SettingsError

PRODUCTION_SETTING_VARS = (
    "RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_REDIS_URL", "RECLOOP_FEAST_REGISTRY_URL",
    "RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_ALERTS_DB_URL", "RECLOOP_DAGSTER_PG_URL",
)


# --------------------------------------------------------------------------------------------------
# Settings: one switch, fail fast, secrets masked (no server needed)
# --------------------------------------------------------------------------------------------------


def _clear(monkeypatch) -> None:
    for var in (*PRODUCTION_SETTING_VARS, "RECLOOP_MLFLOW_ARTIFACT_URI", "RECLOOP_S3_ENDPOINT_URL",
                "RECLOOP_DAGSTER_EXECUTOR", "RECLOOP_DAGSTER_MAX_CONCURRENT"):
        monkeypatch.delenv(var, raising=False)


def test_production_settings_fail_fast_listing_every_missing_variable(tmp_path, monkeypatch):
    _clear(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECLOOP_ENV", "production")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    # one error, every required variable in it, nothing silently defaulted to a local folder
    assert err.value.variables == list(PRODUCTION_SETTING_VARS)
    message = str(err.value)
    assert message.startswith("RECLOOP_ENV=production: 7 setting(s) missing or invalid")
    assert all(f"  - {var}: missing" in message for var in PRODUCTION_SETTING_VARS)
    assert not (tmp_path / "home").exists()

    # Present but wrong values are listed with the missing ones; a database tracking store needs an
    # S3 artifact root.
    monkeypatch.setenv("RECLOOP_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("RECLOOP_MLFLOW_TRACKING_URI", "postgresql+psycopg://mlflow:pw@db/mlflow")
    monkeypatch.setenv("RECLOOP_DAGSTER_PG_URL", "postgresql+psycopg://dagster@db/dagster")
    monkeypatch.setenv("RECLOOP_DAGSTER_MAX_CONCURRENT", "many")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert err.value.variables == [
        "RECLOOP_DAGSTER_MAX_CONCURRENT", "RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_REDIS_URL",
        "RECLOOP_FEAST_REGISTRY_URL", "RECLOOP_ALERTS_DB_URL", "RECLOOP_DAGSTER_PG_URL",
        "RECLOOP_MLFLOW_ARTIFACT_URI",
    ]
    assert "is not valid (expected s3://" in str(err.value) and "pw" not in str(err.value)

    # The embedded default needs none of them.
    monkeypatch.setenv("RECLOOP_ENV", "local")
    _clear(monkeypatch)
    local = Settings.from_env()
    assert local.lake_uri == str(tmp_path / "home" / "lake") and not local.is_production


def _full_production_env(monkeypatch, **overrides) -> dict[str, str]:
    values = {
        "RECLOOP_ENV": "production",
        "RECLOOP_LANDING_URI": "s3://landing-bucket/landing",
        "RECLOOP_LAKE_URI": "s3://lake-bucket/lake",
        "RECLOOP_REDIS_URL": "redis://:redis-s3cret@redis:6379/0",
        "RECLOOP_FEAST_REGISTRY_URL": "postgresql+psycopg://feast:feast-s3cret@postgres:5432/feast",
        "RECLOOP_MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RECLOOP_ALERTS_DB_URL": "postgresql+psycopg://recloop:alerts-s3cret@postgres:5432/recloop",
        "RECLOOP_DAGSTER_PG_URL": "postgresql+psycopg2://dagster:dagster-s3cret@postgres:5432/dagster",
        **overrides,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_secrets_come_from_the_environment_only_and_are_masked(tmp_path, monkeypatch):
    _clear(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))
    # A .env file (or any file) is never read: only the process environment counts.
    (tmp_path / ".env").write_text("RECLOOP_ENV=production\nRECLOOP_REDIS_URL=redis://:from-file@x:6379/0\n")
    monkeypatch.delenv("RECLOOP_ENV", raising=False)
    assert Settings.from_env().env == "local" and Settings.from_env().redis_url is None

    _full_production_env(monkeypatch)
    settings = Settings.from_env()
    assert settings.is_production and settings.redis_url == "redis://:redis-s3cret@redis:6379/0"
    shown = [repr(settings), str(settings), str(settings.describe())]
    for text in shown:
        for secret in ("redis-s3cret", "feast-s3cret", "alerts-s3cret", "dagster-s3cret"):
            assert secret not in text
    described = settings.describe()
    assert described["RECLOOP_FEAST_REGISTRY_URL"] == "postgresql+psycopg://feast:***@postgres:5432/feast"
    assert described["RECLOOP_REDIS_URL"] == "redis://:***@redis:6379/0"
    assert described["RECLOOP_LAKE_URI"] == "s3://lake-bucket/lake"
    # URLs without a secret are shown exactly as given (an absolute SQLite path keeps its four slashes).
    from recloop.config import mask_url

    assert mask_url("sqlite:////var/lib/recloop/mlflow.db") == "sqlite:////var/lib/recloop/mlflow.db"
    assert mask_url("s3://b/p?secret_key=abc&x=1") == "s3://b/p?secret_key=***&x=1"

    # Dagster's resource view shows the variable, not the URL with its password.
    from pipelines.defs.resources import resources_from_settings

    feast = resources_from_settings(settings)["feast"]
    assert feast.online_store == "redis" and repr(feast.redis_url) == "'RECLOOP_REDIS_URL'"
    assert "redis-s3cret" not in repr(feast)

    # No secret is written in the files a deployment ships: the Dagster instance reads its URL from the
    # environment, the Feast repo takes its locations from recloop's settings at run time.
    dagster_yaml = (REPO_ROOT / "deploy" / "dagster.yaml").read_text()
    assert "env: RECLOOP_DAGSTER_PG_URL" in dagster_yaml and "postgresql" not in dagster_yaml.split("storage:")[1]
    credentials = re.compile(r"[a-z0-9+]+://[^/\s'\"@]+@")  # scheme://user[:password]@
    for path in [REPO_ROOT / "deploy" / "dagster.yaml", *sorted((REPO_ROOT / "feature_repo").glob("*"))]:
        if path.is_file():
            code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
            assert not credentials.search(code), path


def _executors() -> dict[str, tuple[str, dict]]:
    from pipelines.definitions import defs

    resolved = defs()
    out = {}
    for name in ("data_plane_job", "feast_apply_job", "training_job", "drift_job"):
        executor = resolved.resolve_job_def(name).executor_def
        schema = executor.config_schema  # a configured executor resolves its fixed config
        out[name] = (executor.name, schema.resolve_config({}).value if hasattr(schema, "resolve_config") else {})
    return out


def test_executor_is_chosen_by_settings(recloop_env, monkeypatch):
    # default: multiprocess, two steps at a time, for every job of the code location
    for name, config in _executors().values():
        assert name == "multiprocess" and config["config"]["max_concurrent"] == 2
    monkeypatch.setenv("RECLOOP_DAGSTER_MAX_CONCURRENT", "3")
    assert {c["config"]["max_concurrent"] for _, c in _executors().values()} == {3}
    monkeypatch.setenv("RECLOOP_DAGSTER_EXECUTOR", "in_process")
    assert {name for name, _ in _executors().values()} == {"in_process"}
    # celery: every step a task on the broker of RECLOOP_CELERY_BROKER_URL, in RECLOOP_CELERY_QUEUE, with
    # deploy/celery.yaml's Celery settings (the ones the workers are started with)
    monkeypatch.setenv("RECLOOP_DAGSTER_EXECUTOR", "celery")
    monkeypatch.setenv("RECLOOP_CELERY_QUEUE", "recloop-steps")
    executors = _executors()
    assert {name for name, _ in executors.values()} == {"celery"}
    config = executors["data_plane_job"][1]["config"]
    assert config["broker"] == "pyamqp://guest:guest@127.0.0.1:5672//" and config["backend"] == "rpc://"
    source = config["config_source"]
    assert source["task_default_queue"] == "recloop-steps"
    assert source["task_acks_late"] is True and source["task_reject_on_worker_lost"] is True
    assert source["worker_prefetch_multiplier"] == 1
    # a broker URL with a password stays a reference to its variable in the job's configuration
    monkeypatch.setenv("RECLOOP_CELERY_BROKER_URL", "amqp://recloop:s3cret@rabbitmq:5672//")
    from recloop.scaleout import executor_config

    assert executor_config(Settings.from_env())["broker"] == {"env": "RECLOOP_CELERY_BROKER_URL"}
    assert _executors()["training_job"][1]["config"]["broker"] == "amqp://recloop:s3cret@rabbitmq:5672//"
    assert "s3cret" not in repr(Settings.from_env()) and "s3cret" not in str(Settings.from_env().describe())
    monkeypatch.setenv("RECLOOP_CELERY_BROKER_URL", "http://rabbitmq:5672")
    monkeypatch.setenv("RECLOOP_CELERY_QUEUE", "no spaces")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert err.value.variables == ["RECLOOP_CELERY_BROKER_URL", "RECLOOP_CELERY_QUEUE"]
    monkeypatch.delenv("RECLOOP_CELERY_BROKER_URL")
    monkeypatch.delenv("RECLOOP_CELERY_QUEUE")
    # in production the broker must be given (no fallback to this machine's)
    monkeypatch.setenv("RECLOOP_ENV", "production")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert "RECLOOP_CELERY_BROKER_URL" in err.value.variables
    monkeypatch.delenv("RECLOOP_ENV")
    monkeypatch.setenv("RECLOOP_DAGSTER_EXECUTOR", "kubernetes")
    with pytest.raises(SettingsError, match="RECLOOP_DAGSTER_EXECUTOR: must be one of multiprocess, in_process, celery, k8s"):
        Settings.from_env()


@pytest.mark.rabbitmq
def test_celery_without_a_worker_says_so_before_running(recloop_env, monkeypatch, rabbitmq_url):
    """RECLOOP_DAGSTER_EXECUTOR=celery with nobody listening on the queue (or no broker): one sentence that
    names the queue and the command that starts a worker, before any run is created."""
    from pipelines.run import instance, run_job
    from recloop.scaleout import CeleryUnavailable

    monkeypatch.setenv("RECLOOP_DAGSTER_EXECUTOR", "celery")
    monkeypatch.setenv("RECLOOP_CELERY_BROKER_URL", rabbitmq_url)
    monkeypatch.setenv("RECLOOP_CELERY_QUEUE", f"recloop-nobody-{os.getpid()}")
    inst = instance(Settings.from_env())
    with pytest.raises(CeleryUnavailable, match=r"no Celery worker listens on queue 'recloop-nobody-\d+'.*"
                                                r"dagster-celery worker start -A dagster_celery.app -y .*celery.yaml"):
        run_job("feast_apply_job", inst=inst)
    monkeypatch.setenv("RECLOOP_CELERY_BROKER_URL", "pyamqp://guest:guest@127.0.0.1:1//")
    with pytest.raises(CeleryUnavailable, match="the Celery broker pyamqp://guest:\\*\\*\\*@127.0.0.1:1// cannot be reached"):
        run_job("feast_apply_job", inst=inst)
    assert not inst.get_runs()


# --------------------------------------------------------------------------------------------------
# The production deployment on the local services
# --------------------------------------------------------------------------------------------------


@dataclass
class Production:
    settings: Settings
    endpoint: str
    bucket: str
    databases: dict[str, str]  # role -> plain postgresql:// URL of its own database
    redis_url: str
    project: str


def _driver(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture()
def production(recloop_env, s3_bucket, make_pg_database, redis_url, redis_feast_project, monkeypatch) -> Production:
    """RECLOOP_ENV=production with every setting pointing at this machine's services: the landing zone,
    the lake and MLflow's artifacts in one fresh bucket of the loopback S3 server; Feast's SQL registry,
    MLflow's backend store, the alert log and the Dagster instance each in a fresh PostgreSQL database;
    Feast's online store in Redis under a fresh project. Jobs run in process (tests stay fast)."""
    endpoint, bucket = s3_bucket
    databases = {role: make_pg_database(role) for role in ("feast", "mlflow", "alerts", "dagster")}
    values = {
        "RECLOOP_ENV": "production",
        "RECLOOP_LANDING_URI": f"s3://{bucket}/landing",
        "RECLOOP_LAKE_URI": f"s3://{bucket}/lake",
        "RECLOOP_S3_ENDPOINT_URL": endpoint,
        "RECLOOP_REDIS_URL": redis_url,
        "RECLOOP_FEAST_PROJECT": redis_feast_project,
        "RECLOOP_FEAST_REGISTRY_URL": _driver(databases["feast"], "psycopg"),
        "RECLOOP_MLFLOW_TRACKING_URI": _driver(databases["mlflow"], "psycopg"),
        "RECLOOP_MLFLOW_ARTIFACT_URI": f"s3://{bucket}/mlflow",
        "RECLOOP_ALERTS_DB_URL": _driver(databases["alerts"], "psycopg"),
        "RECLOOP_DAGSTER_PG_URL": _driver(databases["dagster"], "psycopg2"),
        "RECLOOP_DAGSTER_EXECUTOR": "in_process",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    settings = Settings.from_env()
    assert settings.is_production
    return Production(settings, endpoint, bucket, databases, redis_url, redis_feast_project)


def _s3_keys(prod: Production, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=prod.endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=prod.bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def _rows(url: str, sql: str, *params) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.mark.postgres
@pytest.mark.redis
def test_feast_production_stores_on_s3_postgres_and_redis(production):
    """Feast in production: SQL registry on PostgreSQL, Redis online store, and the offline store reading
    the lake's snapshots on S3 (apply, materialize, online and point-in-time historical retrieval)."""
    import pandas as pd
    import redis

    from recloop import features as F
    from recloop.data.simulator import SimConfig, simulate_validated
    from recloop.lake import open_lake

    settings = production.settings
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    days = simulate_validated(SimConfig(seed=3, days=2, initial_users=60, initial_videos=40, events_per_day=600,
                                        new_users_per_day=2, new_videos_per_day=2), lake)
    assert any(k.startswith("lake/features/user_activity/date=") for k in _s3_keys(production, "lake/"))

    store = F.feature_store(settings)
    assert store.config.registry.registry_type == "sql"
    assert store.config.online_store.type == "redis"
    assert store.config.offline_store.type == "recloop.feast_offline.S3DuckDBOfflineStore"
    applied = F.apply_repo(settings)
    assert applied["feature_views"] == sorted(F.FEATURE_VIEWS) and applied["project"] == production.project

    registry_db = production.databases["feast"]
    views = _rows(registry_db, "select feature_view_name from feature_views where project_id = %s", production.project)
    assert sorted(v for (v,) in views) == sorted(F.FEATURE_VIEWS)
    assert _rows(registry_db, "select count(*) from feature_services where project_id = %s", production.project)[0][0] == 2

    result = F.materialize_partition(settings, days[-1], lake=lake)
    assert result["online_store"] == "redis" and not result["skipped"]
    snapshot = lake.read_partition("features/user_activity", days[-1]).to_pandas().set_index("user_id")
    assert result["views"]["user_activity"]["rows"] == len(snapshot)

    # online: the values of the lake's snapshot, read back from Redis (and the keys are there)
    users = list(snapshot.index[:5])
    online = F.online_features(settings, user_ids=users, video_ids=["nope"] * len(users),
                               features=["user_activity:watch_s_28d", "user_activity:impressions_28d"])
    assert online["user_activity__watch_s_28d"].tolist() == pytest.approx(snapshot.loc[users, "watch_s_28d"].tolist())
    assert online["user_activity__impressions_28d"].tolist() == snapshot.loc[users, "impressions_28d"].tolist()
    client = redis.Redis.from_url(production.redis_url)
    try:
        keys = list(client.scan_iter(match=b"*" + production.project.encode(), count=1000))
    finally:
        client.close()
    assert len(keys) >= len(snapshot)

    # historical: point in time, from the S3 snapshots (an hour into day D+1 sees day D's snapshot)
    at = F.snapshot_time(days[0]) + pd.Timedelta(hours=1)
    first = lake.read_partition("features/user_activity", days[0]).to_pandas().set_index("user_id")
    entity = pd.DataFrame({"user_id": list(first.index[:4]), "video_id": "v0", "event_timestamp": at,
                           "label": range(4)})
    hist = F.training_set(settings, entity, "retrieval_features")
    assert hist["label"].tolist() == [0, 1, 2, 3]
    assert hist["user_activity__watch_s_28d"].tolist() == pytest.approx(first.loc[entity.user_id, "watch_s_28d"].tolist())


@pytest.mark.postgres
@pytest.mark.redis  # through the `production` fixture's Feast project
def test_mlflow_database_backend_with_s3_artifacts(production, tmp_path):
    """MLflow without a tracking server: the PostgreSQL backend store reached directly, artifacts of new
    experiments under RECLOOP_MLFLOW_ARTIFACT_URI on S3, at the lake's S3 endpoint."""
    from recloop.registry import open_registry, registry_settings

    rs = registry_settings(production.settings)
    assert rs.tracking_uri == _driver(production.databases["mlflow"], "psycopg")
    assert rs.artifact_location == f"s3://{production.bucket}/mlflow"
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == production.endpoint  # defaulted from RECLOOP_S3_ENDPOINT_URL

    registry = open_registry(production.settings)
    experiment_id = registry._experiment_id("recloop-production-check")
    experiment = registry.client.get_experiment(experiment_id)
    assert experiment.artifact_location == f"s3://{production.bucket}/mlflow/recloop-production-check"
    run = registry.client.create_run(experiment_id)
    registry.client.log_text(run.info.run_id, "written through MLflow", "notes/check.txt")
    registry.client.set_terminated(run.info.run_id)
    key = f"mlflow/recloop-production-check/{run.info.run_id}/artifacts/notes/check.txt"
    assert key in _s3_keys(production, "mlflow/")
    local = registry.client.download_artifacts(run.info.run_id, "notes/check.txt", str(tmp_path))
    assert Path(local).read_text() == "written through MLflow"
    # the run itself is in PostgreSQL
    assert _rows(production.databases["mlflow"], "select status from runs where run_uuid = %s",
                 run.info.run_id) == [("FINISHED",)]


BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(production, tmp_path, monkeypatch) -> str:
    """`mlflow server` as production runs it: PostgreSQL backend store (the test's own database), artifacts
    proxied by the server (`--serve-artifacts`) to `s3://<bucket>/mlflow` on the loopback S3 server; one
    worker, no job execution (2 processes, ~10 s to start). Becomes RECLOOP_MLFLOW_TRACKING_URI."""
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": production.endpoint,  # the server's own boto3 writes to S3
        "PYTHONWARNINGS": "ignore",
    }
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", _driver(production.databases["mlflow"], "psycopg"),
        "--artifacts-destination", f"s3://{production.bucket}/mlflow",
        "--serve-artifacts", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        monkeypatch.setenv("RECLOOP_MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("RECLOOP_MLFLOW_ARTIFACT_URI")  # the server decides where artifacts go
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_production_lifecycle_from_ingestion_to_promotion(production, mlflow_server, webhook_receiver, monkeypatch):
    """RECLOOP_ENV=production end to end: simulated files land in S3, the Dagster data plane ingests,
    validates and builds features into the S3 lake, Feast (SQL registry on PostgreSQL, Redis online store)
    serves them, the training job trains on Feast's historical retrieval from the S3 snapshots, logs the
    bundle through the MLflow server into S3 and promotes it; every Dagster run is recorded in the
    PostgreSQL instance of deploy/dagster.yaml, every alert in the PostgreSQL delivery log."""
    import dagster as dg
    import pandas as pd
    import redis

    from pipelines.run import instance, run_data_plane, run_job
    from recloop import features as F
    from recloop.data.simulator import SimConfig, simulate
    from recloop.lake import open_lake
    from recloop.registry import CHAMPION, open_registry, registry_settings

    # The latency gate runs in production too (its replay reads the S3 lake and Redis, and logs into a
    # throwaway landing zone of its own); whatever this shared machine's load, it passes here.
    monkeypatch.setenv("RECLOOP_LATENCY_BUDGET_MS", "60000")
    monkeypatch.setenv("RECLOOP_LATENCY_MAX_RATIO", "100")
    monkeypatch.setenv("RECLOOP_LATENCY_SAMPLE", "40")
    settings = Settings.from_env()
    assert settings.is_production and settings.mlflow_tracking_uri == mlflow_server
    config = SimConfig(seed=5, days=4, initial_users=800, initial_videos=300, events_per_day=4_000,
                       new_users_per_day=20, new_videos_per_day=10)
    simulate(config, open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url))
    days = [config.date_of(i).isoformat() for i in range(config.days)]

    # The instance is deploy/dagster.yaml, on PostgreSQL.
    inst = instance(settings)
    assert type(inst.run_storage).__name__ == "PostgresRunStorage"
    assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(inst.schedule_storage).__name__ == "PostgresScheduleStorage"
    assert (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").read_text() == (REPO_ROOT / "deploy" / "dagster.yaml").read_text()

    runs = run_data_plane(days, settings=settings)
    assert all(r.success for r in runs), [r.error for r in runs]
    last = runs[-1]
    assert last.materialized["feast/online_features"]["online_store"] == "redis"
    assert last.materialized["feast/online_features"]["rows_written"] > 0
    ops = {"model__training_set": {"config": {"TrainDays": 3, "TestDays": 1}}}
    training = run_job("training_job", inst=inst, run_config_ops=ops)
    assert training.success, training.error
    assert training.checks["model/registered_version:promotion_gate"] is True
    assert training.checks["model/registered_version:latency_gate"] is True
    assert training.materialized["model/champion"]["champion"] == "1"

    # S3: landing zone and every layer of the lake, per day
    keys = set(_s3_keys(production, ""))
    for day in days:
        for dataset in ("bronze/users", "bronze/videos", "bronze/events", "silver/users", "silver/videos",
                        "silver/events", "quarantine/events", *(f"features/{v}" for v in F.FEATURE_VIEWS)):
            assert f"lake/{dataset}/date={day}/part-0.parquet" in keys, (dataset, day)
        assert any(k.startswith(f"landing/events/date={day}/") for k in keys)
    assert not [k for k in keys if not k.startswith(("landing/", "lake/", "mlflow/"))]

    # Feast: the SQL registry's tables in PostgreSQL hold the project
    registry_db = production.databases["feast"]
    assert _rows(registry_db, "select count(*) from projects where project_id = %s", production.project)[0][0] == 1
    views = _rows(registry_db, "select feature_view_name from feature_views where project_id = %s", production.project)
    assert sorted(v for (v,) in views) == sorted(F.FEATURE_VIEWS)

    # Feast online: the last day's snapshot, read back from Redis, and its keys in Redis
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    snapshot = lake.read_partition("features/video_popularity", days[-1]).to_pandas().set_index("video_id")
    videos = list(snapshot.index[:20])
    online = F.online_features(settings, user_ids=["nobody"] * len(videos), video_ids=videos,
                               features=["video_popularity:impressions_28d", "video_popularity:watch_s_28d"])
    assert online["video_popularity__impressions_28d"].tolist() == snapshot.loc[videos, "impressions_28d"].tolist()
    assert online["video_popularity__watch_s_28d"].tolist() == pytest.approx(snapshot.loc[videos, "watch_s_28d"].tolist())
    client = redis.Redis.from_url(production.redis_url)
    try:
        redis_keys = list(client.scan_iter(match=b"*" + production.project.encode(), count=1000))
    finally:
        client.close()
    assert len(redis_keys) >= len(snapshot)

    # MLflow: the champion's artifacts are in S3 (through the server's proxy), and models:/…@champion
    # loads back from there and recommends
    rs = registry_settings(settings)
    assert rs.tracking_uri == mlflow_server and rs.artifact_location is None
    registry = open_registry(settings)
    champion = registry.champion()
    assert champion is not None and str(champion.version) == "1"
    mlflow_keys = [k for k in keys if k.startswith("mlflow/")]
    assert any(k.endswith("/MLmodel") for k in mlflow_keys)
    assert any("/artifacts/bundle/" in k for k in mlflow_keys)
    assert any(k.endswith("data.json") for k in mlflow_keys)
    assert registry.model_uri(CHAMPION) == f"models:/{rs.model_name}@champion"
    model = registry.load(CHAMPION)  # mlflow.pyfunc.load_model of that URI, through the server from S3
    users = sorted(set(lake.read_partition("silver/events", days[-2]).column("user_id").to_pylist()))[:3]
    recs = model.predict(pd.DataFrame({"user_id": users, "k": 5}))
    assert recs.groupby("user_id")["rank"].apply(list).to_dict() == {u: [1, 2, 3, 4, 5] for u in users}
    catalog = {v for d in days for v in lake.read_partition("silver/videos", d).column("video_id").to_pylist()}
    assert recs["video_id"].isin(catalog).all()
    assert [(h["version"], h["decision"]) for h in registry.history()] == [("1", "promoted")]

    # Alerts: the promotion's signed webhook was delivered, and logged in PostgreSQL
    assert [a["type"] for a in webhook_receiver.of_type("model.promoted")] == ["model.promoted"]
    delivered = _rows(production.databases["alerts"],
                      "select e.type, d.status from alert_events e join alert_deliveries d on d.event_id = e.id")
    assert ("model.promoted", "delivered") in delivered

    # Dagster: every run and its events are in the instance's PostgreSQL database
    dagster_db = production.databases["dagster"]
    recorded = _rows(dagster_db, "select pipeline_name, status, partition from runs order by create_timestamp")
    assert [(job, status) for job, status, _ in recorded] == (
        [("feast_apply_job", "SUCCESS")] + [("data_plane_job", "SUCCESS")] * len(days) + [("training_job", "SUCCESS")]
    )
    assert [p for job, _, p in recorded if job == "data_plane_job"] == days
    (events,) = _rows(dagster_db, "select count(*) from event_logs where run_id = %s", training.run_id)[0]
    assert events > 20
    mats = inst.fetch_materializations(dg.AssetKey(["model", "champion"]), limit=5).records
    assert [m.run_id for m in mats] == [training.run_id]
    inst.dispose()
