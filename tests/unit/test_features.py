"""Tests of recloop.features: the DuckDB snapshots against hand-computed values and an independent pandas
reference, then a real Feast store (SQLite online, DuckDB offline) in temporary folders."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recloop.config import Settings
from recloop.data.schemas import EVENTS, VIDEOS
from recloop.features import (
    FEATURE_SCHEMAS,
    FEATURE_VIEWS,
    compute_feature_tables,
    compute_features,
    feature_names,
    snapshot_time,
)
from recloop.lake import LocalLake

UTC = timezone.utc
D = "2025-02-10"  # the day under test; snapshot at T = 2025-02-11 00:00 UTC
T = datetime(2025, 2, 11, tzinfo=UTC)


def ts(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def videos_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[]] * 4
    vid, cat, dur, up = cols
    n = len(vid)
    return pa.table(
        {
            "video_id": list(vid),
            "title": [f"title {v}" for v in vid],
            "tags": [""] * n,
            "category": list(cat),
            "creator_id": ["c1"] * n,
            "duration_s": [float(d) for d in dur],
            "upload_time": [ts(u) for u in up],
        },
        schema=VIDEOS.schema,
    )


def events_table(rows: list[tuple]) -> pa.Table:
    """rows: (event_id, event_time, user_id, video_id, watched_s, completed, liked)."""
    eid, et, uid, vid, w, c, lk = zip(*rows)
    n = len(eid)
    return pa.table(
        {
            "event_id": list(eid),
            "user_id": list(uid),
            "video_id": list(vid),
            "event_time": [ts(x) for x in et],
            "surface": ["home"] * n,
            "position": pa.array([0] * n, pa.int32()),
            "watched_s": [float(x) for x in w],
            "completed": list(c),
            "liked": list(lk),
        },
        schema=EVENTS.schema,
    )


# Hand-made events over more than 28 days before T, and after it.
HAND_EVENTS = [
    ("e1", "2025-02-10T08:00:00", "u1", "v1", 50, False, False),
    ("e2", "2025-02-10T23:59:59", "u1", "v2", 0, False, False),
    ("e3", "2025-02-10T10:00:00", "u2", "v1", 100, True, True),
    # Out of contract (an event after the day inside day D's partition): still must not count for D.
    ("e12", "2025-02-11T01:00:00", "u2", "v2", 77, False, False),
    ("e11", "2025-02-09T12:00:00", "u4", "v2", 0, False, False),
    ("e4", "2025-02-07T12:00:00", "u1", "v1", 100, True, False),
    ("e5", "2025-02-04T00:00:00", "u1", "v2", 30, False, True),  # exactly T - 7 days: inside 7d
    ("e6", "2025-02-03T23:00:00", "u1", "v2", 20, False, False),  # just outside 7d
    ("e7", "2025-01-14T00:00:00", "u2", "v2", 40, True, False),  # exactly T - 28 days: inside 28d
    ("e8", "2025-01-13T23:59:00", "u2", "v1", 1000, True, True),  # just outside 28d
    ("e9", "2025-01-06T10:00:00", "u3", "v1", 10, False, False),  # long ago: u3 gets no row
    # In day 2025-02-09's 28-day window but not in day D's: u5 is in the older snapshot only.
    ("e13", "2025-01-13T12:00:00", "u5", "v1", 5, False, False),
    ("e10", "2025-02-11T00:00:00", "u1", "v1", 500, False, False),  # day D+1: the future for D
]
HAND_VIDEOS = {
    "2025-01-01": [("v1", "music", 100, "2025-01-01T00:00:00"), ("v2", "news", 200, "2025-01-01T00:00:00"),
                   ("v3", "music", 300, "2025-01-01T00:00:00")],
    "2025-02-10": [("v4", "sports", 50, "2025-02-10T12:00:00")],  # cold start, age 0.5 days
    "2025-02-11": [("v5", "sports", 60, "2025-02-11T06:00:00")],  # uploaded after T
}


def write_hand_lake(root) -> LocalLake:
    lake = LocalLake(root)
    for part, rows in HAND_VIDEOS.items():
        lake.write_partition("silver/videos", part, videos_table(rows))
    by_day: dict[str, list[tuple]] = {}
    for row in HAND_EVENTS:
        day = "2025-02-10" if row[0] == "e12" else row[1][:10]
        by_day.setdefault(day, []).append(row)
    for day, rows in by_day.items():
        lake.write_partition("silver/events", day, events_table(rows))
    return lake


@pytest.fixture()
def hand_lake(tmp_path) -> LocalLake:
    return write_hand_lake(tmp_path / "lake")


def rows_by(table: pa.Table, *keys: str) -> dict:
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in table.to_pylist()}


# --- 1. offline features ---------------------------------------------------------------------------


def test_user_activity_windows_against_hand_values(hand_lake):
    ua = rows_by(compute_feature_tables(hand_lake, D)["user_activity"], "user_id")
    assert set(ua) == {"u1", "u2", "u4"}  # u3's only event is older than 28 days
    u1 = ua["u1"]
    assert (u1["impressions_1d"], u1["impressions_7d"], u1["impressions_28d"]) == (2, 4, 5)
    assert (u1["watches_1d"], u1["watches_7d"], u1["watches_28d"]) == (1, 3, 4)
    assert (u1["watch_s_1d"], u1["watch_s_7d"], u1["watch_s_28d"]) == (50.0, 180.0, 200.0)
    assert u1["completion_rate_28d"] == pytest.approx(1 / 4)
    assert u1["like_rate_28d"] == pytest.approx(1 / 5)
    assert u1["days_since_last_watch"] == pytest.approx(16 / 24)  # last watch 2025-02-10 08:00
    assert u1["active_days_28d"] == 4
    u2 = ua["u2"]  # e12 (after T) and e8 (before the 28-day window) are not counted
    assert (u2["impressions_1d"], u2["impressions_7d"], u2["impressions_28d"]) == (1, 1, 2)
    assert (u2["watch_s_1d"], u2["watch_s_7d"], u2["watch_s_28d"]) == (100.0, 100.0, 140.0)
    assert u2["completion_rate_28d"] == pytest.approx(1.0)
    assert u2["like_rate_28d"] == pytest.approx(0.5)
    assert u2["days_since_last_watch"] == pytest.approx(14 / 24)
    u4 = ua["u4"]  # impressions only
    assert (u4["impressions_1d"], u4["impressions_7d"], u4["watches_28d"], u4["watch_s_28d"]) == (0, 1, 0, 0.0)
    assert u4["completion_rate_28d"] == 0.0
    assert u4["days_since_last_watch"] == 28.0  # no watch in the window: capped at the window length


def test_snapshot_columns_and_types(hand_lake):
    tables = compute_feature_tables(hand_lake, D)
    for view in FEATURE_VIEWS:
        table = tables[view]
        assert table.schema == FEATURE_SCHEMAS[view]
        assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
        assert set(table.column("event_timestamp").to_pylist()) == {T}
        assert table.column("created_timestamp").null_count == 0
    assert snapshot_time(D) == T


def test_future_events_never_count(hand_lake):
    before = compute_feature_tables(hand_lake, D)
    # A flood of events from day D+1 (and a late partition) must not change day D's snapshot.
    hand_lake.write_partition(
        "silver/events", "2025-02-12",
        events_table([(f"f{i}", "2025-02-12T00:00:00", "u1", "v3", 999, True, True) for i in range(5)]),
    )
    after = compute_feature_tables(hand_lake, D)
    for view in FEATURE_VIEWS:
        cols = [c for c in FEATURE_SCHEMAS[view].names if c != "created_timestamp"]
        assert after[view].select(cols).equals(before[view].select(cols))
    # ...while the next day's snapshot does see e10 (2025-02-11 00:00) and e12.
    nxt = rows_by(compute_feature_tables(hand_lake, "2025-02-11")["user_activity"], "user_id")
    assert (nxt["u1"]["impressions_1d"], nxt["u1"]["watch_s_1d"]) == (1, 500.0)
    assert nxt["u2"]["watch_s_1d"] == 77.0


def test_category_affinity_shares(hand_lake):
    aff = rows_by(compute_feature_tables(hand_lake, D)["user_category_affinity"], "user_id", "category")
    assert set(aff) == {("u1", "music"), ("u1", "news"), ("u2", "music"), ("u2", "news")}  # u4: no watch
    assert (aff["u1", "music"]["watch_s_28d"], aff["u1", "music"]["watches_28d"]) == (150.0, 2)
    assert aff["u1", "music"]["watch_share_28d"] == pytest.approx(0.75)
    assert aff["u1", "news"]["watch_share_28d"] == pytest.approx(0.25)
    assert aff["u2", "music"]["watch_share_28d"] == pytest.approx(100 / 140)
    for user in ("u1", "u2"):
        assert sum(r["watch_share_28d"] for k, r in aff.items() if k[0] == user) == pytest.approx(1.0)


def test_video_popularity_and_cold_start(hand_lake):
    vp = rows_by(compute_feature_tables(hand_lake, D)["video_popularity"], "video_id")
    assert set(vp) == {"v1", "v2", "v3", "v4"}  # v5 is uploaded after the snapshot
    v1 = vp["v1"]
    assert (v1["impressions_1d"], v1["impressions_7d"], v1["impressions_28d"]) == (2, 3, 3)
    assert (v1["watches_1d"], v1["watches_7d"], v1["watches_28d"]) == (2, 3, 3)
    assert (v1["watch_s_7d"], v1["watch_s_28d"]) == (250.0, 250.0)
    assert v1["watch_rate_7d"] == pytest.approx(1.0)
    assert v1["completion_rate_28d"] == pytest.approx(2 / 3)
    assert (v1["age_days"], v1["duration_s"]) == (41.0, 100.0)
    v2 = vp["v2"]
    assert (v2["impressions_1d"], v2["impressions_7d"], v2["impressions_28d"]) == (1, 3, 5)
    assert (v2["watches_1d"], v2["watches_7d"], v2["watches_28d"]) == (0, 1, 3)
    assert (v2["watch_s_7d"], v2["watch_s_28d"]) == (30.0, 90.0)
    assert v2["watch_rate_7d"] == pytest.approx(1 / 3)
    assert v2["like_rate_28d"] == pytest.approx(1 / 5)
    for cold, age, duration in (("v3", 41.0, 300.0), ("v4", 0.5, 50.0)):
        row = vp[cold]
        assert all(row[f] == 0 for f in feature_names("video_popularity") if f not in ("age_days", "duration_s"))
        assert (row["age_days"], row["duration_s"]) == (age, duration)


def test_rerun_replaces_partition(hand_lake):
    first = compute_features(hand_lake, D)
    second = compute_features(hand_lake, D)
    for view in FEATURE_VIEWS:
        assert first[view].rows == second[view].rows > 0
        assert hand_lake.partitions(f"features/{view}") == [D]
        assert hand_lake.read_partition(f"features/{view}", D).num_rows == second[view].rows
        files = [k for k in hand_lake.list_keys(f"features/{view}/") if k.endswith(".parquet")]
        assert files == [f"features/{view}/date={D}/part-0.parquet"]


def test_empty_window_still_lists_videos(tmp_path):
    lake = LocalLake(tmp_path / "lake")
    lake.write_partition("silver/videos", "2025-01-01", videos_table(HAND_VIDEOS["2025-01-01"]))
    tables = compute_feature_tables(lake, "2025-01-01")
    assert tables["user_activity"].num_rows == 0
    assert tables["user_category_affinity"].num_rows == 0
    assert tables["video_popularity"].num_rows == 3
    assert tables["video_popularity"].column("impressions_28d").to_pylist() == [0, 0, 0]


class _RemoteLake(LocalLake):
    """A lake DuckDB cannot read by path (like S3): features must go through read_partition."""

    def local_path(self, key):
        return None


def test_non_local_lake_gives_the_same_snapshot(tmp_path):
    local = write_hand_lake(tmp_path / "lake")
    remote = _RemoteLake(tmp_path / "lake")
    a, b = compute_feature_tables(local, D), compute_feature_tables(remote, D)
    for view in FEATURE_VIEWS:
        cols = [c for c in FEATURE_SCHEMAS[view].names if c != "created_timestamp"]
        assert a[view].select(cols).equals(b[view].select(cols))


# --- an independent pandas reference on random data -----------------------------------------------


def _reference(events: pd.DataFrame, videos: pd.DataFrame, snap: pd.Timestamp) -> dict[str, pd.DataFrame]:
    ev = events[(events.event_time < snap) & (events.event_time >= snap - pd.Timedelta(days=28))].copy()
    ev["w"] = ev.watched_s > 0
    out = {}
    rows = []
    for user, g in ev.groupby("user_id"):
        r = {"user_id": user}
        for n in (1, 7, 28):
            gw = g[g.event_time >= snap - pd.Timedelta(days=n)]
            r[f"impressions_{n}d"], r[f"watches_{n}d"] = len(gw), int(gw.w.sum())
            r[f"watch_s_{n}d"] = float(gw.watched_s.sum())
        watched = g[g.w]
        r["completion_rate_28d"] = float(watched.completed.mean()) if len(watched) else 0.0
        r["like_rate_28d"] = float(g.liked.mean())
        r["days_since_last_watch"] = (
            (snap - watched.event_time.max()) / pd.Timedelta(days=1) if len(watched) else 28.0
        )
        r["active_days_28d"] = watched.event_time.dt.floor("D").nunique()
        rows.append(r)
    out["user_activity"] = pd.DataFrame(rows)
    j = ev[ev.w].merge(videos[["video_id", "category"]], on="video_id")
    aff = j.groupby(["user_id", "category"]).agg(watch_s_28d=("watched_s", "sum"), watches_28d=("w", "size"))
    aff["watch_share_28d"] = aff.watch_s_28d / aff.groupby(level=0).watch_s_28d.transform("sum")
    out["user_category_affinity"] = aff.reset_index()
    vrows = []
    for _, v in videos[videos.upload_time < snap].iterrows():
        g = ev[ev.video_id == v.video_id]
        r = {"video_id": v.video_id}
        for n in (1, 7, 28):
            gw = g[g.event_time >= snap - pd.Timedelta(days=n)]
            r[f"impressions_{n}d"], r[f"watches_{n}d"] = len(gw), int(gw.w.sum())
            if n > 1:
                r[f"watch_s_{n}d"] = float(gw.watched_s.sum())
        r["watch_rate_7d"] = r["watches_7d"] / r["impressions_7d"] if r["impressions_7d"] else 0.0
        r["completion_rate_28d"] = float(g[g.w].completed.mean()) if g.w.any() else 0.0
        r["like_rate_28d"] = float(g.liked.mean()) if len(g) else 0.0
        r["age_days"] = (snap - v.upload_time) / pd.Timedelta(days=1)
        r["duration_s"] = v.duration_s
        vrows.append(r)
    out["video_popularity"] = pd.DataFrame(vrows)
    return out


def test_random_data_matches_pandas_reference(tmp_path):
    rng = np.random.default_rng(7)
    lake = LocalLake(tmp_path / "lake")
    start = pd.Timestamp("2025-01-01", tz="UTC")
    cats = np.array(["music", "news", "sports"])
    vids = pd.DataFrame({
        "video_id": [f"v{i}" for i in range(40)],
        "category": cats[rng.integers(0, 3, 40)],
        "duration_s": rng.uniform(10, 600, 40),
        "upload_time": start + pd.to_timedelta(rng.integers(0, 40 * 86400, 40), unit="s"),
    })
    for day, g in vids.groupby(vids.upload_time.dt.strftime("%Y-%m-%d")):
        lake.write_partition("silver/videos", day, videos_table(
            [(r.video_id, r.category, r.duration_s, r.upload_time.strftime("%Y-%m-%dT%H:%M:%S"))
             for r in g.itertuples()]))
    n = 3000
    events = pd.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "user_id": [f"u{i}" for i in rng.integers(0, 30, n)],
        "video_id": [f"v{i}" for i in rng.integers(0, 40, n)],
        "event_time": start + pd.to_timedelta(rng.integers(0, 40 * 86400, n), unit="s"),
        "watched_s": np.where(rng.random(n) < 0.5, rng.uniform(1, 300, n).round(3), 0.0),
        "completed": rng.random(n) < 0.3,
        "liked": rng.random(n) < 0.1,
    })
    events["completed"] &= events.watched_s > 0
    events["event_time"] = events.event_time.dt.floor("s")
    # Like real data, a video is only shown once it has been uploaded.
    uploaded = events.video_id.map(vids.set_index("video_id").upload_time)
    events = events[events.event_time >= uploaded].reset_index(drop=True)
    for day, g in events.groupby(events.event_time.dt.strftime("%Y-%m-%d")):
        lake.write_partition("silver/events", day, events_table(
            [(r.event_id, r.event_time.strftime("%Y-%m-%dT%H:%M:%S"), r.user_id, r.video_id, r.watched_s,
              r.completed, r.liked) for r in g.itertuples()]))
    vids["upload_time"] = vids.upload_time.dt.floor("s")
    for part in ("2025-01-10", "2025-02-01", "2025-02-09"):
        got = compute_feature_tables(lake, part)
        ref = _reference(events, vids, pd.Timestamp(snapshot_time(part)))
        for view, keys in (("user_activity", ["user_id"]), ("user_category_affinity", ["user_id", "category"]),
                           ("video_popularity", ["video_id"])):
            g = got[view].to_pandas().drop(columns=["event_timestamp", "created_timestamp"])
            g = g.sort_values(keys).reset_index(drop=True)
            r = ref[view].sort_values(keys).reset_index(drop=True)[g.columns]
            assert len(g) > 0
            pd.testing.assert_frame_equal(g, r, check_dtype=False, rtol=1e-9, obj=f"{view}@{part}")


# --- 2./3. a real Feast store ----------------------------------------------------------------------

import recloop.features as F  # noqa: E402  (the Feast half; imports feast lazily)


@pytest.fixture(scope="module")
def feast_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("feast")
    lake = write_hand_lake(root / "lake")
    for part in ("2025-02-09", D, "2025-02-11"):
        compute_features(lake, part)
    settings = Settings(home=root / "home", lake_uri=str(root / "lake"), feast_data_dir=root / "home" / "feast")
    return settings, lake


def test_apply_registers_the_repo(feast_env):
    settings, _ = feast_env
    applied = F.apply_repo(settings, project="t_apply")
    assert applied == {
        "project": "t_apply",
        "entities": ["category", "user", "video"],
        "data_sources": ["user_activity_source", "user_category_affinity_source", "video_popularity_source"],
        "feature_views": ["user_activity", "user_category_affinity", "video_popularity"],
        "feature_services": ["ranking_features", "retrieval_features"],
    }
    # Feature views declare exactly the columns compute_features writes.
    store = F.feature_store(settings, project="t_apply")
    for view in FEATURE_VIEWS:
        fv = store.get_feature_view(view)
        assert [f.name for f in fv.features] == feature_names(view)
        assert fv.ttl == timedelta(days=2) and fv.online
        assert fv.batch_source.path == f"{settings.lake_uri}/features/{view}"
    # Applying again changes nothing and does not duplicate anything.
    assert F.apply_repo(settings, project="t_apply") == applied


def _online(settings, project, **kw):
    df = F.online_features(settings, project=project, user_ids=["u1", "u1", "u2", "u9"],
                           video_ids=["v1", "v3", "v2", "v5"], categories=["music", "music", "news", "sports"], **kw)
    return df.set_index(["user_id", "video_id"])


def test_materialize_online_and_superseded_skip(feast_env):
    settings, lake = feast_env
    project = "t_online"
    F.apply_repo(settings, project=project)
    fresh = F.feature_freshness(settings, project=project)
    assert fresh["max_age_hours"] is None and fresh["views"]["user_activity"]["newest_snapshot"] is None

    result = F.materialize_partition(settings, D, project=project)
    assert result["skipped"] is False
    for view in FEATURE_VIEWS:
        assert result["views"][view]["rows"] == lake.read_partition(f"features/{view}", D).num_rows
    df = _online(settings, project)
    u1v1 = df.loc[("u1", "v1")]
    assert u1v1["user_activity__impressions_1d"] == 2
    assert u1v1["user_activity__watch_s_28d"] == 200.0
    assert u1v1["user_category_affinity__watch_share_28d"] == pytest.approx(0.75)
    assert u1v1["video_popularity__completion_rate_28d"] == pytest.approx(2 / 3)
    cold = df.loc[("u1", "v3")]  # cold-start video: a row of zeros, not missing
    assert cold["video_popularity__impressions_28d"] == 0 and cold["video_popularity__age_days"] == 41.0
    assert df.loc[("u2", "v2")]["user_category_affinity__watch_s_28d"] == 40.0
    unknown = df.loc[("u9", "v5")]  # unknown user, video not uploaded by the snapshot
    assert pd.isna(unknown["user_activity__impressions_1d"]) and pd.isna(unknown["video_popularity__age_days"])
    # Only day D's snapshot was loaded, not the older one where u5 still had a row.
    u5 = F.online_features(settings, project=project, user_ids=["u5"], video_ids=["v1"])
    assert pd.isna(u5.loc[0, "user_activity__impressions_28d"])

    # The next day's snapshot replaces it...
    assert F.materialize_partition(settings, "2025-02-11", project=project)["skipped"] is False
    assert _online(settings, project).loc[("u1", "v1")]["user_activity__watch_s_1d"] == 500.0
    # ...and materializing the older day again is skipped: it would regress the online store.
    again = F.materialize_partition(settings, D, project=project)
    assert again["skipped"] is True and "newer snapshot" in again["reason"] and again["views"] == {}
    assert _online(settings, project).loc[("u1", "v1")]["user_activity__watch_s_1d"] == 500.0
    # Re-materializing the newest day (e.g. after a recompute) is allowed.
    assert F.materialize_partition(settings, "2025-02-11", project=project, views=["user_activity"])[
        "skipped"] is False

    fresh = F.feature_freshness(settings, project=project, now=ts("2025-02-12T06:00:00"))
    for view in FEATURE_VIEWS:
        assert fresh["views"][view]["newest_snapshot"] == "2025-02-12T00:00:00+00:00"
        assert fresh["views"][view]["age_hours"] == 6.0
    assert fresh["max_age_hours"] == 6.0


def test_training_set_is_point_in_time_correct(feast_env):
    settings, lake = feast_env
    project = "t_hist"
    F.apply_repo(settings, project=project)
    times = {
        "before_T": ts("2025-02-10T23:59:59.999999"),  # sees day 2025-02-09's snapshot only
        "at_T": ts("2025-02-11T00:00:00"),  # the snapshot of day D is stamped T: visible
        "day_after": ts("2025-02-11T15:00:00"),  # still day D's snapshot (day D+1's is stamped 02-12)
        "two_days_on": ts("2025-02-12T01:00:00"),  # day D+1's snapshot
        "expired": ts("2025-02-15T00:00:00"),  # newest snapshot older than the 2-day ttl
    }
    entity_df = pd.DataFrame({
        "user_id": ["u1"] * len(times),
        "video_id": ["v1"] * len(times),
        "category": ["music"] * len(times),
        "event_timestamp": list(times.values()),
        "label": range(len(times)),
    }).iloc[::-1]  # any order in, same order out
    out = F.training_set(settings, entity_df, project=project).set_index("label")
    assert list(out.index) == list(range(len(times)))[::-1]
    by = dict(zip(times, range(len(times))))

    def snap(day, view="user_activity"):
        return rows_by(lake.read_partition(f"features/{view}", day), *F.ENTITY_KEYS[view])

    assert out.loc[by["before_T"], "user_activity__impressions_1d"] == snap("2025-02-09")["u1"]["impressions_1d"]
    assert out.loc[by["before_T"], "user_activity__watch_s_28d"] == 150.0  # without day D's 50 s
    for key in ("at_T", "day_after"):
        assert out.loc[by[key], "user_activity__impressions_1d"] == 2
        assert out.loc[by[key], "user_activity__watch_s_28d"] == 200.0
        assert out.loc[by[key], "user_category_affinity__watch_share_28d"] == pytest.approx(0.75)
        assert out.loc[by[key], "video_popularity__impressions_1d"] == 2
    assert out.loc[by["two_days_on"], "user_activity__watch_s_1d"] == 500.0  # e10, on day D+1
    assert out.loc[by["two_days_on"], "video_popularity__watch_s_7d"] == snap("2025-02-11", "video_popularity")[
        "v1"]["watch_s_7d"]
    assert out.loc[by["expired"], ["user_activity__impressions_1d", "video_popularity__age_days"]].isna().all()
    # retrieval_features has no category view and needs no category column.
    ret = F.training_set(settings, entity_df.drop(columns=["category"]), "retrieval_features", project=project)
    assert not any(c.startswith("user_category_affinity__") for c in ret.columns)


def test_redis_connection_string():
    assert F.redis_connection_string("redis://127.0.0.1:6379/0") == "127.0.0.1:6379,db=0"
    assert F.redis_connection_string("rediss://:s%40cret@cache:6380/2") == "cache:6380,db=2,password=s@cret,ssl=true"
    with pytest.raises(ValueError):
        F.redis_connection_string("http://x")
