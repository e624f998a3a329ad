"""The online store's circuit breaker and the bounds on Feast's Redis client (`recloop.serving.online`).

The end-to-end case (Redis black-holed under a running server) is tests/integration/test_serving_faults.py;
these check the parts: the breaker's states, and that a read of an unreachable Redis fails within the
configured timeout instead of redis-py's default retries with back-off (seconds).
"""

from __future__ import annotations

import socket
import time

import pytest

from recloop.features import apply_repo
from recloop.serving.online import CircuitBreaker, FeatureStoreUnavailable, OnlineFeatures, bound_redis_client


def test_breaker_opens_after_consecutive_failures_only_and_reports_every_change():
    breaker = CircuitBreaker(failures=3, reset_seconds=0.5)
    seen: list[str] = []
    breaker.listeners.append(seen.append)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success in between: the count starts again
    assert not breaker.record_failure() and not breaker.record_failure()
    assert breaker.allow() and breaker.state == "closed"
    assert breaker.record_failure()
    assert not breaker.allow() and breaker.state == "open" and breaker.opened_at is not None
    assert not breaker.record_failure()  # already open: no second opening
    breaker.start_probe()
    assert breaker.state == "half_open" and not breaker.allow()
    breaker.probe_failed()
    assert breaker.state == "open"
    breaker.start_probe()
    breaker.probe_succeeded()
    assert breaker.allow()
    assert seen == ["open", "half_open", "open", "half_open", "closed"]
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_redis_client_gets_short_timeouts_and_no_retries(recloop_env):
    import dataclasses

    from recloop.features import feature_store

    settings = dataclasses.replace(recloop_env, redis_url="redis://127.0.0.1:6390/0")
    store = feature_store(settings, online="redis")
    store.config.online_store.connection_string += ",socket_timeout=0.3"  # given by the deployment: kept
    assert bound_redis_client(store, 0.05)
    assert store.config.online_store.connection_string.endswith(",socket_timeout=0.3,socket_connect_timeout=0.05")
    client = store._get_provider().online_store._get_client(store.config.online_store)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.3 and kwargs["socket_connect_timeout"] == 0.05
    assert client.get_retry().get_retries() == 0
    assert not bound_redis_client(feature_store(recloop_env, online="sqlite"), 0.05)


def test_unreachable_redis_fails_fast_then_the_breaker_refuses_without_trying(recloop_env):
    import dataclasses

    settings = dataclasses.replace(recloop_env, redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
    apply_repo(settings)  # the file registry knows the views; the online store is never reached
    online = OnlineFeatures(settings, online="redis", timeout_s=0.1, breaker=CircuitBreaker(2, reset_seconds=60))
    try:
        for attempt in range(2):
            t0 = time.perf_counter()
            with pytest.raises(FeatureStoreUnavailable) as err:
                online.user_features([(f"u{attempt}", ["music"])])
            assert time.perf_counter() - t0 < 1.0, "redis-py retried with back-off"
            assert not err.value.refused
        assert online.breaker.state == "open"
        t0 = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable) as err:
            online.user_features([("u9", ["music"])])
        assert err.value.refused and time.perf_counter() - t0 < 0.01
        with pytest.raises(FeatureStoreUnavailable):
            online.video_features(["v1"])
    finally:
        online.close()
