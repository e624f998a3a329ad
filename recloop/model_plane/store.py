"""Feature-store columns for the ranker (`recloop.model_plane.features.StoreFeatures`): Feast's
`ranking_features` service (`user_activity`, `user_category_affinity`, `video_popularity`, daily
snapshots materialized by the data plane).

* `FeastHistorical`: Feast's own point-in-time `get_historical_features` — training rows at the time of
  their label period, and offline evaluation at the cutoff. A ranker row is a (user, video, category)
  triple at one time, but each view is keyed by a part of it, so one retrieval fetches the distinct
  keys (the users with the categories of their candidates, and the videos) instead of every candidate
  row, and the rows are assembled from those.
* `LakeSnapshots`: the same snapshots read from the lake without Feast (the offline source Feast reads),
  for tests and benchmarks that run without a Feast repository.

Serving reads the same columns from Feast's online store (`recloop.serving.online`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from recloop.features import ENTITY_KEYS, FEATURE_VIEWS, USER_ACTIVITY, USER_CATEGORY_AFFINITY, VIDEO_POPULARITY, feature_names

RANKING_FEATURES: tuple[str, ...] = tuple(f"{v}__{f}" for v in FEATURE_VIEWS for f in feature_names(v))
_NONE = "\x00"  # a key no entity has: the other views' half of a retrieval row


def _columns(view: str) -> list[str]:
    return [f"{view}__{f}" for f in feature_names(view)]


class _Tables:
    """Per view, its columns indexed by the view's keys (from one retrieval or one snapshot)."""

    def __init__(self, frames: dict[str, pd.DataFrame]) -> None:
        self.frames = {view: frames[view] for view in FEATURE_VIEWS}

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray) -> pd.DataFrame:
        out: dict[str, np.ndarray] = {}
        keys = {
            USER_ACTIVITY: pd.Index(np.asarray(user_ids, dtype=object)),
            USER_CATEGORY_AFFINITY: pd.MultiIndex.from_arrays([np.asarray(user_ids, dtype=object),
                                                               np.asarray(categories, dtype=object)]),
            VIDEO_POPULARITY: pd.Index(np.asarray(video_ids, dtype=object)),
        }
        for view, frame in self.frames.items():
            rows = frame.index.get_indexer(keys[view]) if len(frame) else np.full(len(user_ids), -1)
            values = frame.to_numpy(np.float64) if len(frame) else np.zeros((0, len(frame.columns)))
            take = np.full((len(rows), values.shape[1]), np.nan)
            ok = rows >= 0
            take[ok] = values[rows[ok]]
            for j, c in enumerate(frame.columns):
                out[c] = take[:, j]
        return pd.DataFrame({c: out[c] for c in RANKING_FEATURES})


def _indexed(view: str, frame: pd.DataFrame) -> pd.DataFrame:
    keys = list(ENTITY_KEYS[view])
    cols = _columns(view)
    short = dict(zip(feature_names(view), cols))
    df = frame.rename(columns={k: v for k, v in short.items() if k in frame.columns})
    df = df[[*keys, *cols]].drop_duplicates(keys, keep="last")
    for k in keys:
        df[k] = df[k].astype(object)
    return df.set_index(keys).astype(np.float64)


class FeastHistorical:
    """Feast's point-in-time historical retrieval of the `ranking_features` service."""

    columns: list[str] = list(RANKING_FEATURES)

    def __init__(self, settings: Any, *, project: str | None = None) -> None:
        self.settings = settings
        self.project = project
        self._store: Any = None
        self._cache: dict[int, tuple[set, set, _Tables]] = {}

    def _retrieve(self, pairs: pd.DataFrame, videos: np.ndarray, at_us: int) -> _Tables:
        from recloop.features import feature_store, training_set

        if self._store is None:
            self._store = feature_store(self.settings, project=self.project)
        at = pd.Timestamp(at_us * 1000, tz="UTC")
        entity = pd.concat([
            pd.DataFrame({"user_id": pairs["user_id"].to_numpy(dtype=object), "video_id": _NONE,
                          "category": pairs["category"].to_numpy(dtype=object)}),
            pd.DataFrame({"user_id": _NONE, "video_id": np.asarray(videos, dtype=object), "category": _NONE}),
        ], ignore_index=True)
        entity["event_timestamp"] = at
        got = training_set(self.settings, entity, project=self.project, store=self._store)
        user_rows = got.iloc[: len(pairs)]
        video_rows = got.iloc[len(pairs):]
        return _Tables({
            USER_ACTIVITY: _indexed(USER_ACTIVITY, user_rows),
            USER_CATEGORY_AFFINITY: _indexed(USER_CATEGORY_AFFINITY, user_rows),
            VIDEO_POPULARITY: _indexed(VIDEO_POPULARITY, video_rows),
        })

    def prefetch(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> None:
        """One retrieval for everything the coming lookups at `at_us` will ask (all users of a fold with
        every category, all videos): lookups then read memory."""
        pairs = pd.MultiIndex.from_product([pd.unique(np.asarray(user_ids, dtype=object)),
                                            pd.unique(np.asarray(categories, dtype=object))],
                                           names=["user_id", "category"]).to_frame(index=False)
        videos = pd.unique(np.asarray(video_ids, dtype=object))
        self._cache[int(at_us)] = (set(pairs["user_id"]), set(videos), self._retrieve(pairs, videos, at_us))

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> pd.DataFrame:
        cached = self._cache.get(int(at_us))
        if cached is None or not (set(pd.unique(user_ids)) <= cached[0] and set(pd.unique(video_ids)) <= cached[1]):
            pairs = pd.DataFrame({"user_id": user_ids, "category": categories}).astype(object).drop_duplicates()
            tables = self._retrieve(pairs, pd.unique(np.asarray(video_ids, dtype=object)), at_us)
        else:
            tables = cached[2]
        return tables.lookup(user_ids, video_ids, categories)


class LakeSnapshots:
    """The snapshots of the lake's `features/<view>` datasets: at time t, per view, the snapshot of the
    day before t's day (or the one before that: the views' 2-day ttl), as Feast's retrieval returns."""

    columns: list[str] = list(RANKING_FEATURES)

    def __init__(self, lake: Any) -> None:
        self.lake = lake
        self._cache: dict[str, _Tables] = {}

    def tables(self, at_us: int) -> _Tables:
        from recloop.features import feature_dataset

        day = (pd.Timestamp(at_us * 1000, tz="UTC").normalize() - timedelta(days=1)).date()
        key = day.isoformat()
        if key not in self._cache:
            frames = {}
            for view in FEATURE_VIEWS:
                frame = None
                for back in (0, 1):
                    p = (day - timedelta(days=back)).isoformat()
                    if self.lake.has_partition(feature_dataset(view), p):
                        frame = self.lake.read_partition(feature_dataset(view), p).to_pandas()
                        break
                if frame is None:
                    frame = pd.DataFrame({**{k: pd.Series(dtype=object) for k in ENTITY_KEYS[view]},
                                          **{c: pd.Series(dtype=float) for c in feature_names(view)}})
                frames[view] = _indexed(view, frame)
            self._cache[key] = _Tables(frames)
        return self._cache[key]

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> pd.DataFrame:
        return self.tables(at_us).lookup(user_ids, video_ids, categories)
