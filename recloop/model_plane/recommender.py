"""The multi-stage recommender: candidate sources → merged candidate lists → ranker features → LambdaRank
ranker → top-k. It implements `recloop.recommender.Recommender`, so evaluation, the promotion gate and
the MLflow pyfunc model treat it like any baseline; `source_only(name)` gives each candidate source
ranked by its own score, for evaluating the sources alone.

What a user's list is built from: their rows of the history the sources were fitted on (what they
watched and liked up to the cutoff), plus `exclude` (the evaluator's, or the server's recent watches).
Users the history does not know get the popular list (and fresh uploads) minus what they watched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recloop.model_plane.features import CandidateScores, StoreFeatures, ranker_features
from recloop.model_plane.history import History
from recloop.model_plane.ranker import Ranker
from recloop.model_plane.sources import SOURCES, Fresh, ItemToItem, Popular, TwoTowerSource
from recloop.model_plane.sources.item_to_item import ItemScores

PRIMARY = "ranker"
BATCH_USERS = 512


@dataclass(frozen=True)
class CandidateConfig:
    n_item_to_item: int = 200  # per EASE score (positives, watched)
    n_two_tower: int = 100
    n_popular: int = 50
    n_fresh: int = 50
    popular_days: float | None = 28.0  # the popular list counts this many days before the cutoff (None: all)
    user_time: str = "cutoff"  # the time a user's features are taken at: "cutoff" or "median" (random splits)


@dataclass
class UserBatch:
    """The users one call ranks for: their rows of the history (-1: a user the history does not know),
    what they liked and watched (history rows, plus what serving saw since), what is never proposed to
    them, and optionally their two-tower vectors and their own popular list (serving: popular in the
    user's segment)."""

    rows: np.ndarray
    positives: sp.csr_matrix  # [users, items]
    watched: sp.csr_matrix
    excluded: sp.csr_matrix
    vectors: np.ndarray | None = None  # [users, d]; a zero row = no two-tower vector (cold start)
    popular: list[np.ndarray] | None = None
    user_ids: np.ndarray | None = None  # ids, for users the history does not know (feature store reads)


def _id_matrix(items: pd.Index, per_user: Sequence[Sequence[str]]) -> sp.csr_matrix:
    """[users, items] 1 where the user's list holds the video id (ids the index does not know dropped)."""
    lengths = [len(e) for e in per_user]
    cols = items.get_indexer(pd.Index([v for e in per_user for v in e], dtype=object))
    r = np.repeat(np.arange(len(per_user)), lengths)
    ok = cols >= 0
    return sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (r[ok], cols[ok])), shape=(len(per_user), len(items)))


