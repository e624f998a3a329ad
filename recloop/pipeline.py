"""The reference recommender: two-tower retrieval + ANN + popular/fresh candidates + multi-task ranker.

`RecommendationPipeline.recommend(user_ids, k, exclude=...)`:

1. candidates per user: the ANN top-`n_ann` (200) of the user's two-tower embedding, the `n_popular`
   (50) videos with the most recent positives in the training window, the `n_fresh` (50) newest uploads;
   merged without duplicates (the first source wins: ann, popular, fresh) and tagged by source;
2. excluded (already seen) videos removed;
3. the ranker scores every remaining (user, video) in one batch, with features looked up from an offline
   feature provider (`OfflineFeatures`, named like Feast's `<view>__<feature>`) and the two-tower score;
4. top-k per user.

The final score is a documented blend (see `RecommendationPipeline.final_score`): the log of the ranker's
expected completed watch time plus `retrieval_weight` (0.5) times the two-tower logit (u.v / temperature).
The ranker is trained on impressions and unshown retrieval candidates (`training.retrieval_negatives`),
so it estimates engagement among the candidates it will rank; the two-tower,
trained with a softmax over the catalog with log-Q correction, estimates which videos a user engages
with at all. The blend keeps both (retrieval_weight=0 is the pure ranker). On simulated data (3 seeds,
Recall@10 on a held-out day) weights 0.5-1 beat both the pure ranker and retrieval alone.

`retrieval_only()` gives the same pipeline ranking the ANN candidates by dot product alone, so that
evaluation can report retrieval on its own. `save_bundle` / `load_bundle` persist everything as
state_dicts, JSON, Parquet/NPY and FAISS files.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from recloop.features import (
    ENTITY_KEYS,
    FEATURE_VIEWS,
    USER_ACTIVITY,
    USER_CATEGORY_AFFINITY,
    VIDEO_POPULARITY,
    feature_dataset,
    feature_names,
)
from recloop.index import AnnIndex
from recloop.lake import Lake
from recloop.training import (
    RANKING_FEATURES,
    RETRIEVAL_SCORE,
    RankerResult,
    TwoTowerResult,
    load_ranker,
    load_two_tower,
    save_ranker,
    save_two_tower,
    user_embeddings,
    video_embeddings,
)

BUNDLE_FORMAT = 1
SOURCES = ("ann", "popular", "fresh")
DEFAULT_RETRIEVAL_WEIGHT = 0.5


# --------------------------------------------------------------------------------------------------
# Offline features
# --------------------------------------------------------------------------------------------------


def _prefixed(view: str, frame: pd.DataFrame | pa.Table | None) -> pd.DataFrame:
    """`frame` indexed by the view's keys with columns `<view>__<feature>` (empty frame for None)."""
    keys = list(ENTITY_KEYS[view])
    names = feature_names(view)
    full = [f"{view}__{n}" for n in names]
    if frame is None:
        columns = {k: pd.Series(dtype=object) for k in keys} | {c: pd.Series(dtype=float) for c in full}
        empty = pd.DataFrame(columns)
        return empty.set_index(keys)
    df = frame.to_pandas() if isinstance(frame, pa.Table) else frame
    cols = {}
    for n, c in zip(names, full):
        cols[c] = df[c] if c in df.columns else df[n]
    out = pd.DataFrame({**{k: df[k].astype(object) for k in keys}, **cols})
    return out.drop_duplicates(keys, keep="last").set_index(keys)


