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
    # an event of the last day reusing an event_id of the first: quarantined by the range and by the daily runs
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
            # day by day, the same row is quarantined as a duplicate of the event accepted on the first day
            daily_dup = quarantine.filter(pa.compute.match_substring(quarantine["reason"], f"an event accepted on {days[0]}"))
            assert daily_dup["event_id"].to_pylist() == [first_event["event_id"]]
            assert got.accepted == silver.num_rows and got.quarantined == quarantine.num_rows
            continue
        range_s = lake.read_partition(f"silver/{table}", day)
        assert range_s.equals(silver), (table, day)
        assert range_q.to_pylist() == quarantine.to_pylist(), (table, day)
    assert results["events"].days[days[1]].quarantined >= 7  # the bad delivery's rows
    assert "duplicate event_id: a row of an earlier day of the range has the same event_id" in results["events"].reasons


def test_range_validation_reads_no_day_ingestion_kept_in_memory(tmp_path, monkeypatch):
    # Several chunks of days: the bronze tables ingestion kept are used for every chunk, not read back.
    import recloop.ingestion
    from recloop.config import REPO_ROOT
    from recloop.ingestion import ingest_range
    from recloop.validation import validate_range

    landing, lake, days = _landed(tmp_path)
    kept = ingest_range(landing, lake, days[0], days[-1], keep_rows=10**9)["events"]
    bronze = {d: (r.table, r.manifest) for d, r in kept.items()}
    assert len(bronze) == len(days)

    def no_read(*args, **kwargs):
        raise AssertionError(f"bronze read back: {args[1:]}")

    monkeypatch.setattr(recloop.ingestion, "read_bronze", no_read)
    result = validate_range(lake, "events", days, expectations_dir=REPO_ROOT / "expectations", chunk_rows=400,
                            bronze=bronze)
    assert sorted(result.days) == days and result.conserved


# --- training windows as periods ------------------------------------------------------------------


def _days_lake(tmp_path, days: list[str]) -> LocalLake:
    lake = LocalLake(tmp_path / "periods")
    t = pa.table({"x": [1]})
    for d in days:
        lake.write_partition("silver/events", d, t)
    return lake


def test_training_windows_as_periods_on_a_sparse_history(tmp_path):
    from recloop.model_plane import plan_window

    # days with events: a sparse history, newest 2018-09-24
    days = ["2017-01-05", "2018-06-01", "2018-08-20", "2018-09-01", "2018-09-10", "2018-09-11", "2018-09-20",
            "2018-09-24"]
    lake = _days_lake(tmp_path, days)
    plan = plan_window(lake, train_period="all", test_period="14d")
    # 14 calendar days ending on the newest day: 2018-09-11..2018-09-24, whatever holds events
    assert plan.test_partitions == ["2018-09-11", "2018-09-20", "2018-09-24"]
    assert plan.train_partitions == days[:5] and plan.train_period == "all" and plan.test_period == "14d"
    # a period before the held-out one, in calendar time: 1m before 2018-09-11 is 2018-08-11..2018-09-10
    plan = plan_window(lake, train_period="1m", test_period="2w")
    assert plan.train_partitions == ["2018-08-20", "2018-09-01", "2018-09-10"]
    assert plan_window(lake, train_period="1y", test_period="14d").train_partitions == days[1:5]
    # the counts keep working, and mix with periods
    plan = plan_window(lake, train_days=3, test_days=2)
    assert plan.test_partitions == days[-2:] and plan.train_partitions == days[-5:-2]
    assert plan_window(lake, train_days=2, test_period="14d").train_partitions == ["2018-09-01", "2018-09-10"]
    with pytest.raises(ValueError, match="at least 2 validated days"):
        plan_window(lake, train_period="9d", test_period="14d")  # 2018-09-02..09-10 holds one day with events
    assert plan_window(lake, train_period="10d", test_period="14d").train_partitions == ["2018-09-01", "2018-09-10"]


