"""One champion version made ready to serve: the bundle's pipeline plus per-request arrays.

`ServingModel.load` runs in the background (model swap, new uploads, new feature snapshot) and does
everything that does not depend on the request once:

* the bundle is loaded with `recloop.pipeline.load_bundle` (two-tower, FAISS index, ranker); videos the
  lake accepted after the training cutoff are embedded by the video tower's metadata path and added to
  the index with `RecommendationPipeline.add_videos` — a new upload is retrievable without retraining;
* the catalog's metadata (category, creator, tags, upload time, duration) as arrays aligned with the
  index rows, for the business rules;
* the video features of the ranker (`video_popularity`, a daily snapshot) read once from the online
  store into a matrix;
* the user tower's inputs for every user the model knows, as of its training cutoff, and their vectors.

Per request (`user_vector`, `candidates`, `ranking_input`) it only indexes those arrays, runs the user
tower on one row when the user has activity newer than the cutoff and searches the index; `scores` runs
the ranker once on the candidates of a batch of requests through `RecommendationPipeline.final_score`
(the same blend offline evaluation measured).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recloop.lake import Lake
from recloop.pipeline import SOURCES, RecommendationPipeline, load_bundle
from recloop.serving import lakeview
from recloop.serving.history import Recent
from recloop.serving.online import AFFINITY_COLUMNS, USER_COLUMNS, VIDEO_COLUMNS, OnlineFeatures
from recloop.serving.rerank import blocked_mask
from recloop.serving.safety import SafetyRules

# The user tower's input builder and batched forward pass: reused, not re-implemented, so that serving
# feeds the tower exactly what training did.
from recloop.training import RANKING_FEATURES, USER_META, tower_forward, user_tower_inputs

if list(RANKING_FEATURES) != USER_COLUMNS + AFFINITY_COLUMNS + VIDEO_COLUMNS:
    raise ImportError("RANKING_FEATURES is no longer user_activity + affinity + video_popularity, in order")

SOURCE_CODE = {s: i for i, s in enumerate(SOURCES)}


@dataclass(frozen=True)
class RankingInput:
    """One request's candidates for the ranker: index rows, feature matrix (RANKING_FEATURES), u.v."""

    rows: np.ndarray
    features: np.ndarray
    retrieval: np.ndarray