class OfflineFeatures:
    """The ranker's features for (user, video, category) rows from one daily snapshot per view.

    Columns are Feast's full names `<view>__<feature>` (the `ranking_features` service), so training
    (Feast historical retrieval) and offline evaluation use the same columns. Missing entities give NaN.
    """

    def __init__(
        self,
        user_activity: pd.DataFrame,
        user_category_affinity: pd.DataFrame,
        video_popularity: pd.DataFrame,
        partition: str | None = None,
    ) -> None:
        self.frames = {
            USER_ACTIVITY: user_activity,
            USER_CATEGORY_AFFINITY: user_category_affinity,
            VIDEO_POPULARITY: video_popularity,
        }
        self.partition = partition

    @classmethod
    def from_frames(
        cls,
        user_activity: pd.DataFrame | pa.Table | None = None,
        user_category_affinity: pd.DataFrame | pa.Table | None = None,
        video_popularity: pd.DataFrame | pa.Table | None = None,
        partition: str | None = None,
    ) -> "OfflineFeatures":
        """From snapshot frames with the view's key columns and features under their short names (as in
        `FEATURE_SCHEMAS`) or full `<view>__<feature>` names. None = no rows for that view."""
        return cls(
            _prefixed(USER_ACTIVITY, user_activity),
            _prefixed(USER_CATEGORY_AFFINITY, user_category_affinity),
            _prefixed(VIDEO_POPULARITY, video_popularity),
            partition,
        )

    @classmethod
    def from_lake(cls, lake: Lake, partition: str, fallback_days: int = 0) -> "OfflineFeatures":
        """The snapshot `features/<view>/date=<partition>` of each view. With `fallback_days` > 0, a view
        whose partition is missing uses its newest snapshot up to that many days earlier (as Feast's ttl
        does); a view with none is empty (all NaN) with a warning."""
        frames: dict[str, pd.DataFrame | None] = {}
        day = date.fromisoformat(partition)
        for view in FEATURE_VIEWS:
            frames[view] = None
            for back in range(fallback_days + 1):
                p = (day - timedelta(days=back)).isoformat()
                if lake.has_partition(feature_dataset(view), p):
                    frames[view] = lake.read_partition(feature_dataset(view), p).to_pandas()
                    break
            if frames[view] is None:
                message = f"no {view} snapshot for {partition} (fallback {fallback_days} days)"
                warnings.warn(message, stacklevel=2)
        return cls.from_frames(
            frames[USER_ACTIVITY], frames[USER_CATEGORY_AFFINITY], frames[VIDEO_POPULARITY], partition
        )

    @property
    def columns(self) -> list[str]:
        return list(RANKING_FEATURES)

    def lookup(
        self, user_ids: Sequence[str], video_ids: Sequence[str], categories: Sequence[str | None]
    ) -> pd.DataFrame:
        """One row per (user, video, category), columns `RANKING_FEATURES` in order, NaN when missing."""
        users = pd.Index(np.asarray(user_ids, dtype=object), dtype=object)
        videos = pd.Index(np.asarray(video_ids, dtype=object), dtype=object)
        cats = np.asarray(categories, dtype=object)
        out: dict[str, np.ndarray] = {}
        for view, frame in self.frames.items():
            if view == USER_CATEGORY_AFFINITY:
                query = pd.MultiIndex.from_arrays([users, pd.Index(cats, dtype=object)])
                rows = frame.index.get_indexer(query) if len(frame) else np.full(len(users), -1)
            elif view == USER_ACTIVITY:
                rows = frame.index.get_indexer(users) if len(frame) else np.full(len(users), -1)
            else:
                rows = frame.index.get_indexer(videos) if len(frame) else np.full(len(videos), -1)
            values = frame.to_numpy(dtype=np.float64)
            take = np.full((len(rows), values.shape[1]), np.nan)
            ok = rows >= 0
            take[ok] = values[rows[ok]]
            for i, c in enumerate(frame.columns):
                out[c] = take[:, i]
        return pd.DataFrame({c: out[c] for c in RANKING_FEATURES})