def test_periods_are_read_or_refused_in_one_sentence():
    from recloop.periods import BadPeriod, parse_period

    assert str(parse_period("90d")) == "90d" and parse_period("ALL").is_all
    assert parse_period("6m").start(date(2018, 9, 24)) == date(2018, 3, 25)
    assert parse_period("1y").start(date(2020, 2, 29)) == date(2019, 3, 1)
    assert parse_period("1m").start(date(2018, 3, 31)) == date(2018, 3, 1)
    assert parse_period("2w").start(date(2018, 9, 24)) == date(2018, 9, 11)
    for bad in ("14", "0d", "two weeks", "-3d"):
        with pytest.raises(BadPeriod, match="not a period"):
            parse_period(bad)
    with pytest.raises(BadPeriod, match="cannot be 'all'"):
        parse_period("all", allow_all=False)


# --- the partition range --------------------------------------------------------------------------


def test_partition_range_follows_the_landing_zone(tmp_path, monkeypatch):
    from recloop import partition_range as pr

    monkeypatch.delenv("RECLOOP_PARTITION_START", raising=False)
    monkeypatch.delenv("RECLOOP_PARTITION_END", raising=False)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))  # no pinned end (a demo's) from elsewhere
    landing = LocalLake(tmp_path / "landing")
    today = date(2026, 1, 10)
    empty = pr.resolve(landing=landing, today=today)
    assert empty.first == pr.DEFAULT_FIRST and empty.last == date(2026, 1, 9)
    landing.write_partition("events", "2024-05-02", pa.table({"a": [1]}))
    assert pr.resolve(landing=landing, today=today).first == date(2024, 5, 2)
    pr.record_history(landing, "1996-03-29", "2018-09-24", source="ml", days_with_events=4110)
    rng = pr.resolve(landing=landing, today=today)
    assert rng.first == date(1996, 3, 29) and rng.in_imported_history("2001-01-01") == ("1996-03-29", "2018-09-24")
    assert rng.check("2018-09-24") == "2018-09-24"
    for day, words in (("1990-01-01", "start at 1996-03-29"), ("2026-01-10", "once it has ended")):
        with pytest.raises(pr.OutsideRange, match=words) as err:
            rng.check(day)
        assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)  # one sentence
    with pytest.raises(pr.BadDay, match="YYYY-MM-DD"):
        rng.check("2001-13-01")
    with pytest.raises(pr.OutsideRange, match="after --end"):
        rng.check_span("2001-02-01", "2001-01-01")
    monkeypatch.setenv("RECLOOP_PARTITION_START", "2000-01-01")
    assert pr.resolve(landing=landing, today=today).first == date(2000, 1, 1)


# --- splitting a user's files by day ----------------------------------------------------------------


def test_split_csv_keeps_every_line_byte_for_byte():
    from recloop.history import split_csv

    data = ("event_id,user_id,event_time,note\n"
            "e1,u1,2020-01-01T10:00:00Z,plain\n"
            'e2,u1,2020-01-02T23:59:59+01:00,"two\nlines"\n'  # 22:59:59 UTC: still the 2nd
            "e3,u2,2020-01-02 00:00:00,\xe9t\xe9\n"
            "e4,u2,not a time,x\n"
            "e5,u3\n"  # malformed: too few fields
            "e6,u3,2020-01-03T00:00:00Z,last").encode("latin-1")  # no newline at the end, latin-1 bytes
    head, groups = split_csv(data, "event_time")
    assert head == b"event_id,user_id,event_time,note\n"
    assert groups["2020-01-01"] == [b"e1,u1,2020-01-01T10:00:00Z,plain\n"]
    assert groups["2020-01-02"] == [b'e2,u1,2020-01-02T23:59:59+01:00,"two\nlines"\n', b"e3,u2,2020-01-02 00:00:00,\xe9t\xe9\n"]
    assert groups[None] == [b"e4,u2,not a time,x\n", b"e5,u3\n"]
    assert groups["2020-01-03"] == [b"e6,u3,2020-01-03T00:00:00Z,last\n"]
