"""The latency gate's rule (`recloop.latency.gate`) and where its requests come from
(`recloop.latency.replay.sample_requests`), on plain numbers and a tiny lake."""

from __future__ import annotations

import pyarrow as pa
import pytest

from recloop.lake import LocalLake
from recloop.latency.gate import LatencyConfig, decide_latency
from recloop.latency.replay import sample_requests


def fig(p99: float, **extra) -> dict:
    return {"p50_ms": p99 / 3, "p95_ms": p99 / 1.5, "p99_ms": p99, "max_ms": p99 * 1.2, "requests": 300,
            "fallbacks": 0, **extra}


CONFIG = LatencyConfig(budget_ms=25.0, max_ratio=1.5)


def test_ratio_to_the_champion_and_the_absolute_budget_both_apply():
    ok = decide_latency(fig(12.0), fig(10.0), CONFIG, champion_version="4")
    assert ok.passed and ok.compared_to == "champion:4" and ok.checks == {
        "served_by_model": True, "budget": True, "ratio": True}
    assert ok.metrics["ratio_p99"] == pytest.approx(1.2) and ok.metrics["challenger.p99_ms"] == 12.0

    slower = decide_latency(fig(16.0), fig(10.0), CONFIG, champion_version="4")
    assert not slower.passed and slower.checks["ratio"] is False and slower.checks["budget"] is True
    assert slower.reasons[0] == "p99 16.00 ms is 1.60x the champion's 10.00 ms (over the maximum of 1.5x)"

    # within the ratio of a slow champion, but over the absolute budget
    over = decide_latency(fig(30.0), fig(28.0), CONFIG, champion_version="4")
    assert not over.passed and over.checks == {"served_by_model": True, "budget": False, "ratio": True}
    assert over.reasons[0].startswith("p99 30.00 ms over the budget of 25 ms")

    # exactly at the limits passes
    assert decide_latency(fig(15.0), fig(10.0), CONFIG).passed
    assert decide_latency(fig(25.0), fig(20.0), CONFIG).passed


def test_without_a_champion_only_the_budget_applies():
    first = decide_latency(fig(20.0), None, CONFIG)
    assert first.passed and first.compared_to == "budget" and "ratio" not in first.checks
    assert "no champion to compare with" in first.reasons[0]
    assert not decide_latency(fig(26.0), None, CONFIG).passed
    # a champion without figures (it could not be replayed) is the same as none
    assert decide_latency(fig(20.0), {"p99_ms": None}, CONFIG).compared_to == "budget"


def test_answers_from_the_fallback_or_no_figures_refuse():
    fell_back = decide_latency(fig(5.0, fallbacks=3), fig(10.0), CONFIG)
    assert not fell_back.passed and fell_back.checks["served_by_model"] is False
    assert any("3 of 300 replayed requests were answered by the popularity fallback" in r for r in fell_back.reasons)
    nothing = decide_latency({}, fig(10.0), CONFIG)
    assert not nothing.passed and "could not be measured" in nothing.reasons[0]


def test_settings_from_the_environment(monkeypatch):
    for var in ("RECLOOP_LATENCY_BUDGET_MS", "RECLOOP_LATENCY_MAX_RATIO", "RECLOOP_LATENCY_SAMPLE",
                "RECLOOP_LATENCY_WARMUP"):
        monkeypatch.delenv(var, raising=False)  # tests/conftest.py sets test defaults
    assert LatencyConfig.from_env() == LatencyConfig(budget_ms=25.0, max_ratio=1.5, sample=300, warmup=30)
    monkeypatch.setenv("RECLOOP_LATENCY_BUDGET_MS", "40")
    monkeypatch.setenv("RECLOOP_LATENCY_MAX_RATIO", "1.2")
    monkeypatch.setenv("RECLOOP_LATENCY_SAMPLE", "50")
    assert LatencyConfig.from_env() == LatencyConfig(budget_ms=40.0, max_ratio=1.2, sample=50, warmup=30)
    monkeypatch.setenv("RECLOOP_LATENCY_MAX_RATIO", "0.5")
    with pytest.raises(ValueError, match=r"^RECLOOP_LATENCY_MAX_RATIO must be a number >= 1, got '0.5'$"):
        LatencyConfig.from_env()
    monkeypatch.setenv("RECLOOP_LATENCY_MAX_RATIO", "fast")
    with pytest.raises(ValueError, match="must be a number, got 'fast'"):
        LatencyConfig.from_env()


def test_requests_come_from_impressions_when_logged_else_from_events(tmp_path):
    lake = LocalLake(tmp_path / "lake")
    with pytest.raises(ValueError, match="holds neither silver/impressions nor silver/events"):
        sample_requests(lake, 10)
    lake.write_partition("silver/events", "2025-01-02", pa.table({"user_id": ["a", "a", "b"], "video_id": ["x", "y", "z"]}))
    source, requests = sample_requests(lake, 50, seed=1)
    assert source == "silver/events" and len(requests) == 50
    assert {r.user_id for r in requests} == {"a", "b"} and all(r.surface is None for r in requests)
    # one request per request_id (an answer has many impressions), with its surface
    lake.write_partition("silver/impressions", "2025-01-02", pa.table({
        "request_id": ["rq-1", "rq-1", "rq-1", "rq-2"], "user_id": ["u1", "u1", "u1", "u2"],
        "surface": ["home", "home", "home", None]}))
    source, requests = sample_requests(lake, 2, seed=0)
    assert source == "silver/impressions" and sorted((r.user_id, r.surface) for r in requests) == [
        ("u1", "home"), ("u2", None)]
