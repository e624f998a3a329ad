"""Feast feature services: the feature sets models are trained and served with."""

from feast import FeatureService
from features import user_activity, user_category_affinity, video_popularity

ranking_features = FeatureService(
    name="ranking_features",
    features=[user_activity, user_category_affinity, video_popularity],
    description="Everything the ranker sees for a (user, video, category) candidate.",
)

retrieval_features = FeatureService(
    name="retrieval_features",
    features=[user_activity, video_popularity],
    description="User and video features for candidate retrieval (no user x category cross).",
)
