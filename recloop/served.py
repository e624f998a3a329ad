"""Served impressions joined with the feedback on them (issue 14, contract 3): the day's served negatives
appended to `silver/events`, and every impression's outcome in `silver/impression_outcomes`.

The serving API logs what it showed (`silver/impressions`, one row per item of one answer) and the feedback
endpoint writes the events users report, with the answer's `request_id`. An impression with no event of
the same (request_id, video_id) on its day was shown and ignored: a *served negative*. Features, drift and
training read `silver/events` and expect one row per impression, watched or not (the simulator and batch
deliveries carry their unwatched impressions themselves), so the served negatives are appended to the day's
events as `watched_s = 0, completed = liked = false`, with `event_id = impression_id`,
`event_time = served_at` and the impression's request_id, position and surface.

A served negative identifies itself: its event_id is `f"{request_id}-{position}"` (the impression id) and it
reports nothing watched, completed or liked. The join drops those rows before adding the day's negatives
again, so it can run any number of times (and after a re-validation of the impressions) without
duplicating or keeping stale negatives. A feedback event that reuses the impression id as its own id and
reports nothing watched is indistinguishable from a served negative and counted as one (same values).

Negatives are added only for users and videos accepted up to the day (`silver/users`, `silver/videos`),
the rule every row of `silver/events` obeys; the others are counted (`skipped_unknown`) and still have
their outcome. Feedback is matched on the same UTC day only: feedback on an answer served just before
midnight that arrives after it leaves a served negative on the first day and a positive on the next.

`silver/impression_outcomes/date=D`: every impression of the day with `watched_s` (0 when none),
`completed`, `liked` (any feedback event said so) and `feedback` (an event was reported): what online
metrics read (`recloop.online`). A day without impressions has an empty partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from recloop.data.schemas import EVENTS, IMPRESSIONS
from recloop.lake import Lake, WrittenPartition, local_partition_files, register_partitions

IMPRESSIONS_DATASET = "silver/impressions"
EVENTS_DATASET = "silver/events"
OUTCOMES_DATASET = "silver/impression_outcomes"

OUTCOMES_SCHEMA = pa.schema([
    *IMPRESSIONS.schema,
    pa.field("watched_s", pa.float64()),
    pa.field("completed", pa.bool_()),
    pa.field("liked", pa.bool_()),
    pa.field("feedback", pa.bool_()),
])

# A row of silver/events that is a served negative the join added (see the module docstring).
_IS_NEGATIVE = ("(e.request_id IS NOT NULL AND e.position IS NOT NULL "
                "AND e.event_id = e.request_id || '-' || CAST(e.position AS VARCHAR) "
                "AND e.watched_s = 0 AND e.completed IS NOT TRUE AND e.liked IS NOT TRUE)")


@dataclass(frozen=True)
class JoinResult:
    """What the join did to one day's `silver/events`."""

    partition: str
    impressions: int
    feedback_events: int  # events of the day that carry a request_id (reported through the feedback endpoint)
    impressions_with_feedback: int
    served_negatives: int  # appended to silver/events
    skipped_unknown: int  # impressions without feedback whose user or video is not accepted: no negative
    events: int  # rows of silver/events after the join
    written: WrittenPartition | None  # None: silver/events was left as it was

    def summary(self) -> dict[str, Any]:
        return {"partition": self.partition, "impressions": self.impressions, "feedback_events": self.feedback_events,
                "impressions_with_feedback": self.impressions_with_feedback,
                "served_negatives": self.served_negatives, "skipped_unknown": self.skipped_unknown,
                "events": self.events, "path": self.written.uri if self.written else None}


@dataclass(frozen=True)
class OutcomesResult:
    """One day's `silver/impression_outcomes`."""

    partition: str
    impressions: int
    with_feedback: int
    watched: int  # impressions with watched_s > 0
    written: WrittenPartition

    @property
    def feedback_rate(self) -> float:
        return self.with_feedback / self.impressions if self.impressions else 0.0

    def summary(self) -> dict[str, Any]:
        return {"partition": self.partition, "impressions": self.impressions, "with_feedback": self.with_feedback,
                "watched": self.watched, "feedback_rate": round(self.feedback_rate, 6), "path": self.written.uri}


def _read(lake: Lake, dataset: str, partition: str, schema: pa.Schema) -> pa.Table | None:
    """The partition with exactly `schema`'s columns (an absent column, e.g. request_id in a partition
    validated before it existed, as nulls); None when the partition does not exist."""
    if not lake.has_partition(dataset, partition):
        return None
    t = lake.read_partition(dataset, partition)
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'").fetchall()
    return con


def _register_known(con: duckdb.DuckDBPyConnection, lake: Lake, partition: str) -> None:
    """`known_users(user_id)`, `known_videos(video_id)`: accepted on the day or before (ids only are read)."""
    for dim, key in (("users", "user_id"), ("videos", "video_id")):
        dataset = f"silver/{dim}"
        parts = [p for p in lake.partitions(dataset) if p <= partition]
        register_partitions(con, f"known_{dim}", lake, dataset, parts, pa.schema([pa.field(key, pa.string())]),
                            local_partition_files(lake, dataset))


def _day_tables(lake: Lake, partition: str) -> tuple[pa.Table, pa.Table]:
    """The day's accepted impressions and silver events (empty tables for a day without them)."""
    impressions = _read(lake, IMPRESSIONS_DATASET, partition, IMPRESSIONS.schema)
    events = _read(lake, EVENTS_DATASET, partition, EVENTS.silver_schema)
    return (IMPRESSIONS.schema.empty_table() if impressions is None else impressions,
            EVENTS.silver_schema.empty_table() if events is None else events)


