"""Shared fixtures: telemetry off, an isolated RECLOOP_HOME per test, and the real servers.

Tests marked `postgres`, `redis` or `rabbitmq` use the servers on this machine, tests marked `browser` Debian's
Chromium (`chromium`). When a server or the browser is missing they skip on a developer's machine, but
fail with a clear message in CI (CI=true): a CI run must exercise them (`unavailable`).
S3 is moto's standalone server, started on loopback by the `s3_endpoint` fixture (no MinIO binary here);
each test gets its own bucket (`s3_bucket`), PostgreSQL databases (`pg_database`, `make_pg_database`)
and Feast project in Redis (`redis_feast_project`), all removed afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
import socket
import uuid
from urllib.parse import urlparse

import pytest

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "FEAST_USAGE": "False",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)

# Training jobs in tests run the latency gate with a small replay and a budget no shared machine misses:
# the gate's rule and its replay have their own tests (tests/*/test_latency_gate.py), which set their own.
for _key, _value in {
    "RECLOOP_LATENCY_SAMPLE": "30",
    "RECLOOP_LATENCY_WARMUP": "5",
    "RECLOOP_LATENCY_BUDGET_MS": "60000",
    "RECLOOP_LATENCY_MAX_RATIO": "100",
}.items():
    os.environ.setdefault(_key, _value)

# The deployment's service settings: a developer's shell may export them; an isolated test must not see them.
PRODUCTION_VARS = (
    "RECLOOP_S3_ENDPOINT_URL", "RECLOOP_REDIS_URL", "RECLOOP_FEAST_REGISTRY_URL", "RECLOOP_MLFLOW_TRACKING_URI",
    "RECLOOP_MLFLOW_ARTIFACT_URI", "RECLOOP_ALERTS_DB_URL", "RECLOOP_DAGSTER_PG_URL", "RECLOOP_DAGSTER_EXECUTOR",
    "RECLOOP_DAGSTER_MAX_CONCURRENT", "RECLOOP_CELERY_BROKER_URL", "RECLOOP_CELERY_BACKEND_URL", "RECLOOP_CELERY_QUEUE",
    "MLFLOW_S3_ENDPOINT_URL", "RECLOOP_TRAIN_PROCESSES", "RECLOOP_FEATURE_ENGINE", "RECLOOP_SPARK_MASTER",
)

PG_DSN = os.environ.get("RECLOOP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("RECLOOP_TEST_RABBITMQ_URL", "pyamqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str, default_port: int) -> str | None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err})"


def unavailable(message: str) -> None:
    """Something a test needs is missing: skip on a developer's machine, fail in CI (CI=true), where every
    test must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def require_server(name: str, url: str, default_port: int) -> None:
    problem = _reachable(url, default_port)
    if problem is None:
        return
    unavailable(f"{name} is needed by this test but {problem}; start it or set the test URL")


@pytest.fixture()
def pg_dsn() -> str:
    """The DSN of the `postgres` maintenance database on the test server."""
    require_server("PostgreSQL", PG_DSN, 5432)
    return PG_DSN


@pytest.fixture()
def make_pg_database(pg_dsn):
    """A factory of fresh PostgreSQL databases for one test (`make_pg_database("feast")` → a plain
    `postgresql://…/recloop_test_feast_<hex>` URL); every database it made is dropped afterwards, open
    connections and all."""
    import psycopg

    made: list[str] = []
    parsed = urlparse(pg_dsn)

    def make(label: str = "db") -> str:
        name = f"recloop_test_{label}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return parsed._replace(path=f"/{name}").geturl()

    yield make
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def pg_database(make_pg_database):
    """A fresh PostgreSQL database for one test, dropped afterwards. Yields its URL."""
    return make_pg_database("db")


