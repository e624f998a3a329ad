"""One champion version made ready to serve: the bundle's multi-stage recommender plus per-request arrays.

`ServingModel.load` runs in the background (model swap, new uploads, new feature snapshot) and does
everything that does not depend on the request once:

* the bundle is loaded with `recloop.model_plane.bundle.load_bundle` (history, EASE, two-tower + FAISS
  index, popular/fresh lists, LambdaRank ranker); videos the lake accepted after the training cutoff
  are added with `MultiStageRecommender.with_new_videos` (embedded by the video tower's metadata path,
  added to the index) — a new upload is retrievable without retraining;
* the catalog's metadata (category, creator, tags, upload time, duration) as arrays aligned with the
  catalog rows, for the business rules;
* the `video_popularity` features of the ranker (a daily snapshot) read once from Feast's online store;
* the user tower's inputs for every user the model knows, as of its training cutoff, and their vectors.

Per request the service builds a `RankRequest` (the user's vector with their activity since the cutoff,
their segment's popular videos, what not to show); `rank` then runs a batch of requests through the
same code offline evaluation measured — `MultiStageRecommender.candidate_scores` (every source, merged)
→ `recloop.model_plane.features.ranker_features` (with the user features read from Feast online, in one
call for the batch) → the LambdaRank ranker, once for the whole batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from recloop.lake import Lake
from recloop.model_plane.bundle import load_bundle
from recloop.model_plane.features import ranker_features
from recloop.model_plane.recommender import MultiStageRecommender, UserBatch
from recloop.model_plane.store import RANKING_FEATURES
from recloop.serving import lakeview
from recloop.serving.history import Recent
from recloop.serving.online import AFFINITY_COLUMNS, USER_COLUMNS, VIDEO_COLUMNS, OnlineFeatures
from recloop.serving.rerank import blocked_mask
from recloop.serving.safety import SafetyRules

# The user tower's input builder and batched forward pass: reused, not re-implemented, so that serving
# feeds the tower exactly what training did.
from recloop.training import USER_META, tower_forward, user_tower_inputs

if list(RANKING_FEATURES) != USER_COLUMNS + AFFINITY_COLUMNS + VIDEO_COLUMNS:
    raise ImportError("RANKING_FEATURES is no longer user_activity + affinity + video_popularity, in order")


@dataclass(frozen=True)
class RankRequest:
    """One request as the ranking batch needs it."""

    user_id: str
    recent: Recent
    vector: np.ndarray | None  # the two-tower vector (None: a cold-start user, or no two-tower)
    popular: np.ndarray  # catalog rows of the user's segment's popular videos, best first
    excluded: np.ndarray  # catalog rows never to show (watched, blocked, asked to exclude)
    watched: np.ndarray  # catalog rows the user watched (their recent activity included)


@dataclass(frozen=True)
class Ranked:
    rows: np.ndarray  # catalog rows of the candidates
    sources: list[str]  # the source that proposed each
    scores: np.ndarray


@dataclass(frozen=True, eq=False)
class ServingModel:
    """An immutable, fully loaded model version; the service swaps whole instances."""

    version: str
    recommender: MultiStageRecommender
    ids: np.ndarray  # video id of each catalog row
    row: dict[str, int]
    category: np.ndarray
    creator: np.ndarray
    tags: list[frozenset[str]]
    upload_us: np.ndarray  # float64, NaN when unknown
    duration_s: np.ndarray
    video_features: np.ndarray  # [videos, len(VIDEO_COLUMNS)]
    feature_snapshot: str | None
    user_row: dict[str, int]
    user_inputs: dict[str, np.ndarray] | None
    user_vectors: np.ndarray | None
    cutoff_us: int
    clock_us: int  # the newest upload known: "now" of the catalog, for freshness
    lake_videos: str | None  # newest silver/videos partition added (None: no lake)
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
        rec = load_bundle(bundle_dir)
        cutoff = rec.history.cutoff
        newest_videos = None
        if lake is not None:
            newest_videos = lakeview.newest_partition(lake, "silver/videos")
            new = lakeview.videos(lake, since=(cutoff - timedelta(days=1)).date().isoformat())
            if len(new):
                rec = rec.with_new_videos(new)
        tt = rec.two_tower
        if tt is not None and ef_search and tt.index.kind == "hnsw":
            tt.index.params["ef_search"] = int(ef_search)
        catalog = rec.history.catalog
        ids = rec.history.items.to_numpy(dtype=object)
        upload_us = rec.history.upload_us
        cutoff_us = int(rec.history.cutoff_us)
        users = rec.history.users.to_numpy(dtype=object)
        inputs = vectors = None
        if tt is not None:
            known = tt.model.users["user_id"].astype(str).to_numpy(dtype=object)
            inputs = user_tower_inputs(tt.model, known, np.full(len(known), cutoff_us, dtype=np.int64))
            with torch.no_grad():
                vectors = tower_forward(tt.model.model.user_tower, inputs, tt.model.args.out_dim)
            rows = pd.Index(known, dtype=object).get_indexer(pd.Index(users, dtype=object))
            inputs = {k: np.where(_col(rows >= 0, v), v[np.maximum(rows, 0)], 0) for k, v in inputs.items()}
            vectors = np.where((rows >= 0)[:, None], vectors[np.maximum(rows, 0)], 0).astype(np.float32)
        return cls(
            version=str(version),
            recommender=rec,
            ids=ids,
            row={v: i for i, v in enumerate(ids)},
            category=catalog["category"].fillna("unknown").astype(str).to_numpy(dtype=object),
            creator=catalog["creator_id"].fillna("unknown").astype(str).to_numpy(dtype=object),
            tags=[frozenset(t for t in str(x or "").split("|") if t) for x in catalog["tags"].fillna("")],
            upload_us=upload_us,
            duration_s=pd.to_numeric(catalog["duration_s"], errors="coerce").to_numpy(np.float64),
            video_features=online.video_features(list(ids)),
            feature_snapshot=online.snapshot(),
            user_row={u: i for i, u in enumerate(users)},
            user_inputs=inputs,
            user_vectors=vectors,
            cutoff_us=cutoff_us,
            clock_us=int(max(np.nanmax(upload_us) if len(upload_us) else cutoff_us, cutoff_us)),
            lake_videos=newest_videos,
        )

    # --- per request ------------------------------------------------------------------------------

    def knows(self, user_id: str) -> bool:
        return user_id in self.user_row

    @property
    def has_two_tower(self) -> bool:
        return self.recommender.two_tower is not None

    def user_vector(self, user_id: str, recent: Recent, context: Mapping[str, str | None]) -> np.ndarray | None:
        """The user's two-tower vector: precomputed as of the cutoff, or, with newer activity (or for a
        user the model never saw), the tower run on the cutoff inputs extended by that activity: counts
        added, positives prepended to the history, device/country/age from `context` for a new user.
        None when the model has no two-tower."""
        if self.user_inputs is None or self.user_vectors is None:
            return None
        row = self.user_row.get(user_id, -1)
        if row >= 0 and not recent:
            return self.user_vectors[row]
        tt = self.recommender.two_tower.model
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

    def rank(self, requests: Sequence[RankRequest], online: OnlineFeatures) -> tuple[list[Ranked], dict[str, float]]:
        """Candidates, features and ranker scores of a batch of requests, in one pass of the model plane's
        code; also the seconds spent per stage (`candidates`, `features`, `ranking`)."""
        t0 = time.perf_counter()
        rec, h = self.recommender, self.recommender.history
        n, n_items = len(requests), len(h.items)
        rows = np.asarray([self.user_row.get(r.user_id, -1) for r in requests], np.int64)

        def extra(per_user: list[np.ndarray]) -> sp.csr_matrix:
            lengths = [len(p) for p in per_user]
            cols = np.concatenate(per_user) if n else np.zeros(0, np.int64)
            return sp.csr_matrix((np.ones(len(cols), np.float32), (np.repeat(np.arange(n), lengths), cols)),
                                 shape=(n, n_items))

        def with_history(matrix: sp.csr_matrix, more: sp.csr_matrix) -> sp.csr_matrix:
            base = sp.csr_matrix((n, n_items), dtype=np.float32)
            if (rows >= 0).any():
                base = sp.vstack([matrix[r] if r >= 0 else sp.csr_matrix((1, n_items), dtype=np.float32) for r in rows]).tocsr()
            out = sp.csr_matrix(base + more)
            out.data[:] = 1.0
            return out

        positives = with_history(h.positives, extra([self.rows_of(r.recent.positives) for r in requests]))
        watched = with_history(h.watched, extra([r.watched for r in requests]))
        excluded = sp.csr_matrix(watched + extra([r.excluded for r in requests]))
        excluded.data[:] = 1.0
        dim = rec.two_tower.index.dim if rec.two_tower is not None else 0
        vectors = (np.stack([r.vector if r.vector is not None else np.zeros(dim, np.float32) for r in requests])
                   if rec.two_tower is not None else None)
        batch = UserBatch(rows=rows, positives=positives, watched=watched, excluded=excluded, vectors=vectors,
                          popular=[r.popular for r in requests],
                          user_ids=np.asarray([r.user_id for r in requests], dtype=object))
        cands = rec.candidate_scores(batch)
        t1 = time.perf_counter()
        store = _OnlineStore(online, self)
        x = ranker_features(h, cands, rec.config.user_time, store)
        t2 = time.perf_counter()
        scores = rec.ranker.score(x) if len(x) else np.zeros(0)
        t3 = time.perf_counter()
        frame = cands.frame
        users = frame["user"].to_numpy()
        out = []
        for i in range(n):
            mask = users == i
            out.append(Ranked(frame["item"].to_numpy()[mask], frame["source"].to_numpy()[mask].tolist(), scores[mask]))
        return out, {"candidates": t1 - t0, "features": t2 - t1 - store.seconds, "feature_store": store.seconds,
                     "ranking": t3 - t2}

    def blocked(self, rules: SafetyRules) -> np.ndarray:
        """Per catalog row: blocked by the safety list (computed once per list version)."""
        mask = self._blocked.get(rules.version)
        if mask is None:
            mask = blocked_mask(list(self.ids), self.tags, rules)
            self._blocked.clear()
            self._blocked[rules.version] = mask
        return mask


def _col(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`mask` shaped to broadcast over `values`' trailing axes."""
    return mask.reshape(-1, *([1] * (values.ndim - 1)))


