"""The three tables of recloop and their canonical (validated) types.

These schemas are the contract between every stage: the simulator and the readers for users' own files
produce them, ingestion lands them as they came, validation casts to them, and features read them.
Documented for users in docs/data_schema.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSchema:
    """A table's name, its primary key, its time column and its canonical Arrow schema."""

    name: str
    key: str
    time_column: str
    schema: pa.Schema
    # Columns that must be present and non-null on every accepted row (keys and times).
    required: tuple[str, ...]
    # Whether a partition with zero rows is legitimate (a day with no sign-ups is; a day with no
    # events is a delivery problem).
    allow_empty: bool

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)


USERS = TableSchema(
    name="users",
    key="user_id",
    time_column="signup_time",
    schema=pa.schema(
        [
            ("user_id", pa.string()),
            ("country", pa.string()),
            ("age_bucket", pa.string()),
            ("signup_time", TIMESTAMP),
            ("device", pa.string()),
        ]
    ),
    required=("user_id", "signup_time"),
    allow_empty=True,
)

VIDEOS = TableSchema(
    name="videos",
    key="video_id",
    time_column="upload_time",
    schema=pa.schema(
        [
            ("video_id", pa.string()),
            ("title", pa.string()),
            # Tags joined by "|", e.g. "cats|funny"; empty string when a video has none.
            ("tags", pa.string()),
            ("category", pa.string()),
            ("creator_id", pa.string()),
            ("duration_s", pa.float64()),
            ("upload_time", TIMESTAMP),
        ]
    ),
    required=("video_id", "category", "duration_s", "upload_time"),
    allow_empty=True,
)

# One row per impression: a video shown to a user on a surface at a position, with what happened next.
# Impressions that were not watched are kept (watched_s = 0): the ranker needs negatives.
EVENTS = TableSchema(
    name="events",
    key="event_id",
    time_column="event_time",
    schema=pa.schema(
        [
            ("event_id", pa.string()),
            ("user_id", pa.string()),
            ("video_id", pa.string()),
            ("event_time", TIMESTAMP),
            ("surface", pa.string()),
            ("position", pa.int32()),
            ("watched_s", pa.float64()),
            ("completed", pa.bool_()),
            ("liked", pa.bool_()),
        ]
    ),
    required=("event_id", "user_id", "video_id", "event_time", "watched_s"),
    allow_empty=False,
)

# What the serving API showed: one row per recommended item of one answer of /v1/recommendations, logged
# by the server (never delivered in batch files). Feedback events may carry the answer's `request_id`;
# ingestion joins the two (an impression without feedback is a served negative). See docs/data_schema.md.
IMPRESSIONS = TableSchema(
    name="impressions",
    key="impression_id",
    time_column="served_at",
    schema=pa.schema(
        [
            ("impression_id", pa.string()),  # f"{request_id}-{position}"
            ("request_id", pa.string()),  # "rq-<32 hex>", returned to the caller
            ("user_id", pa.string()),
            ("video_id", pa.string()),
            ("served_at", TIMESTAMP),
            ("position", pa.int32()),  # 0-based slot in the answer
            ("source", pa.string()),  # item_to_item | two_tower | popular | fresh | explore
            ("score", pa.float64()),
            ("model_version", pa.string()),  # the version that ranked the item (null: no model)
            ("experiment", pa.string()),  # the experiment's id while one runs, else null
            ("arm", pa.string()),  # champion | challenger (the interleaving team that placed the item)
            ("propensity", pa.float64()),  # P(slot filled this way): 1-ε kept, ε/pool explored, 1.0 without exploration
            ("explored", pa.bool_()),
            ("fallback", pa.bool_()),
            ("surface", pa.string()),
        ]
    ),
    required=("impression_id", "request_id", "user_id", "video_id", "served_at", "position"),
    allow_empty=True,
)

TABLES: dict[str, TableSchema] = {t.name: t for t in (USERS, VIDEOS, EVENTS)}
# Order in which a day's tables must be processed: events refer to users and videos.
TABLE_ORDER: tuple[str, ...] = ("users", "videos", "events")

SURFACES = ("home", "up_next", "search", "shorts")
DEVICES = ("android", "ios", "web", "tv")
AGE_BUCKETS = ("13-17", "18-24", "25-34", "35-44", "45-54", "55+")


def table(name: str) -> TableSchema:
    """The schema of table `name`; a clear error for an unknown name."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; expected one of {sorted(TABLES)}") from None
