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
    # Columns a file may leave out (null when absent): never required by the schema check, not part of
    # `schema` (what batch files and the simulator produce), stored after its columns in silver.
    optional: tuple[pa.Field, ...] = ()

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def silver_schema(self) -> pa.Schema:
        """The validated table's schema: `schema`, then the optional columns."""
        return pa.schema([*self.schema, *self.optional])

    @property
    def silver_columns(self) -> list[str]:
        return list(self.silver_schema.names)


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
    # The answer of /v1/recommendations the event is feedback on: written by the serving feedback endpoint
    # (after the EVENTS columns of its landing files), absent from batch files. Kept out of `schema` so
    # batch deliveries, the simulator and the feedback writer keep the nine columns they have; silver/events
    # stores it (null for batch events) and served negatives carry it.
    optional=(pa.field("request_id", pa.string()),),
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

# The delivered tables (batch files, the simulator, imported histories).
TABLES: dict[str, TableSchema] = {t.name: t for t in (USERS, VIDEOS, EVENTS)}
# Order in which a day's delivered tables must be processed: events refer to users and videos.
TABLE_ORDER: tuple[str, ...] = ("users", "videos", "events")
# Tables the serving API writes into the landing zone (never delivered in batch files): processed beside
# the delivered ones, before the events they are joined with (recloop.served).
SERVED_TABLES: dict[str, TableSchema] = {IMPRESSIONS.name: IMPRESSIONS}

# The values of IMPRESSIONS.source and IMPRESSIONS.arm the data plane accepts.
IMPRESSION_SOURCES = ("item_to_item", "two_tower", "popular", "fresh", "explore")
ARMS = ("champion", "challenger")

SURFACES = ("home", "up_next", "search", "shorts")
DEVICES = ("android", "ios", "web", "tv")
AGE_BUCKETS = ("13-17", "18-24", "25-34", "35-44", "45-54", "55+")


def table(name: str) -> TableSchema:
    """The schema of table `name`; a clear error for an unknown name."""
    known = {**TABLES, **SERVED_TABLES}
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; expected one of {sorted(known)}") from None