def _union(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(a + b)
    out.data[:] = 1.0
    return out


@dataclass
class MultiStageRecommender:
    history: History
    item_to_item: ItemToItem | None
    two_tower: TwoTowerSource | None
    popular: Popular
    fresh: Fresh
    ranker: Ranker | None
    config: CandidateConfig = field(default_factory=CandidateConfig)
    store: StoreFeatures | None = None
    mode: str = PRIMARY
    name: str = "recloop"
    report: Any = None  # the fit's FitReport, when it was fitted in this process
    # Source-only views made by `components()` share one `_SourceLists`: every source's lists in one pass.
    shared: Any = field(default=None, repr=False, compare=False)

    is_platform = True  # recloop's own model (the evaluation harness names it in its result)

    def __post_init__(self) -> None:
        if self.mode not in (PRIMARY, *SOURCES):
            raise ValueError(f"mode must be {PRIMARY!r} or a source {SOURCES}, got {self.mode!r}")
        if self.mode == PRIMARY and self.ranker is None:
            raise ValueError("the ranker mode needs a ranker")
        n = len(self.history.items)
        self._i2i_col = np.full(n, -1, np.int64)
        if self.item_to_item is not None:
            self._i2i_col[self.item_to_item.item_rows] = np.arange(len(self.item_to_item.item_rows))
        self._item_vectors = self.two_tower.item_vectors(n) if self.two_tower is not None else None
        self._in_index = np.zeros(n, bool)
        if self.two_tower is not None:
            self._in_index[self.two_tower.item_rows[self.two_tower.item_rows >= 0]] = True

    # --- views ------------------------------------------------------------------------------------

    def source_only(self, name: str) -> "MultiStageRecommender":
        """The same fitted parts, recommending one source's candidates by that source's own score."""
        if name == "item_to_item" and self.item_to_item is None or name == "two_tower" and self.two_tower is None:
            raise ValueError(f"this recommender has no {name} source")
        return replace(self, mode=name, name=f"source:{name}", report=None, shared=None)

    def components(self, *, with_self: bool = False) -> dict[str, "MultiStageRecommender"]:
        """Each candidate source alone (a full recommender's parts, for evaluation), keyed by source;
        `with_self`: this recommender too, keyed PRIMARY. They share their work: the first of them asked
        for some users' lists computes every one's lists for those users in one pass (`recommend_modes`:
        one user batch, one EASE product and one two-tower user vector per user for all of them), the
        others are then answered from it."""
        if self.mode != PRIMARY:
            return {}
        modes = [PRIMARY, *self.sources] if with_self else list(self.sources)
        shared = _SourceLists(self, modes)
        views = {PRIMARY: replace(self, shared=shared)} if with_self else {}
        return {**views, **{s: replace(self.source_only(s), shared=shared) for s in self.sources}}

    def knows(self, user_ids: Sequence[str]) -> np.ndarray:
        """Whether each user is in the training window's users (gets personalised lists); the others get
        the cold-start list of `recommend` (popular, then fresh)."""
        return self.history.users.get_indexer(pd.Index([str(u) for u in user_ids], dtype=object)) >= 0

    @property
    def params(self) -> dict[str, Any]:
        if self.mode != PRIMARY:
            return {"source": self.mode}
        return {"sources": self.sources, "candidates": self.config.__dict__,
                "ranker_features": len(self.ranker.features) if self.ranker else 0}

    def with_new_videos(self, videos: pd.DataFrame, as_of: Any = None) -> "MultiStageRecommender":
        """This recommender with videos uploaded after its cutoff added to the catalog (`videos`: VIDEOS
        columns; known ids are skipped): the two-tower embeds them from their metadata and adds them to
        its index, so a new upload can be retrieved and ranked without retraining. Returns a new
        recommender (the index of this one's two-tower is extended in place)."""
        new = videos[~videos["video_id"].astype(str).isin(self.history.items)].drop_duplicates("video_id", keep="last")
        if new.empty:
            return self
        catalog = pd.concat([self.history.catalog, new[self.history.catalog.columns]], ignore_index=True)
        history = replace(self.history, items=pd.Index(catalog["video_id"].astype(str), dtype=object), catalog=catalog)
        two_tower = self.two_tower
        if two_tower is not None:
            from recloop.training import video_embeddings

            at = max(history.cutoff, pd.to_datetime(new["upload_time"], utc=True).max()) if as_of is None else as_of
            ids, vectors = video_embeddings(two_tower.model, new.reset_index(drop=True), at)
            two_tower.index.add(ids, vectors)
            two_tower = TwoTowerSource.from_model(two_tower.model, history, n_candidates=two_tower.n_candidates,
                                                  index=two_tower.index)
        fresh = Fresh.fit(replace(history, cutoff_us=max(history.cutoff_us, int(np.nanmax(history.upload_us)) + 1)),
                          n=len(self.fresh.rows) or self.config.n_fresh)
        return replace(self, history=history, two_tower=two_tower, fresh=fresh)

    @property
    def sources(self) -> list[str]:
        return [s for s in SOURCES if not (s == "item_to_item" and self.item_to_item is None)
                and not (s == "two_tower" and self.two_tower is None)]

    # --- candidates ---------------------------------------------------------------------------------

    def user_batch(self, rows: np.ndarray, extra_exclude: Sequence[Sequence[str]] | None = None) -> UserBatch:
        """The users at history `rows` as the history knows them, plus `extra_exclude` (video ids)."""
        h = self.history
        excluded = h.seen[rows]
        if extra_exclude and any(extra_exclude):
            excluded = _union(excluded, _id_matrix(h.items, extra_exclude))
        return UserBatch(rows=np.asarray(rows, np.int64), positives=h.positives[rows], watched=h.watched[rows],
                         excluded=excluded)

    def candidate_scores(self, batch: UserBatch, *, only: str | None = None, n_only: int = 100,
                         i2i_scores: ItemScores | None = None) -> CandidateScores:
        """Candidates of the users of `batch` (none of what it excludes) with every source's score. `only`
        restricts the lists to one source's top `n_only`. `i2i_scores`: the item-to-item scores of the
        batch's users already computed (`ItemToItem.scores`)."""
        cfg = self.config
        n_users = len(batch.rows)
        excluded = batch.excluded
        widest = int(np.diff(excluded.indptr).max()) if n_users else 0
        use = (lambda s: only is None or only == s)
        lists: list[tuple[np.ndarray, np.ndarray, str]] = []  # (user positions, item rows, source)
        if self.item_to_item is not None:
            if i2i_scores is None:
                i2i_scores = self.item_to_item.scores(batch.positives, batch.watched)
            if use("item_to_item"):
                ex = self.item_to_item.columns(excluded).nonzero()
                blank = np.diff(batch.watched.indptr) + np.diff(batch.positives.indptr) == 0  # nothing to go on
                for key in (("i2i_pos",) if only else ("i2i_pos", "i2i_watch")):
                    s = i2i_scores[key].copy()
                    s[ex] = -np.inf
                    s[blank] = -np.inf
                    lists.append((*_top_rows(s, n_only if only else cfg.n_item_to_item, self.item_to_item.item_rows),
                                  "item_to_item"))
        vectors = batch.vectors
        if self.two_tower is not None:
            if vectors is None:
                vectors = self._user_vectors(batch)
            if use("two_tower"):
                n = n_only if only else cfg.n_two_tower
                has = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)
                if len(has):
                    top, _ = self.two_tower.top(vectors[has], n + widest)
                    u, i = _first_n_allowed(top, excluded[has], n)
                    lists.append((has[u], i, "two_tower"))
        for source, part, n in (("popular", self.popular, cfg.n_popular), ("fresh", self.fresh, cfg.n_fresh)):
            n = n_only if only else n
            if not use(source):
                continue
            if source == "popular" and batch.popular is not None:
                per_user = [p[: n + widest] for p in batch.popular]
                width = max((len(p) for p in per_user), default=0)
                items = np.full((n_users, width), -1, np.int64)
                for j, p in enumerate(per_user):
                    items[j, : len(p)] = p
            elif len(part.rows):
                items = np.tile(part.rows[: n + widest], (n_users, 1))
            else:
                continue
            lists.append(_first_n_allowed(items, excluded, n) + (source,))
        return self._merge(batch, lists, i2i_scores, vectors)

    def _user_vectors(self, batch: UserBatch) -> np.ndarray:
        """The two-tower vectors of the batch's users the history knows (zero rows for the others)."""
        h = self.history
        known = batch.rows >= 0
        vectors = np.zeros((len(batch.rows), self.two_tower.index.dim), np.float32)
        if known.any():
            vectors[known] = self.two_tower.user_vectors(h.users[batch.rows[known]].tolist(), h.cutoff)
        return vectors

    def _merge(self, batch: UserBatch, lists: list[tuple[np.ndarray, np.ndarray, str]],
               i2i_scores: ItemScores | None, vectors: np.ndarray | None) -> CandidateScores:
        """The sources' lists merged per user without duplicates (the first source in SOURCES order is
        recorded), grouped by user, with every source's score of every candidate."""
        n_items = len(self.history.items)
        code = {s: j for j, s in enumerate(SOURCES)}
        users = np.concatenate([u for u, _, _ in lists]).astype(np.int64) if lists else np.zeros(0, np.int64)
        items = np.concatenate([i for _, i, _ in lists]).astype(np.int64) if lists else np.zeros(0, np.int64)
        source = np.concatenate([np.full(len(u), code[s], np.int8) for u, _, s in lists]) if lists else np.zeros(0, np.int8)
        key = users * n_items + items
        unique, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        flags = np.zeros((len(unique), len(SOURCES)), np.float32)
        flags[inverse, source] = 1.0
        # Keep each user's candidates in the order the sources proposed them (stable for ties later).
        order = np.lexsort((first, users[first]))
        keep = first[order]
        flags = flags[order]
        users, items, source = users[keep], items[keep], source[keep]
        scores: dict[str, np.ndarray] = {}
        if i2i_scores is not None:
            col = self._i2i_col[items]
            ok = col >= 0
            for name, at in i2i_scores.at(users[ok], col[ok]).items():
                v = np.full(len(items), np.nan, np.float32)
                v[ok] = at
                scores[name] = v
        if vectors is not None:
            v = np.einsum("ij,ij->i", vectors[users], self._item_vectors[items]).astype(np.float32)
            v[~self._in_index[items] | ~np.any(vectors[users] != 0, axis=1)] = np.nan
            scores["tt_score"] = v
        return CandidateScores(batch, users, items, source, flags, scores)

    # --- ranking ------------------------------------------------------------------------------------

    def score(self, cands: CandidateScores) -> np.ndarray:
        """The final score of each candidate: the ranker's, or in a source-only mode that source's own."""
        if self.mode == PRIMARY:
            x = ranker_features(self.history, cands, self.config.user_time, self.store)
            return self.ranker.score(x)
        if self.mode == "item_to_item":
            return cands.scores["i2i_pos"].astype(np.float64)
        if self.mode == "two_tower":
            return cands.scores["tt_score"].astype(np.float64)
        if self.mode == "popular":
            return self.history.item_positives[cands.item] - 1e-9 * cands.item
        return self.history.upload_us[cands.item]

    def recommend(self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None) -> list[list[str]]:
        """At most k distinct video ids per user, best first, none watched before or in `exclude[user]`."""
        if self.shared is not None:
            return self.shared.lists(self.mode, user_ids, k, exclude)
        return self.recommend_modes([self.mode], user_ids, k, exclude=exclude)[self.mode]

    def recommend_modes(self, modes: Sequence[str], user_ids: Sequence[str], k: int, *,
                        exclude: Mapping[str, set[str]] | None = None) -> dict[str, list[list[str]]]:
        """`recommend` of this recommender in each of `modes` (PRIMARY, or a source alone), in one pass
        over the users: each batch's rows, exclusions, EASE scores and two-tower vectors are computed once
        for every mode."""
        users = [str(u) for u in user_ids]
        out: dict[str, list[list[str]]] = {m: [[] for _ in users] for m in modes}
        if not users or k <= 0:
            return out
        views = {m: self if m == self.mode else replace(self, mode=m, shared=None) for m in modes}
        rows = self.history.users.get_indexer(pd.Index(users, dtype=object))
        known = np.flatnonzero(rows >= 0)
        ids = self.history.item_ids
        for start in range(0, len(known), BATCH_USERS):
            batch = known[start : start + BATCH_USERS]
            extra = [sorted(exclude.get(users[i], ())) for i in batch] if exclude else None
            user_batch = self.user_batch(rows[batch], extra)
            i2i_scores = None
            if len(modes) > 1:
                if self.item_to_item is not None:
                    i2i_scores = self.item_to_item.scores(user_batch.positives, user_batch.watched)
                if self.two_tower is not None and user_batch.vectors is None:
                    user_batch.vectors = self._user_vectors(user_batch)
            for mode, view in views.items():
                only = None if mode == PRIMARY else mode
                cands = view.candidate_scores(user_batch, only=only, n_only=max(k, 100), i2i_scores=i2i_scores)
                if not len(cands):
                    continue
                score = np.nan_to_num(view.score(cands), nan=-np.inf)
                order = np.lexsort((cands.item, -score, cands.user))
                owner, items = cands.user[order], cands.item[order]
                starts = np.searchsorted(owner, np.arange(len(batch)), side="left")
                ends = np.searchsorted(owner, np.arange(len(batch)), side="right")
                lists = out[mode]
                for u in range(len(batch)):
                    lists[batch[u]] = ids[items[starts[u] : min(ends[u], starts[u] + k)]].tolist()
        cold = np.flatnonzero(rows < 0)
        if len(cold):  # unknown users: popular, then fresh
            pool = list(dict.fromkeys(self.history.items[r] for r in (*self.popular.rows, *self.fresh.rows)))
            for i in cold:
                excluded = exclude.get(users[i], set()) if exclude else set()
                lists_i = [v for v in pool if v not in excluded][:k]
                for mode in modes:
                    out[mode][i] = list(lists_i)
        return out