def point_in_time_features(
    lake: Lake, entity_df: pd.DataFrame, time_column: str = "event_time"
) -> pd.DataFrame:
    """`entity_df` (`user_id`, `video_id`, `category`, a time column) with the ranking features a row at
    time t could see: per view, the snapshot of the day before t's day (stamped at t's day's 00:00 UTC),
    or the one before that when it is missing: what Feast's historical retrieval with the views' 2-day
    ttl returns, computed from the lake without Feast (tests, benchmarks, offline evaluation)."""
    t = pd.to_datetime(entity_df[time_column], utc=True)
    day = t.dt.strftime("%Y-%m-%d").to_numpy()
    parts = []
    for d in sorted(set(day)):
        rows = np.flatnonzero(day == d)
        prev = (date.fromisoformat(d) - timedelta(days=1)).isoformat()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feats = OfflineFeatures.from_lake(lake, prev, fallback_days=1)
        sub = entity_df.iloc[rows]
        f = feats.lookup(sub["user_id"].to_numpy(), sub["video_id"].to_numpy(), sub["category"].to_numpy())
        f.index = rows
        parts.append(f)
    feats_all = pd.concat(parts).sort_index() if parts else pd.DataFrame(columns=list(RANKING_FEATURES))
    out = entity_df.reset_index(drop=True).copy()
    for c in RANKING_FEATURES:
        out[c] = feats_all[c].to_numpy() if len(out) else np.zeros(0)
    return out


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