class _OnlineStore:
    """The ranker's feature-store columns from Feast's online store (`OnlineFeatures`): the users'
    activity and category affinity in one read for the batch (cached per snapshot), the videos' from the
    matrix read at load. Raises `FeatureStoreUnavailable` when the store cannot be read."""

    columns = list(RANKING_FEATURES)

    def __init__(self, online: OnlineFeatures, model: ServingModel) -> None:
        self.online, self.model = online, model
        self.seconds = 0.0

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> pd.DataFrame:
        t0 = time.perf_counter()
        users = pd.unique(np.asarray(user_ids, dtype=object))
        wanted = {u: sorted(set(np.asarray(categories, dtype=object)[np.asarray(user_ids, dtype=object) == u]))
                  for u in users}
        read = self.online.user_features([(u, wanted[u]) for u in users], snapshot=self.model.feature_snapshot)
        self.seconds = time.perf_counter() - t0
        n = len(user_ids)
        out = np.full((n, len(RANKING_FEATURES)), np.nan)
        a0, v0 = len(USER_COLUMNS), len(USER_COLUMNS) + len(AFFINITY_COLUMNS)
        for u, (activity, affinity) in zip(users, read):
            mask = np.asarray(user_ids, dtype=object) == u
            out[mask, :a0] = activity
            if len(wanted[u]):
                out[mask, a0:v0] = affinity[np.searchsorted(np.asarray(wanted[u], dtype=object),
                                                            np.asarray(categories, dtype=object)[mask])]
        rows = pd.Index(self.model.ids, dtype=object).get_indexer(pd.Index(np.asarray(video_ids, dtype=object)))
        ok = rows >= 0
        out[ok, v0:] = self.model.video_features[rows[ok]]
        return pd.DataFrame(out, columns=RANKING_FEATURES)
