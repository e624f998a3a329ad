"""Feast entities of recloop: the keys features are attached to."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A viewer (USERS.user_id).",
)

video = Entity(
    name="video",
    join_keys=["video_id"],
    value_type=ValueType.STRING,
    description="A video (VIDEOS.video_id).",
)

category = Entity(
    name="category",
    join_keys=["category"],
    value_type=ValueType.STRING,
    description="A video category (VIDEOS.category).",
)
