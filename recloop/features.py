"""Features: daily point-in-time snapshots computed in DuckDB (or Spark), served through Feast.

Two halves, no Dagster in either:

* `compute_features(lake, partition)` turns the validated `silver/*` partitions into one snapshot per
  feature view for day D, as of the end of that day (`D+1 00:00 UTC`), using only events before it. Each
  snapshot is written to `features/<view>/date=D/part-0.parquet`; a rerun replaces the partition.
  `compute_features_range(lake, first, last)` computes the same snapshots for a whole range in bulk (a
  history import): the days with events and the day before each (`snapshot_days`), a few DuckDB queries
  per chunk of days instead of one per day. With `RECLOOP_FEATURE_ENGINE=spark` both compute the same
  snapshots as Spark jobs instead (`recloop.spark_features`, on `RECLOOP_SPARK_MASTER`) and write the same
  partitions.
* The Feast wrapper (`feature_store`, `apply_repo`, `materialize_partition`, `online_features`,
  `training_set`, `feature_freshness`) drives Feast's own apply / materialize / retrieval on the repo in
  `feature_repo/`, whose `feature_store.yaml` takes its paths from `RECLOOP_*` environment variables
  that `feature_store()` sets (for the duration of the load) from recloop's Settings. In production
  (RECLOOP_ENV=production) the same yaml is loaded with its registry (SQL, PostgreSQL), online store
  (Redis) and, for a lake on S3, offline store (`recloop.feast_offline`) swapped in code.

Feature definitions (all windows end at the snapshot time `T = D+1 00:00 UTC`; the 1/7/28-day windows
are `[T - n days, T)`):

* an *impression* is an event row; a *watch* is an impression with `watched_s > 0`;
* `completion_rate_28d` = completed watches / watches (0 without watches);
* `like_rate_28d` = liked impressions / impressions;
* `watch_rate_7d` = watches / impressions over 7 days (0 without impressions);
* `days_since_last_watch` = days from the user's last watch to T, capped at 28 (no watch in the window);
* `age_days` = days from the video's upload to T; `duration_s` the video's length;
* `watch_share_28d` = the user's 28-day watch time in the category / their watch time in all categories
  (events whose video is unknown at T are left out of the affinity view).

Feature names repeat across views (e.g. `impressions_1d` for users and videos), so every retrieval here
uses Feast's full feature names: `<view>__<feature>`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence
from urllib.parse import unquote, urlparse

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recloop.data.schemas import EVENTS, VIDEOS
from recloop.lake import PART_FILE, Lake, WrittenPartition, local_partition_files, partition_key, register_partitions

if TYPE_CHECKING:  # feast takes ~10 s to import: only the Feast half of this module pays for it
    import feast
    import pandas as pd

    from recloop.config import Settings

log = logging.getLogger(__name__)
TS = pa.timestamp("us", tz="UTC")
WINDOW_DAYS = 28
DEFAULT_PROJECT = "recloop"

USER_ACTIVITY = "user_activity"
USER_CATEGORY_AFFINITY = "user_category_affinity"
VIDEO_POPULARITY = "video_popularity"
FEATURE_VIEWS: tuple[str, ...] = (USER_ACTIVITY, USER_CATEGORY_AFFINITY, VIDEO_POPULARITY)
FEATURE_SERVICES: tuple[str, ...] = ("ranking_features", "retrieval_features")


def _schema(keys: Sequence[tuple[str, pa.DataType]], features: Sequence[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([*keys, ("event_timestamp", TS), ("created_timestamp", TS), *features])


I64, F64 = pa.int64(), pa.float64()

# The contract of the `features/<view>` datasets; feature_repo/features.py declares the same fields.
FEATURE_SCHEMAS: dict[str, pa.Schema] = {
    USER_ACTIVITY: _schema(
        [("user_id", pa.string())],
        [
            ("impressions_1d", I64),
            ("impressions_7d", I64),
            ("impressions_28d", I64),
            ("watches_1d", I64),
            ("watches_7d", I64),
            ("watches_28d", I64),
            ("watch_s_1d", F64),
            ("watch_s_7d", F64),
            ("watch_s_28d", F64),
            ("completion_rate_28d", F64),
            ("like_rate_28d", F64),
            ("days_since_last_watch", F64),
            ("active_days_28d", I64),
        ],
    ),
    USER_CATEGORY_AFFINITY: _schema(
        [("user_id", pa.string()), ("category", pa.string())],
        [("watch_s_28d", F64), ("watches_28d", I64), ("watch_share_28d", F64)],
    ),
    VIDEO_POPULARITY: _schema(
        [("video_id", pa.string())],
        [
            ("impressions_1d", I64),
            ("impressions_7d", I64),
            ("impressions_28d", I64),
            ("watches_1d", I64),
            ("watches_7d", I64),
            ("watches_28d", I64),
            ("watch_s_7d", F64),
            ("watch_s_28d", F64),
            ("watch_rate_7d", F64),
            ("completion_rate_28d", F64),
            ("like_rate_28d", F64),
            ("age_days", F64),
            ("duration_s", F64),
        ],
    ),
}

ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    USER_ACTIVITY: ("user_id",),
    USER_CATEGORY_AFFINITY: ("user_id", "category"),
    VIDEO_POPULARITY: ("video_id",),
}


def feature_names(view: str) -> list[str]:
    """The feature columns of `view` (no keys, no timestamps)."""
    skip = {*ENTITY_KEYS[view], "event_timestamp", "created_timestamp"}
    return [n for n in FEATURE_SCHEMAS[view].names if n not in skip]


def feature_dataset(view: str) -> str:
    """The lake dataset holding `view`'s daily snapshots."""
    if view not in FEATURE_SCHEMAS:
        raise ValueError(f"unknown feature view {view!r}; expected one of {list(FEATURE_VIEWS)}")
    return f"features/{view}"


def snapshot_time(partition: str) -> datetime:
    """The snapshot time of day `partition`: the end of that day, `D+1 00:00 UTC`."""
    day = date.fromisoformat(partition)
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(days=1)


# --------------------------------------------------------------------------------------------------
# 1. Offline features in DuckDB
# --------------------------------------------------------------------------------------------------

_DAY_US = 86_400_000_000.0