class RecommendationPipeline:
    """Two-tower retrieval + popular/fresh candidates + ranker, as a `Recommender`."""

    def __init__(
        self,
        two_tower: TwoTowerResult,
        index: AnnIndex,
        ranker: RankerResult | None,
        popular: Sequence[str],
        features: OfflineFeatures | None = None,
        *,
        mode: str = "ranker",
        n_ann: int = 200,
        n_popular: int = 50,
        n_fresh: int = 50,
        retrieval_weight: float = DEFAULT_RETRIEVAL_WEIGHT,
        as_of: Any = None,
        name: str | None = None,
    ) -> None:
        if mode not in ("ranker", "retrieval"):
            raise ValueError(f"mode must be 'ranker' or 'retrieval', got {mode!r}")
        if mode == "ranker" and ranker is None:
            raise ValueError("mode='ranker' needs a ranker (use mode='retrieval' without one)")
        self.two_tower = two_tower
        self.index = index
        self.ranker = ranker
        self.popular = [v for v in map(str, popular)][:n_popular]
        self.features = features
        self.mode = mode
        self.n_ann, self.n_popular, self.n_fresh = n_ann, n_popular, n_fresh
        self.retrieval_weight = retrieval_weight
        self.as_of = pd.Timestamp(two_tower.cutoff if as_of is None else as_of)
        self.name = name or ("two_tower_ranker" if mode == "ranker" else "two_tower_retrieval")
        self.catalog = two_tower.videos[["video_id", "category", "upload_time"]].reset_index(drop=True)
        self._refresh_catalog()

    def _refresh_catalog(self) -> None:
        cat = self.catalog.drop_duplicates("video_id", keep="last")
        cat = cat[cat["video_id"].isin(self.index.ids)]
        up = pd.to_datetime(cat["upload_time"], utc=True)
        cat = cat[(up <= self.as_of).to_numpy()]
        self.catalog = cat.reset_index(drop=True)
        newest = self.catalog.assign(_t=pd.to_datetime(self.catalog["upload_time"], utc=True))
        newest = newest.sort_values(["_t", "video_id"], ascending=[False, True])
        self.fresh = newest["video_id"].head(self.n_fresh).tolist()
        self._category = pd.Series(
            self.catalog["category"].to_numpy(), index=self.catalog["video_id"].to_numpy()
        )

    def retrieval_only(self) -> "RecommendationPipeline":
        """The same components ranking ANN candidates by the two-tower dot product alone."""
        return RecommendationPipeline(
            self.two_tower, self.index, self.ranker, self.popular, self.features, mode="retrieval",
            n_ann=self.n_ann, n_popular=self.n_popular, n_fresh=self.n_fresh,
            retrieval_weight=self.retrieval_weight, as_of=self.as_of,
        )

    def add_videos(self, videos: pd.DataFrame, as_of: Any = None) -> int:
        """Embed new videos with the video tower (metadata path for unseen ids) and add them to the index
        and the catalog, without retraining. Returns how many were added."""
        new = videos[~videos["video_id"].astype(str).isin(self.index.ids)].drop_duplicates("video_id")
        if new.empty:
            return 0
        if as_of is not None:
            self.as_of = max(self.as_of, pd.Timestamp(as_of))
        ids, vecs = video_embeddings(self.two_tower, new, self.as_of)
        self.index.add(ids, vecs)
        added = new[["video_id", "category", "upload_time"]]
        self.catalog = pd.concat([self.catalog, added], ignore_index=True)
        self._refresh_catalog()
        return len(ids)

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        return user_embeddings(self.two_tower, user_ids, self.as_of)

    def candidates(
        self, user_ids: Sequence[str], exclude: Mapping[str, set[str]] | None = None, n_ann: int | None = None
    ) -> pd.DataFrame:
        """Long frame of candidates: `user_pos, user_id, video_id, source, retrieval_score` (excluded
        videos removed). In retrieval mode only ANN candidates, enough of them (`n_ann`, default
        `self.n_ann`) to leave that many after exclusion where the catalog allows."""
        users = np.asarray([str(u) for u in user_ids], dtype=object)
        n = len(users)
        uvec = self.user_vectors(users)
        exclude = exclude or {}
        n_search = self.n_ann if n_ann is None else n_ann
        need = np.full(n, n_search, dtype=np.int64)
        if self.mode == "retrieval":
            # Room for each user's exclusions, rounded up to a power of two so that users are searched
            # in a few buckets: a heavy user with many exclusions does not widen everyone's search.
            need += np.fromiter((len(exclude.get(u, ())) for u in users), dtype=np.int64, count=n)
            need = 2 ** np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64)
        size = np.minimum(need, len(self.index))
        ids = np.asarray(self.index.ids, dtype=object)
        parts = []
        for kk in np.unique(size):
            rows = np.flatnonzero(size == kk)
            labels, scores = self.index.search_labels(uvec[rows], int(kk))
            ok = labels.ravel() >= 0
            parts.append(
                pd.DataFrame(
                    {
                        "user_pos": np.repeat(rows, labels.shape[1])[ok],
                        "video_id": ids[labels.ravel()[ok]],
                        "source": "ann",
                        RETRIEVAL_SCORE: scores.ravel()[ok].astype(np.float32),
                    }
                )
            )
        ann = pd.concat(parts, ignore_index=True)
        ann = ann.sort_values(["user_pos", RETRIEVAL_SCORE], ascending=[True, False], kind="stable")
        frames = [ann]
        if self.mode == "ranker":
            for source, vids in (("popular", self.popular), ("fresh", self.fresh)):
                vids = [v for v in vids if v in self.index]
                if vids:
                    frames.append(
                        pd.DataFrame(
                            {
                                "user_pos": np.repeat(np.arange(n), len(vids)),
                                "video_id": np.tile(np.asarray(vids, dtype=object), n),
                                "source": source,
                                RETRIEVAL_SCORE: np.float32(np.nan),
                            }
                        )
                    )
        frames = [f for f in frames if len(f)] or [ann]
        cand = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        cand = cand.drop_duplicates(["user_pos", "video_id"], keep="first")
        missing = cand[RETRIEVAL_SCORE].isna().to_numpy()
        if missing.any():
            sub = cand[missing]
            v = self.index.vectors_for(sub["video_id"].to_numpy())
            cand.loc[missing, RETRIEVAL_SCORE] = np.einsum("ij,ij->i", uvec[sub["user_pos"].to_numpy()], v)
        if exclude:
            sets = [exclude.get(u, ()) for u in users]
            lens = np.fromiter((len(x) for x in sets), dtype=np.int64, count=n)
            if lens.sum():
                videos = np.fromiter(itertools.chain.from_iterable(sets), dtype=object, count=int(lens.sum()))
                excluded = pd.MultiIndex.from_arrays([np.repeat(np.arange(n), lens), videos])
                key = pd.MultiIndex.from_arrays([cand["user_pos"].to_numpy(), cand["video_id"].to_numpy()])
                cand = cand[~key.isin(excluded)]
        cand = cand.reset_index(drop=True)
        cand.insert(1, "user_id", users[cand["user_pos"].to_numpy()])
        return cand

    def ranking_frame(self, cand: pd.DataFrame) -> pd.DataFrame:
        """Candidates with `category` and the ranker's feature columns (NaN without a feature provider)."""
        df = cand.copy()
        df["category"] = self._category.reindex(df["video_id"].to_numpy()).to_numpy()
        if self.features is not None:
            feats = self.features.lookup(
                df["user_id"].to_numpy(), df["video_id"].to_numpy(), df["category"].to_numpy()
            )
        else:
            feats = pd.DataFrame(np.nan, index=range(len(df)), columns=list(RANKING_FEATURES))
        for c in feats.columns:
            df[c] = feats[c].to_numpy()
        return df

    def final_score(self, df: pd.DataFrame) -> np.ndarray:
        """The ranking score of each candidate row.

        retrieval mode: the two-tower dot product u.v.
        ranker mode: log(P(completed) x predicted watch seconds + 1e-3) + retrieval_weight x u.v / T,
        with T the two-tower temperature (so the second term is its softmax logit).
        """
        retrieval = df[RETRIEVAL_SCORE].to_numpy(dtype=np.float64)
        if self.mode == "retrieval":
            return retrieval
        assert self.ranker is not None
        return self._blend(self.ranker.score(df), retrieval)

    def final_score_arrays(self, features: np.ndarray, retrieval: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """`final_score` without a DataFrame (the serving path): `features` [n, ranker feature columns]
        in `self.ranker.feature_columns` order, `retrieval` [n] = u.v, `codes` the ranker's categorical
        codes (`self.ranker.features.encode_categorical`)."""
        retrieval = np.asarray(retrieval, np.float64)
        if self.mode == "retrieval":
            return retrieval
        assert self.ranker is not None
        return self._blend(self.ranker.score_arrays(features, retrieval, codes), retrieval)

    def _blend(self, expected_watch: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
        s = np.log(expected_watch.astype(np.float64) + 1e-3)
        if self.retrieval_weight:
            s = s + self.retrieval_weight * retrieval / self.two_tower.config.temperature
        return s

    def scored_candidates(
        self, user_ids: Sequence[str], exclude: Mapping[str, set[str]] | None = None, n_ann: int | None = None
    ) -> pd.DataFrame:
        """All candidates of `user_ids` with their features and `score` (for inspection and evaluation)."""
        cand = self.candidates(user_ids, exclude, n_ann)
        df = self.ranking_frame(cand) if self.mode == "ranker" else cand
        df["score"] = self.final_score(df) if len(df) else np.zeros(0)
        return df

    def recommend(
        self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None
    ) -> list[list[str]]:
        """At most k distinct video ids per user, best first, none of them in `exclude[user]`."""
        users = [str(u) for u in user_ids]
        if not users or k <= 0:
            return [[] for _ in users]
        # Retrieval mode ranks by the ANN score itself: k (+ exclusions) neighbours are enough.
        df = self.scored_candidates(users, exclude, n_ann=k if self.mode == "retrieval" else None)
        df = df.sort_values(["user_pos", "score", "video_id"], ascending=[True, False, True], kind="stable")
        top = df.groupby("user_pos", sort=True).head(k)
        lists = top.groupby("user_pos")["video_id"].agg(list)
        return [list(lists.get(i, [])) for i in range(len(users))]


# --------------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------------


def save_bundle(
    directory: str | Path,
    two_tower: TwoTowerResult,
    index: AnnIndex,
    ranker: RankerResult | None,
    popularity: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    n_ann: int = 200,
    n_popular: int = 50,
    n_fresh: int = 50,
    retrieval_weight: float = DEFAULT_RETRIEVAL_WEIGHT,
) -> Path:
    """Write a deployable bundle: `retrieval/` (two-tower), `index/` (FAISS), `ranker/` and `bundle.json`
    (contents, feature list, training window, popular videos, candidate settings, `metadata`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_two_tower(two_tower, d / "retrieval")
    index.save(d / "index")
    if ranker is not None:
        save_ranker(ranker, d / "ranker")
    manifest = {
        "format_version": BUNDLE_FORMAT,
        "holds": {
            "retrieval": "two_tower",
            "index": {"kind": index.kind, "size": len(index), "dim": index.dim, "params": index.params},
            "ranker": ranker is not None,
        },
        "feature_columns": list(ranker.feature_columns) if ranker is not None else [],
        "uses_retrieval_score": bool(ranker.features.use_retrieval) if ranker is not None else False,
        "training_window": {"partitions": two_tower.partitions, "cutoff": two_tower.cutoff.isoformat()},
        "popular": [str(v) for v in popularity],
        "candidates": {"n_ann": n_ann, "n_popular": n_popular, "n_fresh": n_fresh},
        "retrieval_weight": retrieval_weight,
        "metadata": dict(metadata or {}),
    }
    (d / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return d


def load_bundle(
    directory: str | Path,
    *,
    features: OfflineFeatures | None = None,
    lake: Lake | None = None,
    features_partition: str | None = None,
    mode: str | None = None,
) -> RecommendationPipeline:
    """The pipeline saved by `save_bundle`. Features: `features` if given, else the lake's snapshot of
    `features_partition` (default: the last training partition) when a `lake` is given, else none."""
    d = Path(directory)
    manifest = json.loads((d / "bundle.json").read_text())
    two_tower = load_two_tower(d / "retrieval")
    index = AnnIndex.load(d / "index")
    ranker = load_ranker(d / "ranker") if manifest["holds"]["ranker"] else None
    if features is None and lake is not None:
        partitions = manifest["training_window"]["partitions"]
        partition = features_partition or (partitions[-1] if partitions else None)
        if partition:
            features = OfflineFeatures.from_lake(lake, partition, fallback_days=1)
    c = manifest["candidates"]
    return RecommendationPipeline(
        two_tower, index, ranker, manifest["popular"], features,
        mode=mode or ("ranker" if ranker is not None else "retrieval"),
        n_ann=c["n_ann"], n_popular=c["n_popular"], n_fresh=c["n_fresh"],
        retrieval_weight=manifest.get("retrieval_weight", DEFAULT_RETRIEVAL_WEIGHT),
    )


def sanity(pipeline: RecommendationPipeline, users: Sequence[str], k: int = 10) -> dict[str, Any]:
    """Cheap checks before serving: all weights finite, how many users get the single most common
    top-k (1.0 = the same list for everyone, a degenerate model), how many distinct items are shown."""
    params = list(pipeline.two_tower.model.parameters())
    if pipeline.ranker is not None:
        params += list(pipeline.ranker.model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    recs = pipeline.recommend(list(users), k)
    counts = Counter(tuple(r) for r in recs)
    top, n_top = counts.most_common(1)[0] if counts else ((), 0)
    distinct = {v for r in recs for v in r}
    return {
        "weights_finite": finite,
        "users": len(recs),
        "k": k,
        "share_same_top_k": n_top / len(recs) if recs else float("nan"),
        "most_common_top_k": list(top),
        "distinct_items": len(distinct),
        "catalog_coverage": len(distinct) / max(len(pipeline.index), 1),
        "short_lists": sum(len(r) < k for r in recs),
    }
