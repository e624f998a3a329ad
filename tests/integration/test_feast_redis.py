"""Feast with the production online store: materialize a day's snapshot into the real Redis and read it
back. Needs Redis at RECLOOP_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); skipped when it is
unreachable, except under CI=true where that fails (see tests/conftest.py `redis_url`)."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pytest

from recloop import features as F
from recloop.config import Settings
from recloop.data.schemas import EVENTS, VIDEOS
from recloop.lake import LocalLake

pytestmark = pytest.mark.redis

UTC = timezone.utc


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def _lake(root) -> LocalLake:
    lake = LocalLake(root)
    lake.write_partition("silver/videos", "2025-03-01", pa.table({
        "video_id": ["v1", "v2", "v3"],
        "title": ["a", "b", "c"],
        "tags": ["", "", ""],
        "category": ["music", "news", "music"],
        "creator_id": ["c", "c", "c"],
        "duration_s": [100.0, 200.0, 300.0],
        "upload_time": [_ts("2025-03-01T00:00:00")] * 3,
    }, schema=VIDEOS.schema))
    events = {  # (event_time, user, video, watched_s, completed, liked)
        "2025-03-01": [("2025-03-01T09:00:00", "u1", "v1", 60.0, True, False),
                       ("2025-03-01T10:00:00", "u2", "v2", 0.0, False, False)],
        "2025-03-02": [("2025-03-02T09:00:00", "u1", "v2", 30.0, False, True),
                       ("2025-03-02T11:00:00", "u2", "v1", 90.0, True, True)],
    }
    for day, rows in events.items():
        t, u, v, w, c, lk = zip(*rows)
        lake.write_partition("silver/events", day, pa.table({
            "event_id": [f"{day}-{i}" for i in range(len(rows))],
            "user_id": list(u), "video_id": list(v), "event_time": [_ts(x) for x in t],
            "surface": ["home"] * len(rows), "position": pa.array([1] * len(rows), pa.int32()),
            "watched_s": list(w), "completed": list(c), "liked": list(lk),
        }, schema=EVENTS.schema))
    for day in events:
        F.compute_features(lake, day)
    return lake


def test_materialize_and_read_online_from_redis(tmp_path, redis_url, redis_feast_project):
    lake = _lake(tmp_path / "lake")
    settings = Settings(home=tmp_path / "home", lake_uri=str(lake.root), feast_data_dir=tmp_path / "feast")
    kw = {"project": redis_feast_project, "online": "redis", "redis_url": redis_url}

    store = F.feature_store(settings, **kw)
    assert store.config.online_store.type == "redis"
    assert store.config.online_store.connection_string == F.redis_connection_string(redis_url)
    assert F.apply_repo(settings, **kw)["feature_views"] == sorted(F.FEATURE_VIEWS)

    first = F.materialize_partition(settings, "2025-03-01", **kw)
    assert first["skipped"] is False and first["online_store"] == "redis"
    second = F.materialize_partition(settings, "2025-03-02", **kw)
    assert {v: r["rows"] for v, r in second["views"].items()} == {
        v: lake.read_partition(f"features/{v}", "2025-03-02").num_rows for v in F.FEATURE_VIEWS
    }
    assert F.materialize_partition(settings, "2025-03-01", **kw)["skipped"] is True

    df = F.online_features(settings, user_ids=["u1", "u2", "u3"], video_ids=["v1", "v1", "v3"],
                           categories=["music", "music", "music"], **kw).set_index("user_id")
    expected = {
        r["user_id"]: r for r in lake.read_partition("features/user_activity", "2025-03-02").to_pylist()
    }
    for user in ("u1", "u2"):
        for feature in F.feature_names("user_activity"):
            assert df.loc[user, f"user_activity__{feature}"] == pytest.approx(expected[user][feature]), feature
    # Hand values for day 2025-03-02 (snapshot 2025-03-03 00:00): u1 watched 60 s + 30 s over two days.
    assert df.loc["u1", "user_activity__watch_s_28d"] == 90.0
    assert df.loc["u1", "user_activity__watch_s_1d"] == 30.0
    assert df.loc["u1", "user_category_affinity__watch_share_28d"] == pytest.approx(60 / 90)
    assert df.loc["u2", "video_popularity__impressions_28d"] == 2
    assert df.loc["u3", "video_popularity__impressions_28d"] == 0  # cold-start video v3 has a row
    assert pd.isna(df.loc["u3", "user_activity__impressions_28d"])  # unknown user

    fresh = F.feature_freshness(settings, project=redis_feast_project, now=_ts("2025-03-03T12:00:00"))
    assert fresh["max_age_hours"] == 12.0
