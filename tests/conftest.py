"""Shared fixtures: telemetry off, an isolated RECLOOP_HOME per test, and the real servers.

Tests marked `postgres` or `redis` use the servers on this machine. When a server is unreachable they
skip on a developer's machine, but fail with a clear message in CI (CI=true): a CI run must exercise them.
"""

from __future__ import annotations

import os
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

PG_DSN = os.environ.get("RECLOOP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str, default_port: int) -> str | None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err})"


def require_server(name: str, url: str, default_port: int) -> None:
    problem = _reachable(url, default_port)
    if problem is None:
        return
    message = f"{name} is needed by this test but {problem}; start it or set the test URL"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture()
def pg_dsn() -> str:
    """The DSN of the `postgres` maintenance database on the test server."""
    require_server("PostgreSQL", PG_DSN, 5432)
    return PG_DSN


@pytest.fixture()
def pg_database(pg_dsn):
    """A fresh PostgreSQL database for one test, dropped afterwards. Yields its URL."""
    import psycopg

    name = f"recloop_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parsed = urlparse(pg_dsn)
    yield parsed._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def redis_url() -> str:
    require_server("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture()
def recloop_env(tmp_path, monkeypatch):
    """An isolated embedded deployment under tmp_path: landing, lake, Feast and Dagster homes."""
    home = tmp_path / "recloop"
    monkeypatch.setenv("RECLOOP_HOME", str(home))
    (home / "dagster").mkdir(parents=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("RECLOOP_FEAST_PROJECT", f"t{uuid.uuid4().hex[:10]}")
    for var in ("RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV"):
        monkeypatch.delenv(var, raising=False)
    from recloop.config import Settings

    return Settings.from_env()


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
