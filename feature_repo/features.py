"""Feast feature views over the daily snapshots (schemas mirror recloop.features.FEATURE_SCHEMAS).

Snapshots are daily, stamped at the end of their day; a ttl of 2 days lets a training row at any time
of day D+1 see day D's snapshot (and tolerates one late day) but never an older, stale one.
"""

from datetime import timedelta

from data_sources import (
    user_activity_source,
    user_category_affinity_source,
    video_popularity_source,
)
from entities import category, user, video
from feast import FeatureView, Field
from feast.types import Float64, Int64, String

SNAPSHOT_TTL = timedelta(days=2)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=SNAPSHOT_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="impressions_1d", dtype=Int64),
        Field(name="impressions_7d", dtype=Int64),
        Field(name="impressions_28d", dtype=Int64),
        Field(name="watches_1d", dtype=Int64),
        Field(name="watches_7d", dtype=Int64),
        Field(name="watches_28d", dtype=Int64),
        Field(name="watch_s_1d", dtype=Float64),
        Field(name="watch_s_7d", dtype=Float64),
        Field(name="watch_s_28d", dtype=Float64),
        Field(name="completion_rate_28d", dtype=Float64),
        Field(name="like_rate_28d", dtype=Float64),
        Field(name="days_since_last_watch", dtype=Float64),
        Field(name="active_days_28d", dtype=Int64),
    ],
    online=True,
    source=user_activity_source,
    tags={"owner": "recloop", "cadence": "daily"},
    description="What a user watched over the last 1/7/28 days, as of the end of each day.",
)

user_category_affinity = FeatureView(
    name="user_category_affinity",
    entities=[user, category],
    ttl=SNAPSHOT_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="category", dtype=String),
        Field(name="watch_s_28d", dtype=Float64),
        Field(name="watches_28d", dtype=Int64),
        Field(name="watch_share_28d", dtype=Float64),
    ],
    online=True,
    source=user_category_affinity_source,
    tags={"owner": "recloop", "cadence": "daily"},
    description="A user's 28-day watching per video category (only categories they watched).",
)

video_popularity = FeatureView(
    name="video_popularity",
    entities=[video],
    ttl=SNAPSHOT_TTL,
    schema=[
        Field(name="video_id", dtype=String),
        Field(name="impressions_1d", dtype=Int64),
        Field(name="impressions_7d", dtype=Int64),
        Field(name="impressions_28d", dtype=Int64),
        Field(name="watches_1d", dtype=Int64),
        Field(name="watches_7d", dtype=Int64),
        Field(name="watches_28d", dtype=Int64),
        Field(name="watch_s_7d", dtype=Float64),
        Field(name="watch_s_28d", dtype=Float64),
        Field(name="watch_rate_7d", dtype=Float64),
        Field(name="completion_rate_28d", dtype=Float64),
        Field(name="like_rate_28d", dtype=Float64),
        Field(name="age_days", dtype=Float64),
        Field(name="duration_s", dtype=Float64),
    ],
    online=True,
    source=video_popularity_source,
    tags={"owner": "recloop", "cadence": "daily"},
    description="How much a video was shown and watched, its freshness and length; every uploaded video.",
)
