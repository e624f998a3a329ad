"""Feast data sources: the daily feature snapshots `recloop.features.compute_features` writes to the lake.

Each source is a folder of Hive-partitioned Parquet files, `<lake>/features/<view>/date=D/part-0.parquet`,
one snapshot per day stamped `event_timestamp = D+1 00:00 UTC`. The lake root comes from the
`RECLOOP_LAKE_URI` environment variable (set by `recloop.features.feature_store`), read when Feast
imports this module during apply; the resulting paths are stored in the registry.
"""

import os

from feast import FileSource
from feast.data_format import ParquetFormat


def _lake_uri() -> str:
    uri = os.environ.get("RECLOOP_LAKE_URI", "")
    if not uri:
        from recloop.config import Settings  # same default as the rest of recloop

        uri = Settings.from_env().lake_uri
    return uri.rstrip("/")


LAKE_URI = _lake_uri()
_S3_ENDPOINT = os.environ.get("RECLOOP_S3_ENDPOINT_URL") or None


def _snapshot_source(view: str) -> FileSource:
    return FileSource(
        name=f"{view}_source",
        path=f"{LAKE_URI}/features/{view}",
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        s3_endpoint_override=_S3_ENDPOINT if LAKE_URI.startswith("s3://") else None,
        description=f"Daily snapshots of {view} computed by recloop.features.compute_features.",
    )


user_activity_source = _snapshot_source("user_activity")
user_category_affinity_source = _snapshot_source("user_category_affinity")
video_popularity_source = _snapshot_source("video_popularity")