def compute_feature_tables(lake: Lake, partition: str) -> dict[str, pa.Table]:
    """The snapshot of every feature view for day `partition`, as Arrow tables (nothing written): the
    range computation (`compute_feature_tables_range`) for one day, so a day computed alone and the same
    day of an imported history are the same query."""
    limit_mb = _megabytes(os.environ.get("RECLOOP_DUCKDB_MEMORY_LIMIT") or DAY_MEMORY_LIMIT)
    while True:
        try:
            return dict(compute_feature_tables_range(lake, [partition], memory_limit=f"{limit_mb}MB"))[partition]
        except duckdb.OutOfMemoryException:
            if limit_mb * 4 > DAY_MAX_MEMORY_LIMIT_MB:
                raise
            log.warning("DuckDB needed more than %d MB for the features of %s; trying again with %d MB",
                        limit_mb, partition, limit_mb * 4)
            limit_mb *= 4


def _megabytes(setting: str) -> int:
    """A memory size such as "64MB", "1GB" or "512MiB" in megabytes."""
    text = setting.strip().upper().replace("IB", "B")
    for unit, factor in (("TB", 1 << 20), ("GB", 1024), ("MB", 1), ("KB", 1 / 1024)):
        if text.endswith(unit):
            return max(1, int(float(text[: -len(unit)]) * factor))
    return max(1, int(float(text) / (1 << 20)))  # bytes


# DuckDB's memory for one day's snapshot (a daily run): beyond it, DuckDB spills to a temporary folder, so
# a large day's events do not raise the run's peak memory (`RECLOOP_DUCKDB_MEMORY_LIMIT` overrides it;
# bench/ingest_memory.py --day measures it).
DAY_MEMORY_LIMIT = "64MB"
# An operator that cannot spill within the limit: the day is computed again with 4x the memory, up to this.
DAY_MAX_MEMORY_LIMIT_MB = 16384


def compute_features(lake: Lake, partition: str) -> dict[str, WrittenPartition]:
    """Compute day `partition`'s snapshot of every feature view and write it to the lake.

    Reads `silver/events` partitions D-27..D and `silver/videos` partitions <= D (those that exist),
    counts only events before `D+1 00:00 UTC`, and writes `features/<view>/date=D/part-0.parquet` for each
    view, replacing any earlier run of the same partition.
    """
    engine, master = feature_engine()
    if engine == "spark":
        from recloop import spark_features

        return spark_features.write_snapshots(lake, [partition], master=master)[partition]
    tables = compute_feature_tables(lake, partition)
    return {view: lake.write_partition(feature_dataset(view), partition, t, **SNAPSHOT_PARQUET)
            for view, t in tables.items()}


def feature_engine() -> tuple[str, str]:
    """`(engine, spark master)`: what computes the snapshots (`RECLOOP_FEATURE_ENGINE`: duckdb, the default,
    or spark, `recloop.spark_features` on `RECLOOP_SPARK_MASTER`). Raises `SettingsError` for a bad value and
    `SparkUnavailable` (one) when spark is chosen without pyspark or Java 17+."""
    from recloop.config import feature_engine_from_env

    engine, master = feature_engine_from_env()
    if engine == "spark":
        from recloop import spark_features

        spark_features.check_available()
    return engine, master


# How snapshots are written: without dictionaries (on ml-latest-small's 31 M video rows, zstd alone is
# smaller and 15 % faster than with them), statistics only for the timestamps Feast filters on.
SNAPSHOT_PARQUET: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "write_statistics": ["event_timestamp", "created_timestamp"],
}


# --------------------------------------------------------------------------------------------------
# 1b. Offline features of a range of days, in bulk (history imports, `recloop run --start --end`)
# --------------------------------------------------------------------------------------------------


def snapshot_days(first: str, last: str, event_days: Iterable[str]) -> list[str]:
    """The days of `[first, last]` that get a snapshot in a range run: every day with validated events
    and every day before one (the snapshot a row of day D reads is D-1's, stamped D 00:00 UTC; see
    `training_set`). Days in a gap of two or more days without events, which no row reads, get none."""
    days = set(event_days)
    lo, hi = date.fromisoformat(first), date.fromisoformat(last)
    out = set()
    for d in days:
        day = date.fromisoformat(d)
        for s in (day, day - timedelta(days=1)):
            if lo <= s <= hi:
                out.add(s.isoformat())
    return sorted(out)


# The per-day queries (`_EVENTS_SQL`, `_VIDEOS_SQL`, `_QUERIES`) vectorised over a table `snaps(d, snap)` of
# snapshot days: every row carries its snapshot day `d`, and every aggregate groups by it as well. The
# results are the per-day snapshots exactly (tests/unit/test_history.py compares them day by day).
_RANGE_EVENTS_SQL = """
CREATE TEMP TABLE ev AS
SELECT s.d, s.snap, e.user_id, e.video_id, e.event_time, e.watched_s,
       coalesce(e.completed, false) AS completed,
       coalesce(e.liked, false) AS liked,
       e.watched_s > 0 AS watched,
       e.event_time >= s.snap - INTERVAL 1 DAY AS in_1d,
       e.event_time >= s.snap - INTERVAL 7 DAY AS in_7d
FROM snaps s JOIN events_src e
  ON e.event_time >= s.snap - INTERVAL 28 DAY AND e.event_time < s.snap
 AND e._p BETWEEN s.d - INTERVAL 27 DAY AND s.d
"""

# Videos known at each snapshot: accepted in a partition up to the day, uploaded before the snapshot;
# a video delivered twice keeps its latest row (the window only runs when a video has several rows).
_RANGE_VIDEOS_SQL = """
CREATE TEMP TABLE vid AS
SELECT s.d, s.snap, v.video_id, v.category, v.duration_s, v.upload_time
FROM snaps s JOIN videos_src v ON v.upload_time < s.snap AND v._p <= s.d
WHERE v.video_id IS NOT NULL
{qualify}
"""
_QUALIFY_LATEST = "QUALIFY row_number() OVER (PARTITION BY s.d, v.video_id ORDER BY v.upload_time DESC) = 1"

