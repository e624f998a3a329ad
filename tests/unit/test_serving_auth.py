"""Authentication of the serving API (recloop.serving.auth): API keys from RECLOOP_API_KEYS on every
write, 401/403 with a clear body, rotation, constant-time comparison, per-key rate limits (429 +
Retry-After), open or keyed recommendations, /readyz without error text for callers without a key,
production refusing to start without keys, and feedback ids in their own namespace.

A real `RecommendationService` on an empty embedded home (MLflow registry in SQLite, a real spool and
landing zone), served in-process by FastAPI's TestClient; one test starts `recloop serve` for real.
"""

from __future__ import annotations

import hmac
import logging
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT, Settings, SettingsError
from recloop.lake import LocalLake
from recloop.registry import open_registry
from recloop.serving import ServingConfig, create_app
from recloop.serving import auth

KEY_A = "test-key-a-" + "a" * 24
KEY_B = "test-key-b-" + "b" * 24  # the rotated-in key: both are accepted at once


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving-auth")


@pytest.fixture(scope="module")
def settings(home) -> Settings:
    return Settings(home=home / "home", landing_uri=str(home / "landing"), lake_uri=str(home / "lake"),
                    feast_data_dir=home / "feast", feast_project=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def registry(settings):
    return open_registry(settings)


@pytest.fixture()
def make_client(settings, registry, serving_client):
    """`make_client(keys=..., **config)`: a started app around a fresh service; closed afterwards."""
    return lambda keys=f"{KEY_A},{KEY_B}", **overrides: serving_client(settings, registry, keys, **overrides)[0]


def events(n: int = 1, **fields) -> dict:
    now = datetime.now(timezone.utc).isoformat()
    return {"events": [{"user_id": f"u{i}", "video_id": f"v{i}", "watched_s": 1.0, "event_time": now, **fields}
                       for i in range(n)]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_feedback_needs_a_key_missing_is_401_wrong_is_403_and_every_rotated_key_works(make_client):
    client = make_client()
    missing = client.post("/v1/feedback", json=events())
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["detail"] and "X-API-Key" in missing.json()["detail"]
    for headers in (bearer("wrong-" + KEY_A), {"X-API-Key": KEY_A[:-1]}, {"Authorization": "Basic eDp5"}):
        wrong = client.post("/v1/feedback", json=events(), headers=headers)
        assert wrong.status_code in (401, 403), headers
    wrong = client.post("/v1/feedback", json=events(), headers=bearer("wrong-" + KEY_A))
    assert wrong.status_code == 403 and "invalid API key" in wrong.json()["detail"]
    # Both keys of the rotation, either header.
    for headers in (bearer(KEY_A), bearer(KEY_B), {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}):
        assert client.post("/v1/feedback", json=events(), headers=headers).status_code == 202, headers
    # Refusals are counted; no key ever appears in the metrics.
    text = client.get("/metrics").text
    assert 'recloop_serving_auth_failures_total{reason="missing"} 2.0' in text  # no key, and Basic
    assert 'recloop_serving_auth_failures_total{reason="invalid"} 3.0' in text
    assert KEY_A not in text and KEY_B not in text


def test_refused_feedback_is_not_stored(make_client):
    client = make_client()
    service = client.app.state.service
    assert client.post("/v1/feedback", json=events(5)).status_code == 401
    assert client.post("/v1/feedback", json=events(5), headers=bearer("x" * 40)).status_code == 403
    assert service.feedback.flush() == []
    assert service.history.stats().feedback_events == 0


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    keys = auth.ApiKeys.of([KEY_A, KEY_B, "c" * 32])
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert keys.match(KEY_A) == auth.key_id(KEY_A)  # the first key matches: every key is still compared
    assert len(calls) == 3 and all(a == b == 32 for a, b in calls)  # digests: equal lengths, whatever was sent
    calls.clear()
    assert keys.match("short") is None and len(calls) == 3
    assert KEY_A not in repr(keys) and KEY_A.encode() not in b"".join(d for _, d in keys.digests)


def test_rate_limit_per_key_answers_429_with_retry_after(make_client):
    client = make_client(rate_limit_per_second=0.2, rate_limit_burst=2)
    for _ in range(2):
        assert client.post("/v1/feedback", json=events(), headers=bearer(KEY_A)).status_code == 202
    limited = client.post("/v1/feedback", json=events(), headers=bearer(KEY_A))
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 5
    assert "rate limit" in limited.json()["detail"]
    # Another key has its own bucket.
    assert client.post("/v1/feedback", json=events(), headers=bearer(KEY_B)).status_code == 202
    assert 'recloop_serving_auth_failures_total{reason="rate_limited"} 1.0' in client.get("/metrics").text


def test_token_bucket_refills_at_its_rate():
    bucket = auth.TokenBucket(rate=2.0, burst=2)
    t0 = bucket.updated
    assert bucket.take(t0) == 0 and bucket.take(t0) == 0
    assert bucket.take(t0) == pytest.approx(0.5)
    assert bucket.take(t0 + 0.5) == 0  # one token back after 1/rate seconds
    assert auth.RateLimiter(0, 1).wait_seconds("k", "feedback") == 0  # rate 0: no limit


def test_recommendations_are_open_by_default_and_keyed_by_the_setting(make_client):
    body = {"user_id": "u1", "k": 5}
    open_client = make_client()
    assert open_client.post("/v1/recommendations", json=body).status_code == 200
    keyed = make_client(recommendations_auth="key")
    assert keyed.post("/v1/recommendations", json=body).status_code == 401
    assert keyed.post("/v1/recommendations", json=body, headers=bearer("z" * 30)).status_code == 403
    assert keyed.post("/v1/recommendations", json=body, headers=bearer(KEY_B)).status_code == 200
    with pytest.raises(ValueError, match="recommendations_auth"):
        ServingConfig(recommendations_auth="maybe")


def test_readyz_shows_error_text_only_to_callers_with_a_key(make_client):
    client = make_client()
    service = client.app.state.service
    error = "_refresh_model: OperationalError: could not connect to postgres://10.1.2.3/mlflow"
    # Holding the refresh lock keeps the background refresh (its first round runs at start) from
    # replacing the error while the requests run.
    with service._refresh_lock:
        service.last_error = error
        anonymous = client.get("/readyz")
        assert anonymous.status_code == 503  # readiness itself stays visible to probes
        assert "10.1.2.3" not in anonymous.text and anonymous.json()["last_error"] == auth.HIDDEN
        assert anonymous.json()["ready"] is False
        keyed = client.get("/readyz", headers={"X-API-Key": KEY_A})
        assert keyed.json()["last_error"] == error
        assert client.get("/readyz", headers=bearer("y" * 30)).status_code == 403


def test_without_keys_locally_the_api_is_open_with_a_loud_warning(make_client, caplog):
    with caplog.at_level(logging.WARNING, logger="recloop.serving.auth"):
        client = make_client(keys=None)
    assert "WITHOUT AUTHENTICATION" in caplog.text and auth.KEYS_VARIABLE in caplog.text
    assert client.post("/v1/feedback", json=events()).status_code == 202
    service = client.app.state.service
    with service._refresh_lock:  # no background refresh replaces the error meanwhile
        service.last_error = "boom"
        assert client.get("/readyz").json()["last_error"] == "boom"  # nobody has a key: nothing to hide from


def production_settings(tmp_path: Path) -> Settings:
    return Settings(
        env="production", home=tmp_path, landing_uri="s3://b/landing", lake_uri="s3://b/lake",
        redis_url="redis://127.0.0.1:6379/0", feast_registry_url="postgresql+psycopg://u:p@127.0.0.1:5432/feast",
        mlflow_tracking_uri="http://127.0.0.1:5000", alerts_db_url="postgresql+psycopg://u:p@127.0.0.1:5432/a",
        dagster_pg_url="postgresql+psycopg2://u:p@127.0.0.1:5432/d",
    )


def test_production_refuses_to_start_without_keys(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.KEYS_VARIABLE, raising=False)
    with pytest.raises(SettingsError) as err:
        create_app(production_settings(tmp_path))  # refused before any store is contacted
    assert err.value.variables == [auth.KEYS_VARIABLE] and "secrets.token_urlsafe" in str(err.value)


@pytest.mark.parametrize("value, problem", [
    ("short", "fewer than 16"),
    ("CHANGE-ME-generate-a-key-with-python", "placeholder"),
    (f"{KEY_A},with space in it 0123456789", "spaces"),
])
def test_weak_or_placeholder_keys_are_refused_in_any_environment(value, problem, tmp_path, monkeypatch):
    monkeypatch.setenv(auth.KEYS_VARIABLE, value)
    for settings in (Settings(home=tmp_path), production_settings(tmp_path)):
        with pytest.raises(SettingsError, match=problem) as err:
            auth.ApiKeys.from_env(settings)
        assert value.split(",")[-1] not in str(err.value)  # the message never repeats a key


def test_recloop_serve_in_production_without_keys_exits_with_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "AWS_"))}
    s = production_settings(tmp_path)
    env.update({"RECLOOP_ENV": "production", "RECLOOP_HOME": str(tmp_path), "RECLOOP_LANDING_URI": s.landing_uri,
                "RECLOOP_LAKE_URI": s.lake_uri, "RECLOOP_REDIS_URL": s.redis_url,
                "RECLOOP_FEAST_REGISTRY_URL": s.feast_registry_url, "RECLOOP_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
                "RECLOOP_ALERTS_DB_URL": s.alerts_db_url, "RECLOOP_DAGSTER_PG_URL": s.dagster_pg_url,
                "PYTHONPATH": str(REPO_ROOT)})
    proc = subprocess.run([sys.executable, "-m", "recloop.cli", "serve", "--port", "1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert auth.KEYS_VARIABLE in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_feedback_ids_live_in_their_own_namespace(make_client, settings):
    """A feedback event can never carry the id of a delivered event: every id it is stored under starts
    with `fb-`; the ids the API returned are idempotency keys that keep their value when sent again."""
    client = make_client()
    service = client.app.state.service
    body = events(3)
    body["events"][0]["event_id"] = "e0000001"  # an id the batch files use
    body["events"][1]["event_id"] = "fb-already-namespaced"
    answer = client.post("/v1/feedback", json=body, headers=bearer(KEY_A)).json()
    assert answer["event_ids"][:2] == ["fb-e0000001", "fb-already-namespaced"]
    assert answer["event_ids"][2].startswith("fb-")
    # The service's own entry point (no HTTP) is held to the same namespace.
    direct = service.record_feedback([{"event_id": "e0000002", "user_id": "u", "video_id": "v",
                                       "event_time": datetime.now(timezone.utc)}])
    assert direct == ["fb-e0000002"]
    service.feedback.flush()
    landing = LocalLake(settings.landing_uri)
    stored = [r["event_id"] for key in landing.list_keys("events/") if key.endswith(".parquet")
              for r in pq.read_table(Path(settings.landing_uri) / key).to_pylist()]
    assert {"fb-e0000001", "fb-already-namespaced", "fb-e0000002"} <= set(stored)
    assert all(i.startswith("fb-") for i in stored)
