"""Served impressions through the real data plane (Dagster, in process): a small simulated day plus the
files serving writes into the landing zone (impressions Parquet per contract 1, feedback Parquet = the
EVENTS columns + request_id, named `feedback-*`) → bronze/impressions → GX → silver/impressions → the join
(served negatives in silver/events) → silver/impression_outcomes, and a day without impressions.
"""

from __future__ import annotations

import io
import warnings
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recloop.data.schemas import EVENTS, IMPRESSIONS
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", category=UserWarning, module="dagster")


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _served_files(landing, day: str) -> tuple[set[str], set[str], set[str]]:
    """Impressions of 20 answers (5 items each) to users and videos of the simulated day, feedback on the
    first item of the even answers; returns (impression ids with feedback, without, bad ones)."""
    events = pq.read_table(io.BytesIO(landing.read_bytes(next(k for k in landing.list_keys(f"events/date={day}/")))))
    users = events.column("user_id").to_pylist()
    videos = list(dict.fromkeys(events.column("video_id").to_pylist()))
    start = events.column("event_time")[0].as_py().replace(hour=12, minute=0, second=0, microsecond=0)
    rows, feedback, with_fb, without = [], [], set(), set()
    for r in range(20):
        request_id = f"rq-{r:032x}"
        at = start + timedelta(minutes=r)
        for pos in range(5):
            iid = f"{request_id}-{pos}"
            video = videos[(r * 5 + pos) % len(videos)]
            rows.append({"impression_id": iid, "request_id": request_id, "user_id": users[r], "video_id": video,
                         "served_at": at, "position": pos, "source": "explore" if pos == 4 else "two_tower",
                         "score": 1.0 - pos / 10, "model_version": None, "experiment": None, "arm": "champion",
                         "propensity": 0.5 if pos == 4 else 1.0, "explored": pos == 4, "fallback": False,
                         "surface": "home"})
            if r % 2 == 0 and pos == 0:
                feedback.append({"event_id": f"fb-{r}", "user_id": users[r], "video_id": video,
                                 "event_time": at + timedelta(seconds=30), "surface": "home", "position": 0,
                                 "watched_s": 1.0, "completed": False, "liked": r % 4 == 0, "request_id": request_id})
                with_fb.add(iid)
            else:
                without.add(iid)
    bad = {rows[-1]["impression_id"], rows[-2]["impression_id"]}
    rows[-1]["propensity"] = 0.0
    rows[-2]["arm"] = "control"
    without -= bad
    landing.write_bytes(f"impressions/date={day}/impressions-0001.parquet",
                        _parquet(pa.Table.from_pylist(rows, IMPRESSIONS.schema)))
    feedback_schema = EVENTS.schema.append(pa.field("request_id", pa.string()))
    landing.write_bytes(f"events/date={day}/feedback-0001.parquet",
                        _parquet(pa.Table.from_pylist(feedback, feedback_schema)))
    return with_fb, without, bad


def test_impressions_reach_silver_joined_and_a_day_without_them_is_empty(recloop_env):
    from pipelines.run import instance, run_data_plane, run_job

    settings = recloop_env
    config = SimConfig(seed=5, days=2, initial_users=200, initial_videos=100, events_per_day=800,
                       new_users_per_day=5, new_videos_per_day=5)
    landing = open_lake(settings.landing_uri)
    simulate(config, landing)
    open_day, served_day = (config.date_of(i).isoformat() for i in range(2))
    with_fb, without, bad = _served_files(landing, served_day)

    _, first, second = run_data_plane([open_day, served_day], settings=settings)
    # An open-loop day: no impressions landed, an empty partition, no failure, nothing joined.
    assert first.success, first.error
    assert first.materialized["silver/impressions"]["ingested"] == 0
    assert first.materialized["silver/events"]["served_negatives"] == 0
    assert first.materialized["silver/impression_outcomes"]["dagster/row_count"] == 0
    assert all(first.checks.values()), first.checks

    assert second.success, second.error
    assert {"bronze/impressions:gx_schema", "silver/impressions:row_conservation",
            "silver/impressions:quarantine_rate"} <= set(second.checks)
    imp = second.materialized["silver/impressions"]
    assert (imp["ingested"], imp["accepted"], imp["quarantined"]) == (100, 98, 2)
    lake = open_lake(settings.lake_uri)
    reasons = dict(zip(*lake.read_partition("quarantine/impressions", served_day).select(["impression_id", "reason"])
                       .to_pydict().values()))
    assert set(reasons) == bad and "propensity outside (0, 1]" in reasons.values()

    events = lake.read_partition("silver/events", served_day)
    ids = events.column("event_id").to_pylist()
    assert len(ids) == len(set(ids))
    negatives = set(ids) & (with_fb | without | bad)
    assert negatives == without  # every accepted impression without feedback, once; none with feedback
    feedback_rows = events.filter(pc.starts_with(events.column("event_id"), "fb-"))
    assert feedback_rows.num_rows == len(with_fb) and feedback_rows.column("request_id").null_count == 0
    assert second.materialized["silver/events"]["served_negatives"] == len(without)
    assert second.materialized["silver/events"]["dagster/row_count"] == events.num_rows

    outcomes = lake.read_partition("silver/impression_outcomes", served_day)
    assert outcomes.num_rows == 98
    assert pc.sum(outcomes.column("feedback")).as_py() == len(with_fb)
    assert pc.sum(outcomes.column("liked")).as_py() == 5  # answers 0, 4, 8, 12, 16

    # The features of the day were built from the joined events; a re-run replaces, never duplicates.
    assert second.materialized["features/user_activity"]["dagster/row_count"] > 0
    rerun = run_job("data_plane_job", partition=served_day, inst=instance(settings))
    assert rerun.success, rerun.error
    assert lake.read_partition("silver/events", served_day).num_rows == events.num_rows
    assert lake.read_partition("silver/impression_outcomes", served_day).num_rows == 98