_RANGE_QUERIES: dict[str, str] = {
    USER_ACTIVITY: f"""
SELECT d, user_id,
       count(*) FILTER (WHERE in_1d)                                    AS impressions_1d,
       count(*) FILTER (WHERE in_7d)                                    AS impressions_7d,
       count(*)                                                         AS impressions_28d,
       count(*) FILTER (WHERE in_1d AND watched)                        AS watches_1d,
       count(*) FILTER (WHERE in_7d AND watched)                        AS watches_7d,
       count(*) FILTER (WHERE watched)                                  AS watches_28d,
       coalesce(sum(watched_s) FILTER (WHERE in_1d), 0)                 AS watch_s_1d,
       coalesce(sum(watched_s) FILTER (WHERE in_7d), 0)                 AS watch_s_7d,
       coalesce(sum(watched_s), 0)                                      AS watch_s_28d,
       coalesce(count(*) FILTER (WHERE watched AND completed)
                / nullif(count(*) FILTER (WHERE watched), 0), 0)        AS completion_rate_28d,
       count(*) FILTER (WHERE liked) / count(*)                         AS like_rate_28d,
       coalesce(date_diff('microsecond', max(event_time) FILTER (WHERE watched), snap) / {_DAY_US},
                {float(WINDOW_DAYS)})                                   AS days_since_last_watch,
       count(DISTINCT date_trunc('day', event_time)) FILTER (WHERE watched) AS active_days_28d
FROM ev
GROUP BY d, snap, user_id
ORDER BY d, user_id
""",
    USER_CATEGORY_AFFINITY: """
SELECT ev.d, ev.user_id, vid.category,
       sum(ev.watched_s)                                                AS watch_s_28d,
       count(*)                                                         AS watches_28d,
       sum(ev.watched_s) / sum(sum(ev.watched_s)) OVER (PARTITION BY ev.d, ev.user_id) AS watch_share_28d
FROM ev JOIN vid USING (d, video_id)
WHERE ev.watched
GROUP BY ev.d, ev.user_id, vid.category
ORDER BY ev.d, ev.user_id, vid.category
""",
    VIDEO_POPULARITY: f"""
WITH agg AS (
    SELECT d, video_id,
           count(*) FILTER (WHERE in_1d)                                AS impressions_1d,
           count(*) FILTER (WHERE in_7d)                                AS impressions_7d,
           count(*)                                                     AS impressions_28d,
           count(*) FILTER (WHERE in_1d AND watched)                    AS watches_1d,
           count(*) FILTER (WHERE in_7d AND watched)                    AS watches_7d,
           count(*) FILTER (WHERE watched)                              AS watches_28d,
           coalesce(sum(watched_s) FILTER (WHERE in_7d), 0)             AS watch_s_7d,
           coalesce(sum(watched_s), 0)                                  AS watch_s_28d,
           count(*) FILTER (WHERE watched AND completed)                AS completions_28d,
           count(*) FILTER (WHERE liked)                                AS likes_28d
    FROM ev
    GROUP BY d, video_id
)
SELECT vid.d, vid.video_id,
       coalesce(agg.impressions_1d, 0)                                  AS impressions_1d,
       coalesce(agg.impressions_7d, 0)                                  AS impressions_7d,
       coalesce(agg.impressions_28d, 0)                                 AS impressions_28d,
       coalesce(agg.watches_1d, 0)                                      AS watches_1d,
       coalesce(agg.watches_7d, 0)                                      AS watches_7d,
       coalesce(agg.watches_28d, 0)                                     AS watches_28d,
       coalesce(agg.watch_s_7d, 0)                                      AS watch_s_7d,
       coalesce(agg.watch_s_28d, 0)                                     AS watch_s_28d,
       coalesce(agg.watches_7d / nullif(agg.impressions_7d, 0), 0)      AS watch_rate_7d,
       coalesce(agg.completions_28d / nullif(agg.watches_28d, 0), 0)    AS completion_rate_28d,
       coalesce(agg.likes_28d / nullif(agg.impressions_28d, 0), 0)      AS like_rate_28d,
       date_diff('microsecond', vid.upload_time, vid.snap) / {_DAY_US}  AS age_days,
       vid.duration_s                                                   AS duration_s
FROM vid LEFT JOIN agg USING (d, video_id)
ORDER BY vid.d, vid.video_id
""",
}

# A range is computed a chunk of consecutive snapshot days at a time, to bound memory: at most about
# RANGE_CHUNK_EVENTS event rows in the chunk's windows (each event counts once per snapshot whose 28-day
# window holds it), and, when a video was delivered twice (the catalog is joined with every day in SQL),
# RANGE_CHUNK_VIDEO_ROWS (snapshot day x known video) rows.
RANGE_CHUNK_EVENTS = 20_000_000
# Threads writing a range's snapshots while the next days are computed.
WRITE_THREADS = 2
RANGE_CHUNK_VIDEO_ROWS = 2_000_000


def _chunks(days: Sequence[str], cost: Any, budget: int) -> list[list[str]]:
    """Consecutive runs of `days` whose `cost(day)` adds up to at most `budget` (at least one day each)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    total = 0
    for d in days:
        n = max(1, int(cost(d)))
        if current and total + n > budget:
            chunks.append(current)
            current, total = [], 0
        current.append(d)
        total += n
    if current:
        chunks.append(current)
    return chunks


def _rows_before(lake: Lake, dataset: str, partitions: Sequence[str]) -> Any:
    """`f(day, first=None)`: rows of `dataset`'s partitions in `[first, day]` (from the Parquet footers)."""
    import numpy as np

    parts = np.array(list(partitions), dtype=object)
    counts = np.array([_partition_rows_or_zero(lake, dataset, p) for p in parts], dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(counts)])

    def rows(day: str, first: str | None = None) -> int:
        hi = int(np.searchsorted(parts, day, "right")) if len(parts) else 0
        lo = int(np.searchsorted(parts, first, "left")) if first is not None and len(parts) else 0
        return int(cumulative[hi] - cumulative[min(lo, hi)])

    return rows


def _split_by_day(table: pa.Table, days: Sequence[str], view: str, created: datetime) -> dict[str, pa.Table]:
    """A range result (sorted by `d`) as one snapshot table per day, stamped like `compute_feature_tables`."""
    import numpy as np

    schema = FEATURE_SCHEMAS[view]
    d = table.column("d").cast(pa.int32()).to_numpy() if table.num_rows else np.array([], dtype=np.int32)
    wanted = np.array([(date.fromisoformat(day) - date(1970, 1, 1)).days for day in days], dtype=np.int32)
    lo, hi = np.searchsorted(d, wanted, "left"), np.searchsorted(d, wanted, "right")
    body = table.drop_columns(["d"])
    out = {}
    for day, a, b in zip(days, lo.tolist(), hi.tolist()):
        part = body.slice(a, b - a)
        n = part.num_rows
        snap = snapshot_time(day)
        part = part.append_column("event_timestamp", pa.repeat(pa.scalar(snap, TS), n))
        part = part.append_column("created_timestamp", pa.repeat(pa.scalar(created, TS), n))
        out[day] = part.select(schema.names).cast(schema)
    return out