@dataclass(frozen=True, eq=False)
class ServingModel:
    """An immutable, fully loaded model version; the service swaps whole instances."""

    version: str
    pipeline: RecommendationPipeline
    ids: np.ndarray  # video id of each index row
    row: dict[str, int]
    category: np.ndarray
    creator: np.ndarray
    tags: list[frozenset[str]]
    upload_us: np.ndarray  # float64, NaN when unknown
    duration_s: np.ndarray
    video_features: np.ndarray  # [videos, len(VIDEO_COLUMNS)]
    feature_snapshot: str | None
    user_row: dict[str, int]
    user_inputs: dict[str, np.ndarray]
    user_vectors: np.ndarray
    fresh_rows: np.ndarray
    cutoff_us: int
    clock_us: int  # the newest upload known: "now" of the catalog, for freshness
    lake_videos: str | None  # newest silver/videos partition added (None: no lake)
    # The ranker's inputs that do not depend on the request, computed at load: which RANKING_FEATURES
    # columns it takes, in its order, and each index row's categorical codes (its category).
    ranker_columns: np.ndarray
    ranker_codes: np.ndarray
    _blocked: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        version: str,
        online: OnlineFeatures,
        lake: Lake | None,
        *,
        ef_search: int | None = None,
    ) -> "ServingModel":
        pipe = load_bundle(bundle_dir)
        if ef_search and pipe.index.kind == "hnsw":
            pipe.index.params["ef_search"] = int(ef_search)
        tt = pipe.two_tower
        cutoff = pd.Timestamp(tt.cutoff)
        catalog = tt.videos
        newest_videos = None
        if lake is not None:
            newest_videos = lakeview.newest_partition(lake, "silver/videos")
            new = lakeview.videos(lake, since=(cutoff - timedelta(days=1)).date().isoformat())
            new = new[~new["video_id"].isin(pipe.index.ids)]
            if len(new):
                as_of = max(cutoff, pd.to_datetime(new["upload_time"], utc=True).max())
                pipe.add_videos(new, as_of=as_of)
                catalog = pd.concat([catalog, new], ignore_index=True)
        ids = np.asarray(pipe.index.ids, dtype=object)
        meta = catalog.drop_duplicates("video_id", keep="last").set_index("video_id").reindex(ids)
        upload = pd.to_datetime(meta["upload_time"], utc=True)
        upload_us = upload.astype("datetime64[us, UTC]").astype("int64").to_numpy(np.float64)
        upload_us[upload.isna().to_numpy()] = np.nan

        category = meta["category"].fillna("unknown").astype(str).to_numpy(dtype=object)
        columns, codes = _ranker_arrays(pipe, category)
        users = tt.users["user_id"].astype(str).to_numpy(dtype=object)
        cutoff_us = int(cutoff.tz_convert("UTC").value // 1000) if cutoff.tzinfo else int(cutoff.value // 1000)
        inputs = user_tower_inputs(tt, users, np.full(len(users), cutoff_us, dtype=np.int64))
        with torch.no_grad():
            vectors = tower_forward(tt.model.user_tower, inputs, tt.args.out_dim)
        return cls(
            version=str(version),
            pipeline=pipe,
            ids=ids,
            row={v: i for i, v in enumerate(ids)},
            category=category,
            creator=meta["creator_id"].fillna("unknown").astype(str).to_numpy(dtype=object),
            tags=[frozenset(t for t in str(x or "").split("|") if t) for x in meta["tags"].fillna("")],
            upload_us=upload_us,
            duration_s=pd.to_numeric(meta["duration_s"], errors="coerce").to_numpy(np.float64),
            video_features=online.video_features(list(ids)),
            feature_snapshot=online.snapshot(),
            user_row={u: i for i, u in enumerate(users)},
            user_inputs=inputs,
            user_vectors=vectors,
            fresh_rows=(fresh := pipe.index.positions(pipe.fresh))[fresh >= 0],
            cutoff_us=cutoff_us,
            clock_us=int(max(np.nanmax(upload_us) if len(upload_us) else cutoff_us, cutoff_us)),
            lake_videos=newest_videos,
            ranker_columns=columns,
            ranker_codes=codes,
        )

    # --- per request ------------------------------------------------------------------------------

    def knows(self, user_id: str) -> bool:
        return user_id in self.user_row

    def user_vector(self, user_id: str, recent: Recent, context: Mapping[str, str | None]) -> np.ndarray:
        """The user's two-tower vector: precomputed as of the cutoff, or, with newer activity (or for a
        user the model never saw), the tower run on the cutoff inputs extended by that activity: counts
        added, positives prepended to the history, device/country/age from `context` for a new user."""
        row = self.user_row.get(user_id, -1)
        if row >= 0 and not recent:
            return self.user_vectors[row]
        tt = self.pipeline.two_tower
        if row >= 0:
            x = {k: v[row : row + 1].copy() for k, v in self.user_inputs.items()}
        else:
            x = {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in self.user_inputs.items()}
            for j, col in enumerate(USER_META):
                if context.get(col):
                    x["meta"][0, j] = tt.vocabs[col].encode([context[col]])[0]
        if recent:
            added = np.array([recent.impressions, recent.watches, len(recent.positives)], np.float32)
            x["dense"] = np.log1p(np.expm1(x["dense"]) + added).astype(np.float32)
            codes = tt.vocabs["video"].encode(list(recent.positives))
            x["history"][0] = np.concatenate([codes, x["history"][0]])[: x["history"].shape[1]]
        with torch.no_grad():
            return tower_forward(tt.model.user_tower, x, tt.args.out_dim)[0]

    def rows_of(self, video_ids: Sequence[str]) -> np.ndarray:
        return np.asarray([r for v in video_ids if (r := self.row.get(v, -1)) >= 0], dtype=np.int64)

    def candidates(self, uvec: np.ndarray | None, popular_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index rows, source codes): the ANN top-`n_ann` of `uvec` (none for a cold-start user, None),
        the segment's popular videos and the freshest uploads, deduplicated, the first source winning."""
        pipe = self.pipeline
        parts, sources = [], []
        if uvec is not None:
            labels, _ = pipe.index.search_labels(uvec[None, :], pipe.n_ann)
            ann = labels[0][labels[0] >= 0]
            parts.append(ann)
            sources.append(np.full(len(ann), SOURCE_CODE["ann"], np.int8))
        for name, rows in (("popular", popular_rows[: pipe.n_popular]), ("fresh", self.fresh_rows)):
            parts.append(rows)
            sources.append(np.full(len(rows), SOURCE_CODE[name], np.int8))
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        src = np.concatenate(sources) if sources else np.zeros(0, np.int8)
        _, first = np.unique(rows, return_index=True)
        keep = np.sort(first)
        return rows[keep].astype(np.int64), src[keep]

    def ranking_input(
        self, rows: np.ndarray, uvec: np.ndarray, user: np.ndarray, affinity: np.ndarray, categories: np.ndarray
    ) -> RankingInput:
        """The ranker's input for one request's candidates: the user's features (broadcast), their
        affinity to each candidate's category (`affinity` rows aligned with `categories`), the cached
        video features, the category and the two-tower score u.v."""
        cats = self.category[rows]
        x = np.empty((len(rows), len(RANKING_FEATURES)))
        a0, v0 = len(USER_COLUMNS), len(USER_COLUMNS) + len(AFFINITY_COLUMNS)
        x[:, :a0] = user
        # `categories` is sorted and unique (np.unique of the candidates' categories).
        x[:, a0:v0] = affinity[np.searchsorted(categories, cats)] if len(rows) else 0.0
        x[:, v0:] = self.video_features[rows]
        return RankingInput(rows, x, self.pipeline.index.vectors[rows] @ uvec)

    def scores(self, inputs: Sequence[RankingInput]) -> list[np.ndarray]:
        """The pipeline's final score (ranker blend) of every candidate of every input, in one ranker
        call on arrays (`RecommendationPipeline.final_score_arrays`: no DataFrame per request)."""
        rows = np.concatenate([i.rows for i in inputs])
        if not len(rows):
            return [np.zeros(0) for _ in inputs]
        scores = self.pipeline.final_score_arrays(
            np.concatenate([i.features for i in inputs])[:, self.ranker_columns],
            np.concatenate([i.retrieval for i in inputs]),
            self.ranker_codes[rows],
        )
        return np.split(scores, np.cumsum([len(i.rows) for i in inputs])[:-1])

    def blocked(self, rules: SafetyRules) -> np.ndarray:
        """Per index row: blocked by the safety list (computed once per list version)."""
        mask = self._blocked.get(rules.version)
        if mask is None:
            mask = blocked_mask(list(self.ids), self.tags, rules)
            self._blocked.clear()
            self._blocked[rules.version] = mask
        return mask


def _ranker_arrays(pipe: RecommendationPipeline, category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the ranker's feature columns in RANKING_FEATURES, [rows, C] categorical codes)."""
    if pipe.ranker is None:
        return np.arange(len(RANKING_FEATURES)), np.zeros((len(category), 0), np.int64)
    features = pipe.ranker.features
    where = {c: i for i, c in enumerate(RANKING_FEATURES)}
    unknown = [c for c in features.feature_columns if c not in where]
    if unknown:
        raise ValueError(f"the ranker needs features serving does not read from Feast: {unknown}")
    unsupported = [c for c in features.categorical if c != "category"]
    if unsupported:
        raise ValueError(f"the ranker needs categorical inputs serving does not have: {unsupported}")
    return (
        np.asarray([where[c] for c in features.feature_columns], np.int64),
        features.encode_categorical({"category": category}, len(category)),
    )
