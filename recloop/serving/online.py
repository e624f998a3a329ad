"""The ranker's features from Feast's online store (SQLite embedded, Redis in production).

Per request only what changes per request is read: the user's `user_activity` row and their
`user_category_affinity` rows for the categories among the candidates, in one `get_online_features`
call. The `video_popularity` features of the whole catalog are a daily snapshot, identical for every
user until the next materialization: they are read once into an array when a model is loaded and again
when Feast records a newer materialization, so a request never reads hundreds of video rows. This is
the usual split between request-time and batch features.

Failures of the store (unreachable Redis, broken SQLite file, missing tables) surface as
`FeatureStoreUnavailable`, which the service answers with its popularity fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from recloop.features import (
    USER_ACTIVITY,
    USER_CATEGORY_AFFINITY,
    VIDEO_POPULARITY,
    feature_freshness,
    feature_names,
    feature_store,
)

if TYPE_CHECKING:
    from recloop.config import Settings


class FeatureStoreUnavailable(RuntimeError):
    """The online store could not be read."""


def _full(view: str) -> list[str]:
    return [f"{view}__{f}" for f in feature_names(view)]


def _refs(view: str) -> list[str]:
    return [f"{view}:{f}" for f in feature_names(view)]


USER_COLUMNS = _full(USER_ACTIVITY)
AFFINITY_COLUMNS = _full(USER_CATEGORY_AFFINITY)
VIDEO_COLUMNS = _full(VIDEO_POPULARITY)


def _matrix(values: dict[str, list], columns: list[str]) -> np.ndarray:
    """Feast's `to_dict()` columns as a float matrix (None → NaN)."""
    if not columns:
        return np.zeros((0, 0))
    return np.column_stack([np.asarray(values[c], dtype=np.float64) for c in columns])


class OnlineFeatures:
    """Reads of one Feast feature store, serialised by a lock (the SQLite store shares one connection)."""

    def __init__(self, settings: "Settings", *, online: str = "sqlite", project: str | None = None) -> None:
        self.settings = settings
        self.store = feature_store(settings, project=project, online=online)
        self._lock = threading.Lock()
        self._user_refs = _refs(USER_ACTIVITY) + _refs(USER_CATEGORY_AFFINITY)

    def user_features(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (user, categories): the `user_activity` values [13] and the affinity values
        [len(categories), 3], NaN where missing; all users in one `get_online_features` call."""
        rows: list[dict[str, str]] = []
        spans = []
        for user, categories in requests:
            start = len(rows)
            rows.extend({"user_id": user, "category": c} for c in categories or [""])
            spans.append((start, len(categories)))
        try:
            with self._lock:
                values = self.store.get_online_features(
                    features=self._user_refs, entity_rows=rows, full_feature_names=True
                ).to_dict()
        except Exception as err:  # any store failure means the same thing to serving: no features now
            raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
        user, affinity = _matrix(values, USER_COLUMNS), _matrix(values, AFFINITY_COLUMNS)
        return [(user[start], affinity[start : start + n]) for start, n in spans]

    def video_features(self, video_ids: Sequence[str], chunk: int = 10_000) -> np.ndarray:
        """`video_popularity` values [len(video_ids), 13] of the current snapshot (NaN where missing)."""
        refs = _refs(VIDEO_POPULARITY)
        parts = [np.zeros((0, len(VIDEO_COLUMNS)))]
        try:
            for s in range(0, len(video_ids), chunk):
                rows = [{"video_id": v} for v in video_ids[s : s + chunk]]
                with self._lock:
                    values = self.store.get_online_features(
                        features=refs, entity_rows=rows, full_feature_names=True
                    ).to_dict()
                parts.append(_matrix(values, VIDEO_COLUMNS))
        except Exception as err:
            raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
        return np.concatenate(parts)

    def snapshot(self) -> str | None:
        """The newest `video_popularity` snapshot materialized online (ISO time; None if none was): when it
        changes, the cached video features are stale."""
        try:
            fresh = feature_freshness(self.settings, store=self.store)
        except Exception as err:
            raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
        return fresh["views"][VIDEO_POPULARITY]["newest_snapshot"]

    def refresh_registry(self) -> None:
        """Re-read Feast's registry in the background, so that a request never pays the refresh Feast
        otherwise does synchronously when its registry cache expires (Feast's own advice)."""
        self.store.refresh_registry()