def compute_feature_tables_range(
    lake: Lake, days: Sequence[str], *, chunk_events: int = RANGE_CHUNK_EVENTS,
    chunk_video_rows: int = RANGE_CHUNK_VIDEO_ROWS, memory_limit: str | None = None,
) -> Iterable[tuple[str, dict[str, pa.Table]]]:
    """The snapshot of every feature view for each of `days`, exactly as `compute_feature_tables` computes
    them one day at a time, but in a few DuckDB queries per chunk of consecutive days: yields
    `(day, {view: table})` in day order. With `memory_limit`, DuckDB spills beyond it to a temporary
    folder (None: DuckDB's default, most of the machine's memory)."""
    days = sorted(set(days))
    if not days:
        return
    video_parts = [p for p in lake.partitions("silver/videos") if p <= days[-1]]
    event_parts = lake.partitions("silver/events")
    event_files, video_files = local_partition_files(lake, "silver/events"), local_partition_files(lake, "silver/videos")
    con = duckdb.connect()
    try:
        register_partitions(con, "videos_src", lake, "silver/videos", video_parts, VIDEOS.schema, video_files)
        redelivered = bool(con.execute("SELECT count(*) > count(DISTINCT video_id) FROM videos_src "
                                       "WHERE video_id IS NOT NULL").fetchall()[0][0])
    finally:
        con.close()
    events_in = _rows_before(lake, "silver/events", event_parts)
    videos_upto = _rows_before(lake, "silver/videos", video_parts)

    def window_start(day: str) -> str:
        return (date.fromisoformat(day) - timedelta(days=WINDOW_DAYS - 1)).isoformat()

    if redelivered:
        chunks = _chunks(days, videos_upto, chunk_video_rows)
    else:
        chunks = _chunks(days, lambda d: events_in(d, window_start(d)), chunk_events)
    created = datetime.now(timezone.utc)
    for chunk in chunks:
        first_event_day = window_start(chunk[0])
        spill = tempfile.TemporaryDirectory(prefix="recloop-duckdb-") if memory_limit else None
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": spill.name} if spill else {})
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET preserve_insertion_order = false")
            snaps = pa.table({"d": pa.array([date.fromisoformat(d) for d in chunk], pa.date32())})
            con.register("snaps_arrow", snaps)
            con.execute("CREATE TEMP TABLE snaps AS SELECT d, CAST(d AS TIMESTAMPTZ) + INTERVAL 1 DAY AS snap "
                        "FROM snaps_arrow")
            register_partitions(con, "events_src", lake, "silver/events",
                                     [p for p in event_parts if first_event_day <= p <= chunk[-1]], EVENTS.schema,
                                     event_files)
            register_partitions(con, "videos_src", lake, "silver/videos",
                                     [p for p in video_parts if p <= chunk[-1]], VIDEOS.schema, video_files)
            con.execute(_RANGE_EVENTS_SQL)
            if redelivered:
                # A video delivered more than once: which of its rows a snapshot sees depends on the day.
                con.execute(_RANGE_VIDEOS_SQL.format(qualify=_QUALIFY_LATEST))
                per_view = {view: _split_by_day(con.sql(sql).to_arrow_table(), chunk, view, created)
                            for view, sql in _RANGE_QUERIES.items()}
                for day in chunk:
                    yield day, {view: per_view[view].pop(day) for view in FEATURE_VIEWS}
            else:
                activity = _split_by_day(con.sql(_RANGE_QUERIES[USER_ACTIVITY]).to_arrow_table(), chunk,
                                         USER_ACTIVITY, created)
                for day, tables in _catalog_snapshots(con, chunk, created):
                    yield day, {USER_ACTIVITY: activity.pop(day), **tables}
        finally:
            con.close()
            if spill:
                spill.cleanup()


def _partition_rows_or_zero(lake: Lake, dataset: str, partition: str) -> int:
    try:
        return _partition_rows(lake, dataset, partition)
    except FileNotFoundError:
        return 0


# Each video once (no video was delivered twice): `visible_from` is when a snapshot starts listing it (its
# upload, or the start of the day it was accepted on if that is later), `code` its rank by video_id.
_CATALOG_SQL = """
CREATE TEMP TABLE cat AS
SELECT row_number() OVER (ORDER BY video_id) - 1 AS code, video_id, category, duration_s, upload_time,
       greatest(upload_time, CAST(_p AS TIMESTAMPTZ)) AS visible_from
FROM videos_src WHERE video_id IS NOT NULL
"""
_CATALOG_AGG_SQL = """
SELECT ev.d, cat.code,
       count(*) FILTER (WHERE in_1d)                                    AS impressions_1d,
       count(*) FILTER (WHERE in_7d)                                    AS impressions_7d,
       count(*)                                                         AS impressions_28d,
       count(*) FILTER (WHERE in_1d AND watched)                        AS watches_1d,
       count(*) FILTER (WHERE in_7d AND watched)                        AS watches_7d,
       count(*) FILTER (WHERE watched)                                  AS watches_28d,
       coalesce(sum(watched_s) FILTER (WHERE in_7d), 0)                 AS watch_s_7d,
       coalesce(sum(watched_s), 0)                                      AS watch_s_28d,
       coalesce(count(*) FILTER (WHERE in_7d AND watched)
                / nullif(count(*) FILTER (WHERE in_7d), 0), 0)          AS watch_rate_7d,
       coalesce(count(*) FILTER (WHERE watched AND completed)
                / nullif(count(*) FILTER (WHERE watched), 0), 0)        AS completion_rate_28d,
       coalesce(count(*) FILTER (WHERE liked) / nullif(count(*), 0), 0) AS like_rate_28d
FROM ev JOIN cat ON ev.video_id = cat.video_id AND cat.visible_from < ev.snap
GROUP BY ev.d, cat.code
ORDER BY ev.d, cat.code
"""
_CATALOG_AFFINITY_SQL = """
SELECT ev.d, ev.user_id, cat.category,
       sum(ev.watched_s)                                                AS watch_s_28d,
       count(*)                                                         AS watches_28d,
       sum(ev.watched_s) / sum(sum(ev.watched_s)) OVER (PARTITION BY ev.d, ev.user_id) AS watch_share_28d
FROM ev JOIN cat ON ev.video_id = cat.video_id AND cat.visible_from < ev.snap
WHERE ev.watched
GROUP BY ev.d, ev.user_id, cat.category
ORDER BY ev.d, ev.user_id, cat.category
"""