class _SourceLists:
    """The lists of `rec` in each of `modes` (PRIMARY, each source alone), computed in one pass
    (`recommend_modes`) for the last (users, k, exclude) asked and answered from there: the evaluation
    asks each of them for the same users."""

    def __init__(self, rec: MultiStageRecommender, modes: Sequence[str]) -> None:
        self.rec = replace(rec, shared=None)
        self.modes = list(modes)
        self._asked: tuple[tuple[str, ...], int, Any] | None = None
        self._lists: dict[str, list[list[str]]] = {}

    def lists(self, mode: str, user_ids: Sequence[str], k: int,
              exclude: Mapping[str, set[str]] | None) -> list[list[str]]:
        users = tuple(str(u) for u in user_ids)
        asked = self._asked
        if asked is None or asked[0] != users or asked[1] != k or asked[2] is not exclude or mode not in self._lists:
            self._lists = self.rec.recommend_modes(self.modes, list(users), k, exclude=exclude)
            self._asked = (users, k, exclude)  # holds `exclude`: its identity is the key
        return [list(r) for r in self._lists[mode]]


def _top_rows(scores: np.ndarray, n: int, item_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user positions, catalog rows) of each row's top-n finite scores."""
    if not scores.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = min(n, scores.shape[1])
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    users = np.repeat(np.arange(scores.shape[0]), n)
    picked = top.ravel()
    ok = np.isfinite(scores[users, picked])
    return users[ok], item_rows[picked[ok]]


def _first_n_allowed(items: np.ndarray, excluded: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(user positions, catalog rows): per row of `items` ([users, m], -1 = none) its first n entries
    that `excluded` does not hold."""
    if not items.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    users = np.repeat(np.arange(items.shape[0]), items.shape[1])
    flat = items.ravel()
    ok = flat >= 0
    users, flat = users[ok], flat[ok]
    ex_users, ex_items = excluded.nonzero()
    width = excluded.shape[1] + 1
    bad = np.isin(users * width + flat, ex_users.astype(np.int64) * width + ex_items)
    users, flat = users[~bad], flat[~bad]
    rank = np.arange(len(users)) - np.searchsorted(users, users, side="left")
    keep = rank < n
    return users[keep], flat[keep]
