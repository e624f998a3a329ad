"""History in bulk, checked against the daily path it replaces: feature snapshots of a range (with gap
days, several chunks, a video delivered twice) equal the per-day snapshots; a range validated in one pass
equals the days validated one by one; the snapshot days of a sparse history; training windows as periods.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recloop import features as F
from recloop.data.schemas import TABLE_ORDER
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import LocalLake

DAYS = 6
GAP = 3  # index of a day without events


def _silver_lake(tmp_path, *, redeliver: bool = False) -> tuple[LocalLake, list[str]]:
    """Simulated days written straight to silver (the simulator's tables are canonical), one day without
    events; with `redeliver`, one video delivered again later with another category."""
    landing, lake = LocalLake(tmp_path / "landing"), LocalLake(tmp_path / "lake")
    config = SimConfig(seed=5, days=DAYS, initial_users=120, initial_videos=80, events_per_day=600,
                       new_users_per_day=8, new_videos_per_day=5)
    simulate(config, landing)
    days = [config.date_of(i).isoformat() for i in range(DAYS)]
    for day in days:
        for table in TABLE_ORDER:
            if table == "events" and day == days[GAP]:
                continue
            lake.write_partition(f"silver/{table}", day, landing.read_partition(table, day))
    if redeliver:
        videos = lake.read_partition("silver/videos", days[0]).slice(0, 1).to_pylist()[0]
        later = pd.Timestamp(days[4], tz="UTC") + pd.Timedelta(hours=3)
        again = {**videos, "category": "redelivered", "upload_time": later.to_pydatetime()}
        table = lake.read_partition("silver/videos", days[4])
        lake.write_partition("silver/videos", days[4], pa.concat_tables(
            [table, pa.Table.from_pylist([again], schema=table.schema)]))
    return lake, days


def _frame(table: pa.Table, view: str) -> pd.DataFrame:
    keys = list(F.ENTITY_KEYS[view])
    return table.drop_columns(["created_timestamp"]).to_pandas().sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("redeliver", [False, True], ids=["catalog", "redelivered_video"])
def test_range_snapshots_equal_the_daily_ones(tmp_path, redeliver):
    lake, days = _silver_lake(tmp_path, redeliver=redeliver)
    wanted = F.snapshot_days(days[0], days[-1], lake.partitions("silver/events"))
    # chunks of one or two days, to cross chunk boundaries
    bulk = dict(F.compute_feature_tables_range(lake, wanted, chunk_events=1, chunk_video_rows=1))
    assert sorted(bulk) == wanted
    for day in wanted:
        daily = F.compute_feature_tables(lake, day)
        for view in F.FEATURE_VIEWS:
            assert bulk[day][view].schema.equals(F.FEATURE_SCHEMAS[view])
            pd.testing.assert_frame_equal(_frame(bulk[day][view], view), _frame(daily[view], view),
                                          check_exact=False, rtol=1e-12)
    if redeliver:
        categories = set(bulk[days[-1]][F.USER_CATEGORY_AFFINITY].column("category").to_pylist())
        assert "redelivered" in categories


def test_snapshot_days_of_a_sparse_history():
    events = ["2020-01-01", "2020-01-02", "2020-01-05", "2020-02-01"]
    assert F.snapshot_days("2020-01-01", "2020-02-01", events) == [
        "2020-01-01", "2020-01-02", "2020-01-04", "2020-01-05", "2020-01-31", "2020-02-01"]
    # a range of part of the history: only its own days, and the day before a day with events after it
    assert F.snapshot_days("2020-01-03", "2020-01-04", events) == ["2020-01-04"]


def test_compute_features_range_writes_and_replaces(tmp_path):
    lake, days = _silver_lake(tmp_path)
    # a stale snapshot on a day no row reads (an earlier run over other data) is removed
    stale = (date.fromisoformat(days[-1]) + timedelta(days=3)).isoformat()
    out = F.compute_features_range(lake, days[0], days[-1])
    assert out["days"] == days and out["newest"] == days[-1]
    lake.write_partition("features/user_activity", days[GAP], lake.read_partition("features/user_activity", days[0]))
    lake.delete_partition("silver/events", days[GAP + 1])  # now days[GAP] and days[GAP+1] are a 2-day gap
    again = F.compute_features_range(lake, days[0], days[-1])
    assert days[GAP] not in again["days"] and again["deleted"] >= 1
    assert not lake.has_partition("features/user_activity", days[GAP])
    assert lake.has_partition("features/user_activity", days[GAP + 1])  # the day before days[GAP+2]
    assert stale not in lake.partitions("features/user_activity")
    assert np.sum([out["rows"][v] for v in F.FEATURE_VIEWS]) > 0