def _catalog_snapshots(
    con: duckdb.DuckDBPyConnection, days: Sequence[str], created: datetime
) -> Iterable[tuple[str, dict[str, pa.Table]]]:
    """`video_popularity` and `user_category_affinity` of `days` when every video was delivered once: the
    catalog is listed in every snapshot, so rather than joining it with every day in SQL, a day's rows are
    the catalog's visible part (numpy) with the day's aggregates filled in where it had activity."""
    import numpy as np

    con.execute(_CATALOG_SQL)
    catalog = con.sql("SELECT code, video_id, duration_s, epoch_us(upload_time) AS upload_us, "
                      "epoch_us(visible_from) AS visible_us FROM cat ORDER BY code").to_arrow_table()
    ids = catalog.column("video_id").combine_chunks()
    duration = catalog.column("duration_s").to_numpy()
    upload_us = catalog.column("upload_us").to_numpy()
    visible_us = catalog.column("visible_us").to_numpy()
    agg = con.sql(_CATALOG_AGG_SQL).to_arrow_table()
    d = agg.column("d").cast(pa.int32()).to_numpy()
    codes = agg.column("code").to_numpy()
    columns = [c for c in feature_names(VIDEO_POPULARITY) if c not in ("age_days", "duration_s")]
    values = {c: agg.column(c).to_numpy() for c in columns}
    affinity = _split_by_day(con.sql(_CATALOG_AFFINITY_SQL).to_arrow_table(), days, USER_CATEGORY_AFFINITY, created)
    schema = FEATURE_SCHEMAS[VIDEO_POPULARITY]
    wanted = np.array([(date.fromisoformat(day) - date(1970, 1, 1)).days for day in days], dtype=np.int32)
    lo, hi = np.searchsorted(d, wanted, "left"), np.searchsorted(d, wanted, "right")
    for day, a, b in zip(days, lo.tolist(), hi.tolist()):
        snap = snapshot_time(day)
        snap_us = int(snap.timestamp()) * 1_000_000
        rows = np.flatnonzero(visible_us < snap_us)
        at = np.searchsorted(rows, codes[a:b])
        cols: dict[str, Any] = {"video_id": ids.take(pa.array(rows))}
        for c in columns:
            full = np.zeros(len(rows), dtype=values[c].dtype)
            full[at] = values[c][a:b]
            cols[c] = full
        cols["age_days"] = (snap_us - upload_us[rows]) / _DAY_US
        cols["duration_s"] = duration[rows]
        n = len(rows)
        cols["event_timestamp"] = pa.repeat(pa.scalar(snap, TS), n)
        cols["created_timestamp"] = pa.repeat(pa.scalar(created, TS), n)
        yield day, {VIDEO_POPULARITY: pa.table({name: cols[name] for name in schema.names}).cast(schema),
                    USER_CATEGORY_AFFINITY: affinity.pop(day)}


def compute_features_range(lake: Lake, first: str, last: str, **chunking: int) -> dict[str, Any]:
    """Every feature view's snapshots for the range `[first, last]`, in bulk: the days `snapshot_days`
    picks (every day with validated events and every day before one) are computed a chunk at a time and
    written to `features/<view>/date=D/`; snapshots the range held for other days (an earlier run over
    different data) are deleted, so a re-run leaves exactly what the data gives.

    Returns `{"days": [...], "rows": {view: n}, "bytes": {view: n}, "newest": day or None, "deleted": n}`.
    """
    from recloop import progress

    events = [p for p in lake.partitions("silver/events")]
    days = snapshot_days(first, last, events)
    rows = {view: 0 for view in FEATURE_VIEWS}
    size = {view: 0 for view in FEATURE_VIEWS}
    from concurrent.futures import ThreadPoolExecutor

    def write(day: str, tables: dict[str, pa.Table]) -> dict[str, WrittenPartition]:
        return {view: lake.write_partition(feature_dataset(view), day, t, **SNAPSHOT_PARQUET) for view, t in tables.items()}

    engine, master = feature_engine()
    with progress.stage("features", len(days), "day") as bar, ThreadPoolExecutor(WRITE_THREADS) as pool:
        if engine == "spark" and days:
            from recloop import spark_features

            for day, written_views in spark_features.write_snapshots(lake, days, master=master).items():
                for view, written in written_views.items():
                    rows[view] += written.rows
                    size[view] += written.bytes
                bar.update(1)
        # Parquet encoding releases the GIL: the next days are computed while the last ones are written.
        pending: list = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                for view, written in pending.pop(0).result().items():
                    rows[view] += written.rows
                    size[view] += written.bytes
                bar.update(1)

        if engine == "duckdb":
            for day, tables in compute_feature_tables_range(lake, days, **chunking):
                pending.append(pool.submit(write, day, tables))
                drain(4 * WRITE_THREADS)
        drain(0)
        wanted = set(days)
        deleted = 0
        for view in FEATURE_VIEWS:
            for p in lake.partitions(feature_dataset(view)):
                if first <= p <= last and p not in wanted:
                    deleted += lake.delete_partition(feature_dataset(view), p) and 1
        bar.note(f"{rows[VIDEO_POPULARITY]:,} video rows")
    return {"days": days, "rows": rows, "bytes": size, "newest": days[-1] if days else None, "deleted": deleted}


# --------------------------------------------------------------------------------------------------
# 2./3. Feast: the store, apply, materialize, online and historical retrieval
# --------------------------------------------------------------------------------------------------

# Building a store and applying the repo touch process-wide state (environment variables read by
# feature_store.yaml and data_sources.py, the working directory and sys.path/sys.modules Feast's repo
# parser relies on): one lock serialises them, and every change is undone afterwards.
_FEAST_LOCK = threading.RLock()
# The repo modules are imported under these top-level names by Feast's parser.
_REPO_MODULES = ("entities", "data_sources", "features", "feature_services")


