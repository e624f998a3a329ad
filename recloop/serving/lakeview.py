"""What serving reads from the lake's validated tables: recent events (with the positive flag), the
users' segment attributes and the videos uploaded after a model was trained.

Only `silver/*` is read: rows that failed validation never reach serving either.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa

from recloop.data.engagement import positive_mask
from recloop.data.schemas import EVENTS, USERS, VIDEOS
from recloop.lake import Lake


def _concat(lake: Lake, dataset: str, partitions: list[str], columns: list[str], schema: pa.Schema) -> pd.DataFrame:
    tables = [lake.read_partition(dataset, p).select(columns) for p in partitions]
    table = pa.concat_tables(tables) if tables else schema.empty_table().select(columns)
    return table.to_pandas()


def newest_partition(lake: Lake, dataset: str) -> str | None:
    parts = lake.partitions(dataset)
    return parts[-1] if parts else None


def videos(lake: Lake, since: str | None = None) -> pd.DataFrame:
    """Accepted videos (VIDEOS columns) of partitions >= `since` (all when None), latest row per id."""
    parts = [p for p in lake.partitions("silver/videos") if since is None or p >= since]
    df = _concat(lake, "silver/videos", parts, VIDEOS.columns, VIDEOS.schema)
    return df.drop_duplicates("video_id", keep="last").reset_index(drop=True)


def recent_events(lake: Lake, days: int) -> pd.DataFrame:
    """Events of the newest `days` days of `silver/events` that have a partition: `user_id`, `video_id`,
    `time_us` (int64), `watched` and `positive` (recloop's one positive rule, against the videos'
    accepted durations)."""
    parts = lake.partitions("silver/events")
    if parts:
        first = (date.fromisoformat(parts[-1]) - timedelta(days=days - 1)).isoformat()
        parts = [p for p in parts if p >= first]
    cols = ["user_id", "video_id", "event_time", "watched_s", "completed", "liked"]
    ev = _concat(lake, "silver/events", parts, cols, EVENTS.schema)
    duration = videos(lake).set_index("video_id")["duration_s"]
    out = pd.DataFrame(
        {
            "user_id": ev["user_id"].astype(object),
            "video_id": ev["video_id"].astype(object),
            "time_us": pd.to_datetime(ev["event_time"], utc=True).astype("datetime64[us, UTC]").astype("int64"),
            "watched": ev["watched_s"].fillna(0).to_numpy() > 0,
            "positive": positive_mask(ev, duration.reindex(ev["video_id"]).to_numpy(np.float64)),
        }
    )
    return out


def users(lake: Lake) -> pd.DataFrame:
    """Accepted users (USERS columns) of every partition, latest row per id."""
    df = _concat(lake, "silver/users", lake.partitions("silver/users"), USERS.columns, USERS.schema)
    return df.drop_duplicates("user_id", keep="last").reset_index(drop=True)
