"""The online store fails under a serving process, with real parts: features materialized into the real
Redis, read by the service through Feast's Redis online store over a loopback TCP proxy that the test
black-holes (`recloop.serving.faultproxy`: connections stay open, no byte moves, as when a host or link
goes away), the API served by uvicorn on loopback and called over HTTP.

Before the fix a black-holed Redis made every request wait for redis-py (no socket timeout, then 3
retries with back-off): seconds per request, and `/readyz` still said ready. Now the reads time out
quickly, a circuit breaker opens, requests for users not cached get the popularity fallback within
50 ms, `/readyz` says degraded (200, no internal error text), and the service recovers on its own when
the path comes back.

Needs Redis at RECLOOP_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); skipped when unreachable,
except under CI=true where that fails (tests/conftest.py `redis_url`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest

from recloop.config import Settings
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.features import apply_repo, materialize_partition
from recloop.lake import LocalLake
from recloop.model_plane import fit_config
from recloop.model_plane.bundle import save_bundle
from recloop.model_plane.fit import fit_recommender
from recloop.model_plane.history import History
from recloop.model_plane.ranker import RankerConfig
from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
from recloop.registry import CHAMPION, Registry
from recloop.serving import RecommendationService, ServingConfig, create_app
from recloop.serving.faultproxy import FaultProxy
from recloop.training import TwoTowerConfig, load_window

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SIM = SimConfig(
    seed=5, days=3, initial_users=300, initial_videos=200, new_users_per_day=10, new_videos_per_day=10,
    events_per_day=1_500, n_creators=40,
)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
MODEL = "recloop-faults-test"
FALLBACK_BUDGET_MS = 50.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small lake, its Feast repo (file registry), a two-tower + ranker bundle as champion 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    settings = Settings(
        home=root / "home", landing_uri=str(root / "landing"), lake_uri=str(root / "lake"),
        feast_data_dir=root / "feast", feast_project=f"t_faults_{uuid.uuid4().hex[:10]}",
    )
    lake = LocalLake(settings.lake_uri)
    simulate_validated(SIM, lake)
    apply_repo(settings)
    window = load_window(lake, DAYS)
    config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=2, num_threads=1), max_users_per_fold=200,
                        ranker=RankerConfig(max_rounds=30, num_threads=1), l2_grid=(100.0,))
    fitted = fit_recommender(History.from_window(window), config=config, store=LakeSnapshots(lake))
    bundle = save_bundle(root / "bundle", fitted.recommender)
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=(root / "artifacts").as_uri())
    run_id = registry.log_training_run(
        experiment="faults-test", params={}, metrics={}, data={}, features=list(RANKING_FEATURES),
        bundle_dir=bundle, tags={}, example_user_ids=["u0000001"],
    )
    registry.client.set_registered_model_alias(MODEL, CHAMPION, registry.register(run_id))
    torch.set_num_threads(threads)
    return {"root": root, "settings": settings, "registry": registry}


@pytest.fixture()
def redis_proxy(redis_url):
    target = urlparse(redis_url)
    with FaultProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        yield proxy, f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}"


class _Server:
    """The app served by uvicorn on a loopback port, in a thread."""

    def __init__(self, service: RecommendationService) -> None:
        import uvicorn

        self.app = create_app(service=service)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _post(http: httpx.Client, user: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = http.post("/v1/recommendations", json={"user_id": user})
    ms = (time.perf_counter() - t0) * 1000
    assert r.status_code == 200, r.text
    return ms, r.json()


def _metric(http: httpx.Client, name: str, **labels: str) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(predicate, seconds: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_blackholed_online_store_falls_back_fast_reports_degraded_and_recovers(
    world, redis_url, redis_proxy, drop_feast_keys, tmp_path
):
    proxy, through_proxy = redis_proxy
    settings: Settings = dataclasses.replace(world["settings"], redis_url=through_proxy)
    materialize_partition(settings, DAYS[-1], online="redis", redis_url=redis_url)
    safety = tmp_path / "safety.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    config = ServingConfig(
        online_store="redis", poll_seconds=0.5, safety_file=safety, feedback_spool_dir=tmp_path / "spool",
        online_store_timeout_seconds=0.1, breaker_failures=2, breaker_reset_seconds=0.5,
    )
    service = RecommendationService(settings, config, registry=world["registry"])
    try:
        with _Server(service) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert _wait_for(lambda: http.get("/readyz").json()["model_version"] is not None, 120)
            assert type(service.online.store._get_provider().online_store).__name__ == "RedisOnlineStore"
            users = sorted(service.model.user_row)
            cached, fresh = users[0], iter(users[1:])
            _, body = _post(http, cached)
            assert body["fallback"] is False
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert ready.json()["online_store"] == "up"

            proxy.cut()
            # Until the breaker opens, a request that reads the store waits at most one socket timeout.
            opened_after = 0
            while service.online_store_state == "closed":
                ms, body = _post(http, next(fresh))
                assert body["fallback"] is True and body["fallback_reason"] == "feature_store_unavailable"
                assert ms < 1000, f"a read of the black-holed store took {ms:.0f} ms"
                opened_after += 1
                assert opened_after <= config.breaker_failures, "the breaker did not open"

            # Open: every user whose rows are not cached gets the fallback at once.
            slowest = 0.0
            for _ in range(40):
                ms, body = _post(http, next(fresh))
                assert body["fallback"] is True and body["fallback_reason"] == "feature_store_unavailable"
                assert body["model_version"] is not None and len(body["items"]) == 20
                slowest = max(slowest, ms)
            assert slowest <= FALLBACK_BUDGET_MS, f"a fallback answer took {slowest:.1f} ms"
            # A user whose rows are cached for this snapshot is still ranked by the model.
            _, body = _post(http, cached)
            assert body["fallback"] is False

            ready = http.get("/readyz")
            assert ready.status_code == 200
            status = ready.json()
            assert status["status"] == "degraded" and status["reason"] == "online store unavailable"
            assert status["online_store"] == "unavailable"
            for internal in ("Timeout", "Error", "redis", "127.0.0.1"):
                assert internal not in status["reason"]
            assert _metric(http, "recloop_serving_online_store_breaker") in (1.0, 2.0)
            # The background probe keeps finding the store down: still degraded a few probes later.
            time.sleep(3 * config.breaker_reset_seconds)
            assert http.get("/readyz").json()["status"] == "degraded"

            proxy.resume()
            assert _wait_for(lambda: http.get("/readyz").json()["status"] == "ready", 10), "no recovery"
            assert _metric(http, "recloop_serving_online_store_breaker") == 0.0
            _, body = _post(http, next(fresh))
            assert body["fallback"] is False, "the store is back but the model does not rank"
            assert _metric(http, "recloop_serving_requests_total", endpoint="/v1/recommendations", status="500") == 0
    finally:
        proxy.resume()
        service.close()
        assert drop_feast_keys(settings.feast_project) == 0