def feast_environment(settings: "Settings", project: str | None = None) -> dict[str, str]:
    """The `RECLOOP_*` variables `feature_repo/feature_store.yaml` and `data_sources.py` read."""
    data = Path(settings.feast_data_dir)
    return {
        "RECLOOP_FEAST_PROJECT": project or getattr(settings, "feast_project", None) or DEFAULT_PROJECT,
        "RECLOOP_FEAST_REGISTRY": str(data / "registry.db"),
        "RECLOOP_FEAST_ONLINE_PATH": str(data / "online.db"),
        "RECLOOP_LAKE_URI": settings.lake_uri,
        **({"RECLOOP_S3_ENDPOINT_URL": settings.s3_endpoint_url} if settings.s3_endpoint_url else {}),
    }


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def redis_connection_string(url: str) -> str:
    """Feast's Redis `connection_string` ("host:port,db=0,password=...,ssl=true") for a redis:// URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    parts = [f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"]
    db = (parsed.path or "/").strip("/") or "0"
    parts.append(f"db={int(db)}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def resolve_online(settings: "Settings", online: str | None) -> str:
    """The online store to use: as asked, else Redis in production and SQLite in the embedded default."""
    if online is None:
        return "redis" if getattr(settings, "is_production", False) else "sqlite"
    if online not in ("sqlite", "redis"):
        raise ValueError(f"online must be 'sqlite' or 'redis', got {online!r}")
    return online


def _repo_config(settings: "Settings", project: str | None, online: str | None, redis_url: str | None):
    """Feast's RepoConfig from feature_store.yaml, read exactly as Feast reads it (`${VAR}` expanded),
    with the production blocks swapped in code (so there is one yaml to maintain):

    * `online_store`: Redis at `redis_url` / `settings.redis_url` when `online` is "redis" (the default in
      production);
    * `registry`: Feast's SQL registry at `settings.feast_registry_url` (PostgreSQL) in production, with
      the yaml's cache ttl;
    * `offline_store`: `recloop.feast_offline.S3DuckDBOfflineStore` (Feast's DuckDB store reading `s3://`
      sources through Arrow's S3 filesystem) when the lake is on S3.
    """
    import yaml
    from feast.repo_config import FeastConfigError, RepoConfig
    from pydantic import ValidationError

    repo = Path(settings.feature_repo).resolve()
    yaml_path = repo / "feature_store.yaml"
    raw = yaml.safe_load(os.path.expandvars(yaml_path.read_text()))  # = feast.repo_config.load_repo_config
    if resolve_online(settings, online) == "redis":
        url = redis_url or getattr(settings, "redis_url", None)
        if not url:
            raise ValueError("online='redis' needs redis_url (or settings.redis_url / RECLOOP_REDIS_URL)")
        raw["online_store"] = {"type": "redis", "connection_string": redis_connection_string(url)}
    if getattr(settings, "is_production", False):
        registry_url = getattr(settings, "feast_registry_url", None)
        if not registry_url:
            raise ValueError("production needs RECLOOP_FEAST_REGISTRY_URL (Feast's SQL registry)")
        file_registry = raw.get("registry") if isinstance(raw.get("registry"), dict) else {}
        raw["registry"] = {
            "registry_type": "sql",
            "path": registry_url,
            "cache_ttl_seconds": file_registry.get("cache_ttl_seconds", 10),
            # connections from a pool may have been closed by the server or a proxy in between
            "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True},
        }
    if str(settings.lake_uri).startswith("s3://"):
        from recloop.feast_offline import STORE_TYPE

        offline = dict(raw.get("offline_store") or {})
        if offline.get("type", "duckdb") == "duckdb":
            raw["offline_store"] = {**offline, "type": STORE_TYPE}
    try:
        config = RepoConfig(**raw)
    except ValidationError as err:
        raise FeastConfigError(err, yaml_path) from err
    config.repo_path = repo
    return config


def _close_ibis_default_backend() -> None:
    """Close ibis's default DuckDB connection, which Feast's duckdb offline store opens and never closes.

    Left open, DuckDB 2.0's bindings print a screenful of "nanobind: leaked ..." at interpreter exit
    (after a test runner's summary line). Registered with atexit by `feature_store()`.
    """
    ibis = sys.modules.get("ibis")
    backend = getattr(getattr(ibis, "options", None), "default_backend", None)
    if backend is None:
        return
    with contextlib.suppress(Exception):  # at exit, a failing close must not mask the real exit status
        backend.disconnect()
    ibis.options.default_backend = None


_ATEXIT = threading.Event()


def feature_store(
    settings: "Settings",
    *,
    project: str | None = None,
    online: str | None = None,
    redis_url: str | None = None,
) -> "feast.FeatureStore":
    """A Feast FeatureStore on `settings.feature_repo`.

    Embedded default: the registry (`registry.db`) and the SQLite online store (`online.db`) live in
    `settings.feast_data_dir`. Production (`settings.is_production`): the SQL registry on PostgreSQL
    (`settings.feast_registry_url`) and the Redis online store. `online` ("sqlite" | "redis", default by
    the environment) picks the online store; with "redis" it is at `redis_url` (default
    `settings.redis_url`). The project defaults to `settings.feast_project` ("recloop"). The same
    feature_store.yaml is loaded in every case and only its production blocks are swapped, in code,
    before the RepoConfig is built (`FeatureStore(config=...)`; see `_repo_config`).
    """
    from feast import FeatureStore

    if not _ATEXIT.is_set():
        _ATEXIT.set()
        atexit.register(_close_ibis_default_backend)
    if not getattr(settings, "is_production", False) or resolve_online(settings, online) == "sqlite":
        Path(settings.feast_data_dir).mkdir(parents=True, exist_ok=True)  # file registry / SQLite store
    with _FEAST_LOCK, _patched_environ(feast_environment(settings, project)):
        config = _repo_config(settings, project, online, redis_url)
        rehome_registry(config, settings.lake_uri)
        return FeatureStore(repo_path=str(config.repo_path), config=config)


def _file_registry_path(config: Any) -> Path | None:
    """The local file of a `registry_type: file` registry (as Feast resolves it), else None."""
    registry = config.registry
    if getattr(registry, "registry_type", "file") != "file" or not registry.path or "://" in registry.path:
        return None
    path = Path(registry.path)
    return path if path.is_absolute() else Path(config.repo_path) / path


def _rehome_sources(message: Any, lake: str) -> list[str]:
    """Every file data source inside `message` (data sources, feature views' batch sources, feature
    services' projections, the serialized views of Feast's version history) pointed at `lake`."""
    from google.protobuf.descriptor import FieldDescriptor

    changed: list[str] = []
    if message.DESCRIPTOR.full_name == "feast.core.DataSource" and message.HasField("file_options"):
        uri = message.file_options.uri
        _, sep, view = uri.rpartition("/features/")
        if sep and view in FEATURE_VIEWS and uri != f"{lake}/features/{view}":
            message.file_options.uri = f"{lake}/features/{view}"
            changed.append(f"source {message.name or view}: {uri} -> {lake}/features/{view}")
        return changed
    if message.DESCRIPTOR.full_name == "feast.core.FeatureViewVersionRecord" and message.feature_view_proto \
            and message.feature_view_type == "feature_view":
        from feast.protos.feast.core.FeatureView_pb2 import FeatureView as FeatureViewProto

        view = FeatureViewProto.FromString(message.feature_view_proto)
        if inner := _rehome_sources(view, lake):
            message.feature_view_proto = view.SerializeToString()
            changed += [f"version history of {view.spec.name}: {c}" for c in inner]
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or (field.message_type.GetOptions().map_entry):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED
        for item in (value if repeated else [value]):
            changed += _rehome_sources(item, lake)
    return changed


def rehome_registry(config: Any, lake_uri: str) -> list[str]:
    """Point a file registry's stored paths at this home: the SQLite online store's file in its infra and
    each feature view's lake folder (`<lake>/features/<view>`). Returns what was changed (nothing when the
    registry already points here, which is every time but the first after a copy or a move).

    Feast stores both as absolute paths. A copied home (`cp -a A B`) would otherwise read A's lake, and
    its first `feast apply` would diff the stored infra (A's tables) against the planned one (B's) and
    drop A's online tables: `RECLOOP_HOME=B recloop run` emptied A's online store. The registry is
    rewritten (atomically) before Feast reads it, so no Feast call ever sees another home's paths."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    path = _file_registry_path(config)
    if path is None or not path.is_file():
        return []
    proto = RegistryProto()
    proto.ParseFromString(path.read_bytes())
    changed: list[str] = []
    if getattr(config.online_store, "type", None) == "sqlite":
        db = SqliteOnlineStore._get_db_path(config)
        for obj in proto.infra.infra_objects:
            if obj.WhichOneof("infra_object") == "sqlite_table" and obj.sqlite_table.path != db:
                changed.append(f"online table {obj.sqlite_table.name}: {obj.sqlite_table.path} -> {db}")
                obj.sqlite_table.path = db
    changed += _rehome_sources(proto, str(lake_uri).rstrip("/"))
    if changed:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
        import logging

        logging.getLogger(__name__).warning("Feast registry %s re-rooted to this home (%d stored paths): %s%s", path,
                                            len(changed), "; ".join(changed[:3]), "; ..." if len(changed) > 3 else "")
    return changed


@contextlib.contextmanager
def _repo_import_context(repo: Path):
    """What `feast apply` sets up to import the repo: cwd and sys.path at the repo, modules fresh.

    Modules of the repo are imported by top-level names (`features`, `entities`, ...): any module of
    those names already loaded is set aside so that Feast imports the repo's own files (re-reading the
    environment), and everything is restored afterwards.
    """
    saved_modules = {name: sys.modules.pop(name) for name in _REPO_MODULES if name in sys.modules}
    cwd = os.getcwd()
    sys.path.insert(0, str(repo))
    dont_write_bytecode = sys.dont_write_bytecode
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.dont_write_bytecode = dont_write_bytecode
        with contextlib.suppress(ValueError):
            sys.path.remove(str(repo))
        for name in _REPO_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved_modules)
        importlib.invalidate_caches()


