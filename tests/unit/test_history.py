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


def _landed(tmp_path, days: int = 3) -> tuple[LocalLake, LocalLake, list[str]]:
    from recloop.cli import _bad_delivery

    landing, lake = LocalLake(tmp_path / "landing"), LocalLake(tmp_path / "lake")
    config = SimConfig(seed=9, days=days, initial_users=100, initial_videos=60, events_per_day=300,
                       new_users_per_day=5, new_videos_per_day=4)
    simulate(config, landing)
    out = [config.date_of(i).isoformat() for i in range(days)]
    _bad_delivery(landing, out[1])  # the usual mistakes of real feeds, on one day
    return landing, lake, out


def test_range_validation_equals_the_days_validated_one_by_one(tmp_path):
    from recloop.config import REPO_ROOT
    from recloop.ingestion import ingest_range
    from recloop.validation import validate_partition, validate_range

    landing, lake, days = _landed(tmp_path)
    # an event of the last day reusing an event_id of the first: only a range sees it
    first_event = lake_first = landing.read_partition("events", days[0]).slice(0, 1).to_pylist()[0]
    last = landing.read_partition("events", days[-1])
    dup = {**last.slice(0, 1).to_pylist()[0], "event_id": first_event["event_id"]}
    landing.write_partition("events", days[-1], pa.concat_tables([last, pa.Table.from_pylist([dup], schema=last.schema)]))
    del lake_first
    ingest_range(landing, lake, days[0], days[-1])
    expectations = REPO_ROOT / "expectations"

    daily: dict[tuple[str, str], tuple[pa.Table, pa.Table]] = {}
    for day in days:
        for table in TABLE_ORDER:
            validate_partition(lake, table, day, expectations_dir=expectations)
            daily[table, day] = (lake.read_partition(f"silver/{table}", day), lake.read_partition(f"quarantine/{table}", day))

    results = {t: validate_range(lake, t, days, expectations_dir=expectations, chunk_rows=400) for t in TABLE_ORDER}
    for (table, day), (silver, quarantine) in daily.items():
        got = results[table].days[day]
        assert got.conserved and got.ingested == silver.num_rows + quarantine.num_rows
        range_q = lake.read_partition(f"quarantine/{table}", day) if got.quarantined else quarantine.slice(0, 0)
        if (table, day) == ("events", days[-1]):
            # the reused event_id is quarantined once, with the earlier day named
            extra = range_q.filter(pa.compute.match_substring(range_q["reason"], "earlier day of the range"))
            assert extra.num_rows == 1 and days[0] in extra["reason"][0].as_py()
            assert extra["event_id"][0].as_py() == first_event["event_id"]
            assert got.accepted == silver.num_rows - 1 and got.quarantined == quarantine.num_rows + 1
            continue
        range_s = lake.read_partition(f"silver/{table}", day)
        assert range_s.equals(silver), (table, day)
        assert range_q.to_pylist() == quarantine.to_pylist(), (table, day)
    assert results["events"].days[days[1]].quarantined >= 7  # the bad delivery's rows
    assert "duplicate event_id: a row of an earlier day of the range has the same event_id" in results["events"].reasons