def append_served_negatives(lake: Lake, partition: str) -> JoinResult:
    """Day `partition`'s served negatives into `silver/events/date=<partition>` (replacing the partition:
    the events without earlier served negatives, then the negatives of the day's accepted impressions).
    Leaves the partition alone when there is nothing to add or remove. Idempotent."""
    impressions, events = _day_tables(lake, partition)
    con = _connect()
    try:
        con.register("imp", impressions)
        con.register("ev", events)
        _register_known(con, lake, partition)
        con.execute(f"CREATE TEMP TABLE base AS SELECT e.* FROM ev e WHERE NOT {_IS_NEGATIVE}").fetchall()
        stale = events.num_rows - con.execute("SELECT count(*) FROM base").fetchall()[0][0]
        feedback_events = con.execute("SELECT count(*) FROM base WHERE request_id IS NOT NULL").fetchall()[0][0]
        con.execute("""
CREATE TEMP TABLE open AS
SELECT i.* FROM imp i
WHERE NOT EXISTS (SELECT 1 FROM base b WHERE b.request_id = i.request_id AND b.video_id = i.video_id)
""").fetchall()
        with_feedback = impressions.num_rows - con.execute("SELECT count(*) FROM open").fetchall()[0][0]
        negatives = con.sql("""
SELECT o.impression_id AS event_id, o.user_id, o.video_id, o.served_at AS event_time, o.surface, o.position,
       0.0::DOUBLE AS watched_s, false AS completed, false AS liked, o.request_id
FROM open o
WHERE o.user_id IN (SELECT user_id FROM known_users) AND o.video_id IN (SELECT video_id FROM known_videos)
  AND NOT EXISTS (SELECT 1 FROM base b WHERE b.event_id = o.impression_id)
ORDER BY o.served_at, o.request_id, o.position
""").to_arrow_table()
        open_count = impressions.num_rows - with_feedback
        base = con.sql("SELECT * FROM base").to_arrow_table()
    finally:
        con.close()
    written = None
    rows = events.num_rows
    if negatives.num_rows or stale:
        out = pa.concat_tables([base.cast(EVENTS.silver_schema), negatives.cast(EVENTS.silver_schema)])
        written = lake.write_partition(EVENTS_DATASET, partition, out)
        rows = out.num_rows
    return JoinResult(partition=partition, impressions=impressions.num_rows, feedback_events=int(feedback_events),
                      impressions_with_feedback=int(with_feedback), served_negatives=negatives.num_rows,
                      skipped_unknown=int(open_count - negatives.num_rows), events=rows, written=written)


def write_outcomes(lake: Lake, partition: str) -> OutcomesResult:
    """`silver/impression_outcomes/date=<partition>`: each accepted impression of the day with the outcome
    its feedback events reported (watched_s: the longest watch, completed / liked: any event said so,
    feedback: at least one event), from the day's `silver/events` without the served negatives. Replaces
    the partition (an empty one for a day without impressions)."""
    impressions, events = _day_tables(lake, partition)
    con = _connect()
    try:
        con.register("imp", impressions)
        con.register("ev", events)
        cols = ", ".join(f"i.{c}" for c in IMPRESSIONS.columns)
        out = con.sql(f"""
WITH fb AS (
  SELECT e.request_id, e.video_id, max(e.watched_s) AS watched_s, bool_or(coalesce(e.completed, false)) AS completed,
         bool_or(coalesce(e.liked, false)) AS liked
  FROM ev e WHERE e.request_id IS NOT NULL AND NOT {_IS_NEGATIVE}
  GROUP BY e.request_id, e.video_id
)
SELECT {cols}, coalesce(fb.watched_s, 0.0) AS watched_s, coalesce(fb.completed, false) AS completed,
       coalesce(fb.liked, false) AS liked, fb.request_id IS NOT NULL AS feedback
FROM imp i LEFT JOIN fb ON fb.request_id = i.request_id AND fb.video_id = i.video_id
ORDER BY i.served_at, i.request_id, i.position
""").to_arrow_table().cast(OUTCOMES_SCHEMA)
    finally:
        con.close()
    written = lake.write_partition(OUTCOMES_DATASET, partition, out)
    feedback = out.column("feedback").to_numpy(zero_copy_only=False)
    watched = out.column("watched_s").to_numpy(zero_copy_only=False)
    return OutcomesResult(partition, out.num_rows, int(feedback.sum()), int((watched > 0).sum()), written)


def read_outcomes(lake: Lake, partitions: list[str] | None = None) -> pa.Table:
    """`silver/impression_outcomes` of `partitions` (default: every day that has them), in one table."""
    days = lake.partitions(OUTCOMES_DATASET) if partitions is None else partitions
    tables = [_read(lake, OUTCOMES_DATASET, d, OUTCOMES_SCHEMA) for d in days]
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables) if tables else OUTCOMES_SCHEMA.empty_table()


__all__ = [
    "EVENTS_DATASET",
    "IMPRESSIONS_DATASET",
    "OUTCOMES_DATASET",
    "OUTCOMES_SCHEMA",
    "JoinResult",
    "OutcomesResult",
    "append_served_negatives",
    "read_outcomes",
    "write_outcomes",
]