def apply_repo(
    settings: "Settings",
    *,
    project: str | None = None,
    online: str | None = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """`feast apply` for the repo, in process: Feast's own parser and apply (objects removed from the
    repo are removed from the registry, online tables created). Returns the names now registered."""
    from feast import repo_operations

    store = feature_store(settings, project=project, online=online, redis_url=redis_url)
    project_name = store.project
    repo = Path(settings.feature_repo).resolve()
    with _FEAST_LOCK, _patched_environ(feast_environment(settings, project_name)), _repo_import_context(repo):
        try:  # Feast's parser exits the process on a repo/project mismatch: make that an exception
            contents = repo_operations._get_repo_contents(repo, project_name, store.config)
        except SystemExit as err:
            raise RuntimeError(f"Feast could not parse the feature repo {repo} (see the output above)") from err
        repo_operations.apply_total_with_repo_instance(
            store, project_name, store.registry, contents, skip_source_validation=False
        )
    store.refresh_registry()
    return {
        "project": project_name,
        "entities": sorted(e.name for e in store.list_entities() if e.name != "__dummy"),
        "data_sources": sorted(s.name for s in store.list_data_sources()),
        "feature_views": sorted(v.name for v in store.list_feature_views()),
        "feature_services": sorted(s.name for s in store.list_feature_services()),
    }


def _latest_interval_end(view: Any) -> datetime | None:
    ends = [end for _, end in (view.materialization_intervals or [])]
    if not ends:
        return None
    latest = max(ends)
    return latest if latest.tzinfo else latest.replace(tzinfo=timezone.utc)


def _partition_rows(lake: Lake, dataset: str, partition: str) -> int:
    key = f"{partition_key(dataset, partition)}/{PART_FILE}"
    path = lake.local_path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no partition {partition} in {dataset!r} at {path}: compute it first")
        return pq.ParquetFile(path).metadata.num_rows
    return lake.read_partition(dataset, partition).num_rows


def materialize_partition(
    settings: "Settings",
    partition: str,
    *,
    views: Iterable[str] | None = None,
    project: str | None = None,
    online: str | None = None,
    redis_url: str | None = None,
    lake: Lake | None = None,
) -> dict[str, Any]:
    """Load day `partition`'s snapshot (event_timestamp = D+1 00:00 UTC) into the online store.

    Runs Feast's `store.materialize(start, end, feature_views=[view])` per view over the window
    `[T - 1 h, T]` around the snapshot time T, which holds exactly that one snapshot. A view whose
    registry `materialization_intervals` already end after T holds a newer snapshot online; the SQLite
    store overwrites without comparing timestamps, so such views are skipped rather than regressed.
    Returns `{"partition", "snapshot", "skipped", "reason"?, "views": {view: {"rows", "seconds",
    "rows_per_s"}}, "skipped_views": {view: reason}, "seconds"}`.
    """
    from recloop.lake import open_lake

    started = time.perf_counter()
    snap = snapshot_time(partition)
    wanted = list(views) if views is not None else list(FEATURE_VIEWS)
    for view in wanted:
        feature_dataset(view)  # validates the name
    lake = lake or open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    store = feature_store(settings, project=project, online=online, redis_url=redis_url)

    todo: list[str] = []
    skipped_views: dict[str, str] = {}
    for view in wanted:
        latest = _latest_interval_end(store.get_feature_view(view))
        if latest is not None and latest > snap:
            skipped_views[view] = (
                f"online store already holds a newer snapshot (materialized up to {latest.isoformat()}, "
                f"this one is {snap.isoformat()})"
            )
        else:
            todo.append(view)
    result: dict[str, Any] = {
        "partition": partition,
        "snapshot": snap.isoformat(),
        "project": store.project,
        "online_store": store.config.online_store.type,
        "skipped": not todo,
        "views": {},
        "skipped_views": skipped_views,
    }
    if not todo:
        result["reason"] = "; ".join(f"{v}: {r}" for v, r in skipped_views.items())
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    rows = {view: _partition_rows(lake, feature_dataset(view), partition) for view in todo}
    for view in todo:
        t0 = time.perf_counter()
        store.materialize(start_date=snap - timedelta(hours=1), end_date=snap, feature_views=[view])
        seconds = time.perf_counter() - t0
        result["views"][view] = {
            "rows": rows[view],
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows[view] / seconds, 1) if seconds > 0 else None,
        }
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _feature_selection(store: "feast.FeatureStore", features: str | Sequence[str]) -> Any:
    """A feature service (by name) or a list of `view:feature` references."""
    if isinstance(features, str):
        return store.get_feature_service(features)
    return list(features)


