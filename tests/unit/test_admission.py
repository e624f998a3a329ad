"""Admission control (`recloop.serving.admission`) over real HTTP: uvicorn on loopback, concurrent clients.

A small app whose endpoint holds its slot until the test releases it stands in for a saturated service,
so that "at capacity" is a fact the test controls, not a timing guess; the last test runs the real
serving app (`create_app`) with its service at capacity the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI

from recloop.serving.admission import AdmissionControl, AdmissionLimits
from recloop.serving.metrics import ServingMetrics


@contextmanager
def serve(app) -> Iterator[str]:  # noqa: ANN001
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def held_app(limits: AdmissionLimits) -> tuple[FastAPI, ServingMetrics, threading.Event, list[int]]:
    """An app whose POST /v1/work blocks (in the thread pool, as the serving routes do) until `release`
    is set; `entered` counts the requests that reached it."""
    metrics = ServingMetrics()
    release = threading.Event()
    entered: list[int] = []
    app = FastAPI()

    @app.post("/v1/work")
    def work() -> dict[str, bool]:
        entered.append(1)
        release.wait(30)
        return {"ok": True}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(AdmissionControl, limits=limits, metrics=metrics)
    return app, metrics, release, entered


def metric(metrics: ServingMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def _burst(url: str, n: int, path: str = "/v1/work") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await asyncio.gather(*(http.post(path) for _ in range(n)))


def test_beyond_capacity_requests_are_shed_with_503_and_retry_after_and_counted():
    limits = AdmissionLimits(max_in_flight=2, max_queue=3, max_wait_s=0.3, retry_after_s=2, target_s=0)
    app, metrics, release, entered = held_app(limits)
    with serve(app) as url:
        result: list[list[httpx.Response]] = []
        runner = threading.Thread(target=lambda: result.append(asyncio.run(_burst(url, 10))))
        runner.start()
        deadline = time.monotonic() + 10
        while len(entered) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Saturated: the health and metrics paths still answer at once.
        with httpx.Client(base_url=url, timeout=5) as http:
            t0 = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            assert time.perf_counter() - t0 < 0.25
        time.sleep(0.5)  # longer than max_wait_s: the queued requests time out
        release.set()
        runner.join(timeout=30)
    statuses = sorted(r.status_code for r in result[0])
    assert statuses == [200, 200] + [503] * 8, statuses
    assert len(entered) == 2  # nothing of the app ran for a shed request
    shed = [r for r in result[0] if r.status_code == 503]
    assert all(r.headers["retry-after"] == "2" for r in shed)
    assert all(r.json()["reason"] == "overloaded" and "retry" in r.json()["detail"] for r in shed)
    assert metric(metrics, "recloop_serving_shed_requests_total", reason="queue_full") == 5
    assert metric(metrics, "recloop_serving_shed_requests_total", reason="queue_timeout") == 3
    assert metric(metrics, "recloop_serving_in_flight_requests") == 0


def test_a_queued_request_takes_the_slot_freed_within_its_wait():
    limits = AdmissionLimits(max_in_flight=1, max_queue=4, max_wait_s=5.0, target_s=0)
    app, metrics, release, entered = held_app(limits)
    with serve(app) as url:
        result: list[list[httpx.Response]] = []
        runner = threading.Thread(target=lambda: result.append(asyncio.run(_burst(url, 3))))
        runner.start()
        deadline = time.monotonic() + 10
        while not entered and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(entered) == 1  # one in flight, two waiting
        release.set()
        runner.join(timeout=30)
    assert [r.status_code for r in result[0]] == [200, 200, 200]
    assert len(entered) == 3
    assert metric(metrics, "recloop_serving_shed_requests_total", reason="queue_full") == 0
    assert metric(metrics, "recloop_serving_shed_requests_total", reason="queue_timeout") == 0
    assert metric(metrics, "recloop_serving_admission_wait_seconds_count") == 3
    assert metric(metrics, "recloop_serving_in_flight_requests") == 0


def _timed_app(limits: AdmissionLimits, seconds: float) -> tuple[FastAPI, ServingMetrics]:
    """An app whose POST /v1/work takes `seconds` of wall time (in the thread pool)."""
    metrics = ServingMetrics()
    app = FastAPI()

    @app.post("/v1/work")
    def work() -> dict[str, bool]:
        time.sleep(seconds)
        return {"ok": True}

    app.add_middleware(AdmissionControl, limits=limits, metrics=metrics)
    return app, metrics


async def _sustained(url: str, concurrency: int, seconds: float) -> dict[int, int]:
    """`concurrency` clients each sending requests back to back for `seconds`; statuses counted."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def client() -> None:
            while time.monotonic() < deadline:
                r = await http.post("/v1/work")
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 503:
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