@pytest.fixture()
def redis_url() -> str:
    require_server("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture()
def rabbitmq_url() -> str:
    """The broker URL of the RabbitMQ on this machine (RECLOOP_TEST_RABBITMQ_URL)."""
    require_server("RabbitMQ", RABBITMQ_URL, 5672)
    return RABBITMQ_URL


@pytest.fixture()
def redis_feast_project(redis_url):
    """A unique Feast project name; every Redis key of that project is deleted afterwards (Feast's Redis
    keys end with the project name), and the cleanup checks none is left."""
    project = f"t_prod_{uuid.uuid4().hex[:10]}"
    yield project
    assert drop_feast_redis_keys(redis_url, project) == 0


@pytest.fixture()
def drop_feast_keys(redis_url):
    """`drop_feast_keys(project)`: `drop_feast_redis_keys` on the test Redis, for a project a test made."""
    return lambda project: drop_feast_redis_keys(redis_url, project)


def drop_feast_redis_keys(redis_url: str, project: str) -> int:
    """Deletes every Redis key of Feast project `project` (Feast's Redis keys are `<serialized entity
    key><project>`); returns how many are left (0)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=b"*" + project.encode(), count=1000))
        if keys:
            client.delete(*keys)
        return len(list(client.scan_iter(match=b"*" + project.encode(), count=1000)))
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3-compatible server on a free loopback port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: thousands of lines in a failing test's captured log
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the loopback S3 server, with dummy AWS credentials in the environment (boto3,
    Arrow's S3 client and MLflow all read them from there). Yields `(endpoint_url, bucket)`; the bucket
    and everything in it are deleted afterwards."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"recloop-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    yield s3_endpoint, bucket
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


def _isolated_home(home: Path, monkeypatch: pytest.MonkeyPatch):
    """RECLOOP_HOME (landing, lake, Feast) and DAGSTER_HOME under `home`, a fresh Feast project, none of
    the deployment's service settings; returns the Settings."""
    monkeypatch.setenv("RECLOOP_HOME", str(home))
    (home / "dagster").mkdir(parents=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("RECLOOP_FEAST_PROJECT", f"t{uuid.uuid4().hex[:10]}")
    for var in ("RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV", *PRODUCTION_VARS):
        monkeypatch.delenv(var, raising=False)
    from recloop.config import Settings

    return Settings.from_env()


@pytest.fixture()
def recloop_env(tmp_path, monkeypatch):
    """An isolated embedded deployment under tmp_path: landing, lake, Feast and Dagster homes."""
    return _isolated_home(tmp_path / "recloop", monkeypatch)


@pytest.fixture(scope="session")
def isolated_home():
    """`isolated_home(home, monkeypatch)`: what `recloop_env` sets up, for a fixture of wider scope (one
    deployment shared by a module's tests, with its own `pytest.MonkeyPatch.context()`)."""
    return _isolated_home


# --- the browser ---------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium for Playwright (`executable_path`): Playwright's own browser builds are never
    downloaded. `make system-packages` installs it (as root); a missing browser or `playwright` package
    skips on a developer's machine and fails in CI."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        unavailable('the Python package playwright is needed by the browser tests: pip install -c constraints.txt -e ".[dev]"')
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"Chromium is needed by the browser tests but {CHROMIUM} is missing: "
                    "apt-get install chromium fonts-dejavu-core (or `make system-packages` as root)")
    return CHROMIUM


@pytest.fixture()
def webhook_receiver(recloop_env, monkeypatch):
    """A real Standard Webhooks receiver on loopback (`recloop.alerts.WebhookReceiver`), configured as the
    deployment's alert endpoint through RECLOOP_ALERT_WEBHOOK_URL / _SECRET."""
    from recloop.alerts import WebhookReceiver, new_secret

    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_URL", receiver.url)
        monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_SECRET", secret)
        yield receiver


# --- real data -----------------------------------------------------------------------------------------

def _ml_latest_small_candidates() -> list[Path]:
    """Where MovieLens ml-latest-small may be: RECLOOP_TEST_ML_LATEST_SMALL, then ../shared/data beside the
    repository (a development checkout), then /work/shared/data (a clone elsewhere on this kind of machine)."""
    from recloop.config import REPO_ROOT

    given = os.environ.get("RECLOOP_TEST_ML_LATEST_SMALL")
    return ([Path(given)] if given else []) + [
        REPO_ROOT.parent / "shared" / "data" / "ml-latest-small", Path("/work/shared/data/ml-latest-small"),
    ]


@pytest.fixture(scope="session")
def ml_latest_small() -> Path:
    """The folder of MovieLens ml-latest-small (read in place, never copied into the repository). Fails
    under CI=true when it is missing, skips otherwise."""
    for folder in _ml_latest_small_candidates():
        if (folder / "ratings.csv").is_file():
            return folder
    message = ("MovieLens ml-latest-small is needed (../shared/data/ml-latest-small or RECLOOP_TEST_ML_LATEST_SMALL); "
               f"looked in {', '.join(map(str, _ml_latest_small_candidates()))}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


# --- Spark -------------------------------------------------------------------------------------------

# Test-only Spark settings for a small data set on a shared machine: the JVM's quick compiler only, no
# whole-stage code generation, no adaptive re-planning, two shuffle partitions (start-up and the first queries
# take a third of the time; results do not depend on them: bench/feature_engines.py runs the defaults).
SPARK_TEST_CONF = {
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.shuffle.partitions": "2",
}


@pytest.fixture(scope="module")
def spark_session():
    """The process's Spark session of recloop.spark_features on local[2], started once for a test module and
    stopped after it (its JVM holds a GB or two). pyspark or Java 17+ missing: skips on a developer's machine,
    fails in CI (`.ci/system-packages` installs a JRE)."""
    from recloop import spark_features

    try:
        spark_features.check_available()
    except spark_features.SparkUnavailable as err:
        unavailable(str(err))
    yield spark_features.session("local[2]", conf=SPARK_TEST_CONF)
    spark_features.stop()


@pytest.fixture()
def spark_engine(spark_session, monkeypatch):
    """RECLOOP_FEATURE_ENGINE=spark (local[2]) for one test: recloop.features computes on Spark."""
    monkeypatch.setenv("RECLOOP_FEATURE_ENGINE", "spark")
    monkeypatch.setenv("RECLOOP_SPARK_MASTER", "local[2]")
    return spark_session
