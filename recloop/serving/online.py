"""The ranker's features from Feast's online store (SQLite embedded, Redis in production).

Per request only what changes per request is read: the user's `user_activity` row and their
`user_category_affinity` rows for the categories among the candidates, in one `get_online_features`
call. The `video_popularity` features of the whole catalog are a daily snapshot, identical for every
user until the next materialization: they are read once into an array when a model is loaded and again
when Feast records a newer materialization, so a request never reads hundreds of video rows. This is
the usual split between request-time and batch features.

The user rows read are kept in a bounded in-process cache tied to the materialized snapshot they came
from: online user features change only when a new snapshot is materialized, so within one snapshot a
cached row is exactly what Feast would return, and the cache is emptied as soon as the service sees a
newer snapshot (`ServingModel.feature_snapshot`, checked every poll). A user's second request within a
snapshot then costs no store read at all; only what is missing (a new user, a category not read
before) goes to Feast, in one call for the whole batch of requests.

Failures of the store (unreachable Redis, broken SQLite file, missing tables) surface as
`FeatureStoreUnavailable`, which the service answers with its popularity fallback. Rows already cached
keep being served while the store is down (they are the current snapshot's values).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
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


class _UserRows:
    """One user's cached rows: `user_activity` [13] and `user_category_affinity` [3] per category."""

    __slots__ = ("activity", "affinity")

    def __init__(self, activity: np.ndarray) -> None:
        self.activity = activity
        self.affinity: dict[str, np.ndarray] = {}


class OnlineFeatures:
    """Reads of one Feast feature store, serialised by a lock (the SQLite store shares one connection),
    with the per-snapshot cache of user rows described in the module docstring.

    Args:
        settings, online, project: the Feast store (`recloop.features.feature_store`).
        cache_users: the most users whose rows are kept (least recently used dropped first); 0 = no cache.
    """

    def __init__(
        self, settings: "Settings", *, online: str = "sqlite", project: str | None = None, cache_users: int = 200_000
    ) -> None:
        self.settings = settings
        self.store = feature_store(settings, project=project, online=online)
        self._lock = threading.Lock()
        self._activity_refs = _refs(USER_ACTIVITY)
        self._user_refs = self._activity_refs + _refs(USER_CATEGORY_AFFINITY)
        self.cache_users = cache_users
        self._cache: OrderedDict[str, _UserRows] = OrderedDict()
        self._cache_snapshot: str | None = None
        self._cache_lock = threading.Lock()
        self.hits = 0  # user rows served from the cache / read from Feast (for metrics)
        self.misses = 0

    def user_features(
        self, requests: Sequence[tuple[str, Sequence[str]]], snapshot: str | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (user, categories): the `user_activity` values [13] and the affinity values
        [len(categories), 3], NaN where missing. Rows not cached for `snapshot` (the materialized
        snapshot the caller's model was built on) are read in one `get_online_features` call."""
        with self._cache_lock:
            if snapshot != self._cache_snapshot:
                self._cache.clear()
                self._cache_snapshot = snapshot
            cached = [self._cached(user) for user, _ in requests]
        rows: list[dict[str, str]] = []
        wanted: list[tuple[int, str | None]] = []  # (request, category or None for the activity row)
        for i, ((user, categories), entry) in enumerate(zip(requests, cached)):
            if entry is None:
                rows.append({"user_id": user, "category": ""})
                wanted.append((i, None))
            for c in categories:
                if entry is None or c not in entry.affinity:
                    rows.append({"user_id": user, "category": c})
                    wanted.append((i, c))
        misses = sum(1 for _, c in wanted if c is None)  # users with no cached row (activity row wanted)
        self.hits += len(requests) - misses
        self.misses += misses
        if rows:
            refs = self._user_refs if misses else _refs(USER_CATEGORY_AFFINITY)
            try:
                with self._lock:
                    values = self.store.get_online_features(
                        features=refs, entity_rows=rows, full_feature_names=True
                    ).to_dict()
            except Exception as err:  # any store failure means the same thing to serving: no features now
                raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
            affinity = _matrix(values, AFFINITY_COLUMNS)
            activity = _matrix(values, USER_COLUMNS) if misses else None
            fresh: dict[int, _UserRows] = {}
            for j, (i, c) in enumerate(wanted):
                entry = cached[i] or fresh.get(i)
                if c is None:
                    assert activity is not None
                    fresh[i] = _UserRows(activity[j])
                else:  # a request's activity row, when wanted, comes before its affinity rows
                    assert entry is not None
                    entry.affinity[c] = affinity[j]
            with self._cache_lock:
                if self.cache_users and snapshot == self._cache_snapshot:
                    for i, entry in fresh.items():
                        self._cache[requests[i][0]] = entry
                    while len(self._cache) > self.cache_users:
                        self._cache.popitem(last=False)
            cached = [entry or fresh.get(i) for i, entry in enumerate(cached)]
        out = []
        for (user, categories), entry in zip(requests, cached):
            assert entry is not None
            aff = (np.stack([entry.affinity[c] for c in categories]) if len(categories)
                   else np.zeros((0, len(AFFINITY_COLUMNS))))
            out.append((entry.activity, aff))
        return out

    def _cached(self, user: str) -> _UserRows | None:
        entry = self._cache.get(user)
        if entry is not None:
            self._cache.move_to_end(user)
        return entry

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
