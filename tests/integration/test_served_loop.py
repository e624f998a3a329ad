"""What was served is data, end to end with real components: a request answered by the real serving app
(FastAPI, in process, its clock set to noon of the last simulated day) is logged as impressions into the landing zone, the app's feedback for one of its
items carries the answer's request_id, and the real Dagster data plane of that day brings both to silver:
the watched item joined with its outcome, the others as served negatives in silver/events."""

from __future__ import annotations

import time
import warnings
from datetime import date, datetime, timedelta, timezone

import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient

from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", category=UserWarning, module="dagster")


def test_a_served_request_reaches_silver_joined_with_its_feedback(recloop_env):
    from pipelines.run import run_data_plane
    from recloop.serving import RecommendationService, create_app

    settings = recloop_env
    config = SimConfig(seed=3, start=date(2025, 3, 1), days=2, initial_users=200, initial_videos=120,
                       events_per_day=800, new_users_per_day=5, new_videos_per_day=5)
    landing = open_lake(settings.landing_uri)
    simulate(config, landing)
    yesterday, day = (config.date_of(i).isoformat() for i in range(2))
    noon = datetime.combine(config.date_of(1), datetime.min.time(), timezone.utc) + timedelta(hours=12)
    assert all(r.success for r in run_data_plane([yesterday], settings=settings))

    service = RecommendationService(settings, clock=noon.timestamp)
    with TestClient(create_app(service=service)) as client:
        for _ in range(200):  # the background refresh loads popularity from yesterday's silver events
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        answer = client.post("/v1/recommendations", json={"user_id": "u0000007", "k": 5}).json()
        assert answer["request_id"].startswith("rq-") and len(answer["items"]) == 5
        watched = answer["items"][0]["video_id"]
        sent = client.post("/v1/feedback", json={"events": [{
            "user_id": "u0000007", "video_id": watched, "watched_s": 30.0, "liked": True, "position": 0,
            "request_id": answer["request_id"]}]})  # event_time: the service's clock
        assert sent.status_code == 202, sent.text
    # The app stopped: both spools flushed into the landing zone.
    assert landing.list_keys(f"impressions/date={day}/")

    runs = run_data_plane([day], settings=settings)
    assert all(r.success for r in runs), [r.error for r in runs]
    lake = open_lake(settings.lake_uri)
    outcomes = lake.read_partition("silver/impression_outcomes", day).to_pylist()
    ours = sorted((r for r in outcomes if r["request_id"] == answer["request_id"]), key=lambda r: r["position"])
    assert [r["video_id"] for r in ours] == [i["video_id"] for i in answer["items"]]
    assert (ours[0]["feedback"], ours[0]["watched_s"], ours[0]["liked"]) == (True, 30.0, True)
    assert all(not r["feedback"] and r["watched_s"] == 0 for r in ours[1:])

    events = lake.read_partition("silver/events", day)
    mine = events.filter(pc.equal(events.column("request_id"), answer["request_id"])).to_pylist()
    negatives = {r["event_id"] for r in mine if r["watched_s"] == 0}
    assert negatives == {f"{answer['request_id']}-{p}" for p in range(1, 5)}
    (positive,) = [r for r in mine if r["watched_s"] > 0]
    assert positive["video_id"] == watched and positive["event_id"].startswith("fb-")

    # Re-running the day neither duplicates nor drops anything.
    assert all(r.success for r in run_data_plane([day], settings=settings))
    again = lake.read_partition("silver/events", day)
    assert again.num_rows == events.num_rows