def _selected_views(store: "feast.FeatureStore", selection: Any) -> set[str]:
    if isinstance(selection, list):
        return {ref.split(":", 1)[0] for ref in selection}
    return {p.name for p in selection.feature_view_projections}


def online_features(
    settings: "Settings",
    *,
    user_ids: Sequence[str],
    video_ids: Sequence[str],
    categories: Sequence[str] | None = None,
    features: str | Sequence[str] | None = None,
    project: str | None = None,
    online: str | None = None,
    redis_url: str | None = None,
    store: "feast.FeatureStore | None" = None,
) -> "pd.DataFrame":
    """Online features for (user, video) rows via `store.get_online_features`.

    `user_ids` and `video_ids` are paired row by row; a single user is broadcast over all videos.
    `categories` (the videos' categories, aligned with `video_ids`) is needed for the
    `user_category_affinity` view. `features` is a feature service name or a list of `view:feature`
    references; by default `ranking_features` when categories are given, else `retrieval_features`.
    Columns: the keys, then `<view>__<feature>` (missing values are NaN/None).
    """
    users, videos = list(user_ids), list(video_ids)
    if len(users) == 1 and len(videos) > 1:
        users = users * len(videos)
    if len(users) != len(videos):
        raise ValueError(f"user_ids ({len(users)}) and video_ids ({len(videos)}) must pair up")
    cats = list(categories) if categories is not None else None
    if cats is not None and len(cats) != len(videos):
        raise ValueError(f"categories ({len(cats)}) must align with video_ids ({len(videos)})")
    store = store or feature_store(settings, project=project, online=online, redis_url=redis_url)
    if features is None:
        features = "ranking_features" if cats is not None else "retrieval_features"
    selection = _feature_selection(store, features)
    if USER_CATEGORY_AFFINITY in _selected_views(store, selection) and cats is None:
        raise ValueError("the user_category_affinity view needs `categories` for the entity rows")
    columns: dict[str, list[str]] = {"user_id": users, "video_id": videos}
    if cats is not None:
        columns["category"] = cats
    entity_rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    response = store.get_online_features(features=selection, entity_rows=entity_rows, full_feature_names=True)
    return response.to_df()


def training_set(
    settings: "Settings",
    entity_df: "pd.DataFrame",
    feature_service: str = "ranking_features",
    *,
    project: str | None = None,
    store: "feast.FeatureStore | None" = None,
) -> "pd.DataFrame":
    """Point-in-time correct features for `entity_df` via `store.get_historical_features`.

    `entity_df` has `user_id`, `video_id`, `category` (for the affinity view) and `event_timestamp`; any
    other column (labels) passes through. A row at time t gets, per view, the newest snapshot with
    event_timestamp <= t and not older than the view's ttl (2 days), so nothing computed from events
    after t leaks in. Rows come back in the order given; features are named `<view>__<feature>`.
    """
    import pandas as pd

    required = {"user_id", "video_id", "event_timestamp"}
    store = store or feature_store(settings, project=project)
    service = store.get_feature_service(feature_service)
    if USER_CATEGORY_AFFINITY in _selected_views(store, service):
        required.add("category")
    missing = required - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks column(s) {sorted(missing)}")
    df = entity_df.copy()
    # Feast's DuckDB store compares against microsecond UTC timestamps.
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    order = "__recloop_row"
    df[order] = range(len(df))
    job = store.get_historical_features(entity_df=df, features=service, full_feature_names=True)
    out = job.to_df()
    return out.sort_values(order).drop(columns=[order]).reset_index(drop=True)


def feature_freshness(
    settings: "Settings",
    *,
    project: str | None = None,
    now: datetime | None = None,
    store: "feast.FeatureStore | None" = None,
) -> dict[str, Any]:
    """Age of the newest snapshot materialized online, per view (from the registry's
    materialization intervals). `max_age_hours` is the stalest view's age, None if one never was."""
    store = store or feature_store(settings, project=project)
    now = now or datetime.now(timezone.utc)
    views: dict[str, dict[str, Any]] = {}
    for view in FEATURE_VIEWS:
        latest = _latest_interval_end(store.get_feature_view(view))
        views[view] = {
            "newest_snapshot": latest.isoformat() if latest else None,
            "age_hours": round((now - latest).total_seconds() / 3600, 3) if latest else None,
        }
    ages = [v["age_hours"] for v in views.values()]
    return {
        "project": store.project,
        "checked_at": now.isoformat(),
        "views": views,
        "max_age_hours": None if any(a is None for a in ages) else max(ages),
    }