def test_the_limit_shrinks_when_admitted_requests_are_slow_and_stays_when_they_are_fast():
    limits = AdmissionLimits(max_in_flight=8, max_queue=64, max_wait_s=0.5, target_s=0.02, window_s=0.2,
                             min_in_flight=1)
    slow, slow_metrics = _timed_app(limits, 0.03)  # every request over the target: the limit falls to 1
    with serve(slow) as url:
        statuses = asyncio.run(_sustained(url, 16, 3.0))
    assert statuses.get(200, 0) > 20
    assert metric(slow_metrics, "recloop_serving_admission_limit") == 1
    # Well under the target: the limit stays at the maximum. The work takes 1 ms and the target is 250x
    # that, so that a CI machine busy with other work (2 cores, a client in the same process) cannot push
    # the p95 time in the app over it by scheduling delay alone.
    fast, fast_metrics = _timed_app(dataclasses.replace(limits, target_s=0.25), 0.001)
    with serve(fast) as url:
        statuses = asyncio.run(_sustained(url, 16, 2.0))
    assert statuses.get(200, 0) > 100
    assert metric(fast_metrics, "recloop_serving_admission_limit") >= 6


def test_a_raised_limit_or_a_freed_slot_admits_the_waiting_requests_at_once():
    """Slots never sit idle while requests wait: after the limit shrank (a slow spell) and grew again,
    the waiting requests fill every slot, not one at a time."""

    async def scenario() -> None:
        gate, entered = asyncio.Event(), []

        async def app(scope, receive, send) -> None:  # noqa: ANN001
            entered.append(1)
            await gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        statuses: list[int] = []

        async def send(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        middleware = AdmissionControl(app, limits=AdmissionLimits(max_in_flight=4, max_queue=10, max_wait_s=5,
                                                                  target_s=0, min_in_flight=1),
                                      metrics=ServingMetrics())
        middleware.set_limit(1)
        calls = [asyncio.create_task(middleware({"type": "http", "path": "/v1/x"}, None, send)) for _ in range(6)]
        await asyncio.sleep(0.05)
        assert (len(entered), middleware.in_flight) == (1, 1)
        middleware.set_limit(4)
        await asyncio.sleep(0.05)
        assert (len(entered), middleware.in_flight) == (4, 4)
        gate.set()
        await asyncio.gather(*calls)
        assert statuses == [200] * 6 and middleware.in_flight == 0

    asyncio.run(scenario())


def test_zero_in_flight_means_no_admission_control():
    app, metrics, release, entered = held_app(AdmissionLimits(max_in_flight=0))
    release.set()
    with serve(app) as url:
        responses = asyncio.run(_burst(url, 20))
    assert {r.status_code for r in responses} == {200}
    assert metric(metrics, "recloop_serving_shed_requests_total", reason="queue_full") == 0


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        AdmissionLimits(max_in_flight=-1)
    with pytest.raises(ValueError):
        AdmissionLimits(max_wait_s=float("nan"))


def test_the_serving_app_sheds_beyond_its_configured_capacity(recloop_env, tmp_path, monkeypatch, slot_held):
    """`create_app` wires admission control from `ServingConfig` (`RECLOOP_SERVING_MAX_IN_FLIGHT`, ...)
    in front of the recommendation and feedback routes, and never in front of the operational ones."""
    from recloop.serving import RecommendationService, ServingConfig, create_app

    monkeypatch.setenv("RECLOOP_SERVING_MAX_IN_FLIGHT", "1")
    monkeypatch.setenv("RECLOOP_SERVING_ADMISSION_QUEUE", "0")
    monkeypatch.setenv("RECLOOP_SERVING_RETRY_AFTER_SECONDS", "3")
    monkeypatch.setenv("RECLOOP_SERVING_FEEDBACK_SPOOL_DIR", str(tmp_path / "spool"))
    config = ServingConfig.from_env()
    assert (config.max_in_flight, config.admission_queue, config.retry_after_seconds) == (1, 0, 3)
    service = RecommendationService(recloop_env, config)
    app = create_app(service=service)
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http, \
                slot_held(service) as (entered, release):
            first: list[httpx.Response] = []
            runner = threading.Thread(
                target=lambda: first.append(http.post("/v1/recommendations", json={"user_id": "u1"}))
            )
            runner.start()
            assert entered.wait(10)
            with httpx.Client(base_url=url, timeout=5) as other:
                shed = other.post("/v1/recommendations", json={"user_id": "u2"})
                feedback = other.post("/v1/feedback", json={"events": [{"user_id": "u", "video_id": "v"}]})
                health = [other.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")]
                exposed = other.get("/metrics").text
            release.set()
            runner.join(timeout=30)
    finally:
        service.close()
    assert first[0].status_code == 200
    assert shed.status_code == 503 and shed.headers["retry-after"] == "3"
    assert feedback.status_code == 503
    assert health[0] == 200 and health[2] == 200 and health[1] in (200, 503)
    assert 'recloop_serving_shed_requests_total{reason="queue_full"} 2.0' in exposed
