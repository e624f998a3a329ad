"""Offline evaluation of recommenders: metrics, baselines, splits and a harness that anyone can re-run on
their own split of their own files.

The protocol (documented in docs/evaluation.md):

* an **interaction** is a positive engagement -- a watch (``watched_s > 0``) that was completed, liked or
  lasted at least half of the video's duration; for ratings files, a rating >= 4;
* every recommender implements :class:`recloop.recommender.Recommender` and ranks the **whole catalogue**
  (no sampled negatives);
* the videos a user already had a positive with in the training data are **excluded** from that user's
  recommendations (``exclude=`` is passed to every recommender) and removed from their relevant set;
* relevant items of a user are their test positives; users without any are skipped, and test users who
  are unknown in the training data (cold users) are counted and skipped.

Only numpy / pandas / scipy / implicit are used; metrics are vectorised over users.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from recloop.data.engagement import positive_mask
from recloop.recommender import Recommender

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
MAIN_K = 10
POSITIVE_RATING = 4.0  # ratings files: rating >= 4 is a positive (as recloop.data.movielens maps them)
MOVIELENS_DURATION_S = 6000.0  # recloop.data.movielens.DURATION_S
UNKNOWN_CATEGORY = "unknown"
INTERACTION_COLUMNS = ("user_id", "video_id", "event_time")
ACCURACY_METRICS = ("recall", "ndcg", "map", "hit_rate")
RESULT_FORMAT = 1

# ALS grid: 4 x 3 x 2 = 24 fits. `regularization` is implicit's absolute L2 weight; `alpha` the confidence
# slope (confidence = 1 + alpha * the user's number of positives with the video).
ALS_GRID: dict[str, tuple] = {
    "factors": (16, 32, 64, 128),
    "regularization": (0.1, 1.0, 10.0),
    "alpha": (1.0, 10.0),
    "iterations": (15,),
}
# BPR grid: 3 x 2 x 2 = 12 fits (BPR is SGD on one thread, so that it is reproducible).
BPR_GRID: dict[str, tuple] = {
    "factors": (32, 64, 128),
    "learning_rate": (0.01, 0.02),
    "regularization": (0.01,),
    "iterations": (100, 300),
}
# Untuned defaults (ImplicitCFRecommender() without arguments).
ALS_DEFAULTS: dict[str, Any] = {"factors": 64, "regularization": 1.0, "alpha": 10.0, "iterations": 15}
BPR_DEFAULTS: dict[str, Any] = {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 300}
DEFAULT_THREADS = 2


# --- positives ---------------------------------------------------------------------------------------


def _positive(events: pd.DataFrame, videos: pd.DataFrame | None) -> np.ndarray:
    """Boolean mask of the positive engagements among `events` (one row per impression).

    A positive is a watch (``watched_s > 0``) that was completed, liked, or lasted at least 50 % of the
    video's ``duration_s`` (looked up in `videos`, or taken from an events column ``duration_s``).
    Without a known duration only ``completed`` / ``liked`` count.

    The rule itself is `recloop.data.engagement.positive_mask`; this only finds each row's duration.
    """
    if videos is not None and len(videos) and "duration_s" in videos.columns:
        durations = pd.Series(
            pd.to_numeric(videos["duration_s"], errors="coerce").to_numpy(np.float64),
            index=videos["video_id"].astype(str).to_numpy(),
        )
        durations = durations[~durations.index.duplicated(keep="first")]
        duration = durations.reindex(events["video_id"].astype(str).to_numpy()).to_numpy(np.float64)
    elif "duration_s" in events.columns:
        duration = pd.to_numeric(events["duration_s"], errors="coerce").to_numpy(np.float64)
    else:
        duration = np.full(len(events), np.nan)
    return positive_mask(events, duration)


def interactions_from_events(events: pd.DataFrame | pa.Table, videos: pd.DataFrame | pa.Table | None) -> pd.DataFrame:
    """The positive engagements of `events` as an interaction frame ``user_id, video_id, event_time``."""
    if isinstance(events, pa.Table):
        events = events.to_pandas()
    if isinstance(videos, pa.Table):
        videos = videos.to_pandas()
    mask = _positive(events, videos)
    return _interaction_frame(events["user_id"][mask], events["video_id"][mask], events["event_time"][mask])


def _column(values: Iterable) -> pd.Series:
    return values.reset_index(drop=True) if isinstance(values, pd.Series) else pd.Series(np.asarray(values))


def _interaction_frame(users: Iterable, videos: Iterable, times: Iterable) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "user_id": _column(users).astype(str),
            "video_id": _column(videos).astype(str),
            "event_time": pd.to_datetime(_column(times), utc=True).dt.as_unit("us"),
        }
    )
    return df.sort_values(list(INTERACTION_COLUMNS), kind="stable").reset_index(drop=True)


def _check_interactions(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("user_id", "video_id") if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; an interaction frame has {list(INTERACTION_COLUMNS)}")


# --- metric helpers ----------------------------------------------------------------------------------


def _flatten(lists: Sequence[Iterable[str]], k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position, item) arrays of the first `k` entries of each list (all entries if k is None)."""
    cut = [list(x)[:k] if k is not None else list(x) for x in lists]
    lengths = np.fromiter((len(x) for x in cut), dtype=np.int64, count=len(cut))
    rows = np.repeat(np.arange(len(cut), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(rows), dtype=np.int64) - starts
    items = np.empty(len(rows), dtype=object)
    items[:] = list(itertools.chain.from_iterable(cut))
    return rows, positions, items


def _hits(recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean hit matrix (users x k; position j is True when the j-th recommendation is relevant) and
    the number of relevant items per user. A repeated item counts once (at its first position)."""
    if len(recs) != len(truth):
        raise ValueError(f"recs has {len(recs)} lists but truth has {len(truth)} sets")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r_rows, r_pos, r_items = _flatten(recs, k)
    t_rows, _, t_items = _flatten([set(t) for t in truth])
    codes, uniques = pd.factorize(np.concatenate([r_items, t_items]))
    n_codes = max(len(uniques), 1)
    r_keys = r_rows * n_codes + codes[: len(r_items)]
    t_keys = t_rows * n_codes + codes[len(r_items) :]
    hit = np.isin(r_keys, t_keys)
    _, first = np.unique(r_keys, return_index=True)
    once = np.zeros(len(r_keys), bool)
    once[first] = True
    hits = np.zeros((len(recs), k), bool)
    hits[r_rows, r_pos] = hit & once
    n_truth = np.bincount(t_rows, minlength=len(truth)).astype(np.int64)
    return hits, n_truth


def _per_user_accuracy(hits: np.ndarray, n_truth: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user recall, NDCG, AP and hit at cut-off k, for users with n_truth > 0."""
    h = hits[:, :k].astype(np.float64)
    n = n_truth.astype(np.float64)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = np.cumsum(discount)  # ideal[m - 1] = DCG of m relevant items at the top
    capped = np.minimum(n_truth, k)
    dcg = h @ discount
    idcg = ideal[np.maximum(capped, 1) - 1]
    precision = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    return {
        "recall": h.sum(axis=1) / n,
        "ndcg": dcg / idcg,
        "map": (precision * h).sum(axis=1) / capped,
        "hit_rate": (h.sum(axis=1) > 0).astype(np.float64),
    }


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def accuracy_metrics(
    recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[int, dict[str, float]]:
    """All accuracy metrics at every k of `ks` (one hit matrix): ``{k: {"recall", "ndcg", "map",
    "hit_rate", "users_evaluated"}}``. Users whose truth is empty are skipped."""
    ks = sorted({int(k) for k in ks})
    hits, n_truth = _hits(recs, truth, ks[-1])
    keep = n_truth > 0
    hits, n_truth = hits[keep], n_truth[keep]
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        per_user = _per_user_accuracy(hits, n_truth, k)
        out[k] = {name: _mean(per_user[name]) for name in ACCURACY_METRICS}
        out[k]["users_evaluated"] = int(keep.sum())
    return out


def _metric(recs, truth, k: int, name: str) -> float:
    hits, n_truth = _hits(recs, truth, k)
    keep = n_truth > 0
    return _mean(_per_user_accuracy(hits[keep], n_truth[keep], k)[name])


def recall_at_k(recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> float:
    """Mean over users (with non-empty truth) of |top-k ∩ truth| / |truth|."""
    return _metric(recs, truth, k, "recall")


def ndcg_at_k(recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> float:
    """Mean NDCG@k, binary relevance: DCG = sum_j rel_j / log2(j + 2) (j = 0-based rank), divided by the
    ideal DCG of min(|truth|, k) relevant items at the top."""
    return _metric(recs, truth, k, "ndcg")


def map_at_k(recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> float:
    """Mean average precision at k: AP = sum_j P@(j+1) * rel_j / min(|truth|, k)."""
    return _metric(recs, truth, k, "map")


def hit_rate_at_k(recs: Sequence[Sequence[str]], truth: Sequence[Iterable[str]], k: int) -> float:
    """Share of users (with non-empty truth) with at least one relevant item in their top k."""
    return _metric(recs, truth, k, "hit_rate")


def catalog_coverage(recs: Sequence[Sequence[str]], catalog_size: int) -> float:
    """Share of the catalogue recommended to at least one user: |∪ lists| / catalog_size."""
    if catalog_size <= 0:
        raise ValueError(f"catalog_size must be > 0, got {catalog_size}")
    _, _, items = _flatten(recs)
    return float(len(pd.unique(items)) / catalog_size) if len(items) else 0.0


def intra_list_diversity(recs: Sequence[Sequence[str]], item_category: Mapping[str, str]) -> float:
    """Mean over lists (of >= 2 items) of the share of item pairs whose categories differ.

    For a list of n items with c_j items in category j: 1 - sum_j c_j (c_j - 1) / (n (n - 1)).
    An item without a category counts as a category of its own (it differs from every other item).
    NaN when no list has two items.
    """
    rows, _, items = _flatten(recs)
    if not len(items):
        return float("nan")
    cats = pd.Series(item_category, dtype=object) if not isinstance(item_category, pd.Series) else item_category
    cat = pd.Series(items).map(cats)
    missing = cat.isna().to_numpy()
    labels = np.where(missing, "\x00item:" + pd.Series(items).astype(str).to_numpy(dtype=object), cat.astype(object))
    codes, uniques = pd.factorize(labels)
    pair_keys = rows * max(len(uniques), 1) + codes
    keys, counts = np.unique(pair_keys, return_counts=True)
    key_rows = keys // max(len(uniques), 1)
    same = np.bincount(key_rows, weights=counts * (counts - 1) / 2.0, minlength=len(recs))
    n = np.bincount(rows, minlength=len(recs)).astype(np.float64)
    total = n * (n - 1) / 2.0
    ok = n >= 2
    return _mean(1.0 - same[ok] / total[ok])


def _popularity_series(item_popularity: Mapping[str, float]) -> pd.Series:
    if isinstance(item_popularity, pd.Series):
        return item_popularity.astype(np.float64)
    return pd.Series(dict(item_popularity), dtype=np.float64)


def novelty(recs: Sequence[Sequence[str]], item_popularity: Mapping[str, float]) -> float:
    """Mean self-information of recommended items: mean over lists of the mean of -log2(p_i), p_i = the
    item's share of the training interactions (popularity_i / sum of popularities). An item with no
    training interactions gets the smallest positive popularity (its information is finite)."""
    rows, _, items = _flatten(recs)
    if not len(items):
        return float("nan")
    pop = _popularity_series(item_popularity)
    total = float(pop.sum())
    positive = pop[pop > 0]
    if total <= 0 or not len(positive):
        raise ValueError("item_popularity has no positive value")
    floor = float(positive.min())
    p = pd.Series(items).map(pop).fillna(0.0).to_numpy(np.float64)
    info = -np.log2(np.maximum(p, floor) / total)
    n = np.bincount(rows, minlength=len(recs))
    per_list = np.bincount(rows, weights=info, minlength=len(recs))
    ok = n > 0
    return _mean(per_list[ok] / n[ok])


def popularity_concentration(
    recs: Sequence[Sequence[str]], item_popularity: Mapping[str, float], top_share: float = 0.01
) -> float:
    """Share of all recommended slots that go to the top `top_share` most popular items of
    `item_popularity` (ceil(top_share x number of items), at least 1; ties broken by item id)."""
    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], got {top_share}")
    _, _, items = _flatten(recs)
    if not len(items):
        return float("nan")
    pop = _popularity_series(item_popularity)
    ids = pop.index.astype(str).to_numpy()
    order = np.lexsort((ids, -pop.to_numpy()))
    n_top = max(1, math.ceil(top_share * len(pop) - 1e-9))
    top = ids[order[:n_top]]
    return float(np.isin(items.astype(str), top).mean())


def identical_list_share(recs: Sequence[Sequence[str]]) -> float:
    """Share of users whose list equals the most common list (1.0: everybody gets the same list -- the
    degenerate-model guard)."""
    if not len(recs):
        return float("nan")
    counts = Counter(tuple(r) for r in recs)
    return counts.most_common(1)[0][1] / len(recs)


# --- user x item bookkeeping -------------------------------------------------------------------------


class SeenItems(Mapping[str, set[str]]):
    """user_id -> set of video_ids the user had positives with, built lazily from an interaction frame
    (sorted arrays, no per-user set until asked). Passed as ``exclude=`` to every recommender."""

    def __init__(self, interactions: pd.DataFrame) -> None:
        pairs = interactions[["user_id", "video_id"]].astype(str).drop_duplicates()
        pairs = pairs.sort_values(["user_id", "video_id"], kind="stable")
        users = pairs["user_id"].to_numpy(dtype=object)
        self._items = pairs["video_id"].to_numpy(dtype=object)
        if len(users):
            self._users, starts = np.unique(users, return_index=True)
        else:
            self._users, starts = np.empty(0, object), np.empty(0, np.int64)
        self._bounds = np.append(starts, len(users)).astype(np.int64)
        self._position = dict(zip(self._users.tolist(), range(len(self._users))))

    def __getitem__(self, user: str) -> set[str]:
        i = self._position[user]
        return set(self._items[self._bounds[i] : self._bounds[i + 1]].tolist())

    def __contains__(self, user: object) -> bool:
        return user in self._position

    def __iter__(self) -> Iterator[str]:
        return iter(self._position)

    def __len__(self) -> int:
        return len(self._position)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_id, video_id) arrays of all pairs."""
        return np.repeat(self._users, np.diff(self._bounds)), self._items


class _UserItems:
    """The user x item count matrix of an interaction frame over a catalogue (scipy CSR)."""

    def __init__(self, interactions: pd.DataFrame, catalog: Iterable[str] | None = None) -> None:
        _check_interactions(interactions, "interactions")
        users = interactions["user_id"].astype(str).to_numpy(dtype=object)
        items = interactions["video_id"].astype(str).to_numpy(dtype=object)
        extra = np.asarray(list(catalog) if catalog is not None else [], dtype=object).astype(str)
        self.item_ids = np.unique(np.concatenate([items, extra]).astype(str)).astype(object)
        self.user_ids = np.unique(users.astype(str)).astype(object)
        self.items = pd.Index(self.item_ids)
        self.users = pd.Index(self.user_ids)
        rows = self.users.get_indexer(users)
        cols = self.items.get_indexer(items)
        self.counts = sp.csr_matrix(
            (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(self.user_ids), len(self.item_ids))
        )
        self.counts.sum_duplicates()
        self.counts.sort_indices()

    def binary(self) -> sp.csr_matrix:
        m = self.counts.copy()
        m.data[:] = 1.0
        return m

    def exclusion_codes(
        self, user_ids: Sequence[str], exclude: Mapping[str, set[str]] | None
    ) -> list[np.ndarray]:
        """Per user, the item codes of `exclude[user]` that are in the catalogue."""
        empty = np.empty(0, np.int64)
        if not exclude:
            return [empty] * len(user_ids)
        lists = [list(exclude.get(u, ()) or ()) for u in user_ids]
        lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        if not lengths.sum():
            return [empty] * len(user_ids)
        flat = np.asarray(list(itertools.chain.from_iterable(lists)), dtype=object).astype(str)
        codes = self.items.get_indexer(flat)
        out = np.split(codes, np.cumsum(lengths)[:-1])
        return [c[c >= 0] for c in out]


def _popularity_order(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Item positions by decreasing count, ties by increasing id."""
    return np.lexsort((ids.astype(str), -counts))


def _first_k_not_excluded(order: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    cand = order[: k + len(excluded)]
    if len(excluded):
        cand = cand[~np.isin(cand, excluded)]
    return cand[:k]


# --- baselines ---------------------------------------------------------------------------------------


class PopularityRecommender:
    """Most popular first: items ranked by their number of positives in the training interactions,
    ties broken by video id; the whole catalogue is ranked. By default a user's own training positives
    are never recommended (``filter_seen``), on top of the explicit ``exclude`` sets."""

    def __init__(self, *, filter_seen: bool = True, name: str = "popularity") -> None:
        self.name = name
        self.filter_seen = filter_seen
        self._data: _UserItems | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"filter_seen": self.filter_seen}

    def fit(self, interactions: pd.DataFrame, catalog: Iterable[str] | None = None) -> PopularityRecommender:
        self._data = data = _UserItems(interactions, catalog)
        self.item_counts = np.asarray(data.counts.sum(axis=0)).ravel()
        self._order = _popularity_order(self.item_counts, data.item_ids)
        return self

    def ranking(self) -> list[str]:
        """The global ranking (all catalogue items, best first)."""
        return self._require_fit().item_ids[self._order].tolist()

    def _require_fit(self) -> _UserItems:
        if self._data is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(interactions) first")
        return self._data

    def recommend(
        self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None
    ) -> list[list[str]]:
        data = self._require_fit()
        user_ids = [str(u) for u in user_ids]
        if k <= 0:
            return [[] for _ in user_ids]
        extra = data.exclusion_codes(user_ids, exclude)
        rows = data.users.get_indexer(user_ids)
        indptr, indices = data.counts.indptr, data.counts.indices
        out = []
        for row, ex in zip(rows, extra):
            excluded = ex
            if self.filter_seen and row >= 0:
                excluded = np.concatenate([indices[indptr[row] : indptr[row + 1]], ex])
            out.append(data.item_ids[_first_k_not_excluded(self._order, excluded, k)].tolist())
        return out


def _threadpool_limits():
    """BLAS on one thread (implicit parallelises itself). implicit is imported first: it loads SciPy's
    BLAS, and threadpoolctl only limits libraries that are already loaded."""
    import implicit.cpu.als  # noqa: F401
    import implicit.cpu.bpr  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, "blas")


class ImplicitCFRecommender:
    """Matrix factorisation with the `implicit` library on the user x item positive matrix.

    * ``algorithm="als"``: weighted ALS (Hu, Koren & Volinsky 2008); the matrix holds the confidence
      ``1 + alpha * count`` (count = the user's positives with the item) and implicit's own ``alpha`` is 1.
    * ``algorithm="bpr"``: Bayesian personalised ranking on the binary matrix (SGD).

    ``recommend`` ranks the whole catalogue by the factor dot product, with implicit's
    ``filter_already_liked_items`` semantics (a user's training positives are never returned, when
    ``filter_seen``) plus the explicit ``exclude`` sets. Users unknown at fit time get the popularity
    ranking of the training data (with the same exclusions). BLAS runs on one thread and implicit on
    ``num_threads`` (default 2; BPR defaults to 1 because its multi-threaded SGD is not reproducible).
    """

    def __init__(
        self,
        algorithm: str = "als",
        *,
        factors: int | None = None,
        regularization: float | None = None,
        alpha: float | None = None,
        iterations: int | None = None,
        learning_rate: float | None = None,
        random_state: int = 42,
        num_threads: int | None = None,
        filter_seen: bool = True,
        name: str | None = None,
    ) -> None:
        if algorithm not in ("als", "bpr"):
            raise ValueError(f"algorithm must be 'als' or 'bpr', got {algorithm!r}")
        self.algorithm = algorithm
        defaults = ALS_DEFAULTS if algorithm == "als" else BPR_DEFAULTS
        given: dict[str, Any] = {
            "factors": factors,
            "regularization": regularization,
            "alpha": alpha,
            "iterations": iterations,
            "learning_rate": learning_rate,
        }
        self.hyper: dict[str, Any] = {key: (given[key] if given[key] is not None else value) for key, value in defaults.items()}
        unused = [key for key, value in given.items() if value is not None and key not in defaults]
        if unused:
            raise ValueError(f"{algorithm} does not take {unused}; it takes {sorted(defaults)}")
        self.random_state = random_state
        self.num_threads = num_threads if num_threads is not None else (DEFAULT_THREADS if algorithm == "als" else 1)
        self.filter_seen = filter_seen
        self.name = name or algorithm
        self.model: Any = None
        self._data: _UserItems | None = None
        self.tuning: dict[str, Any] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            **self.hyper,
            "random_state": self.random_state,
            "num_threads": self.num_threads,
            "filter_seen": self.filter_seen,
        }

    def fit(self, interactions: pd.DataFrame, catalog: Iterable[str] | None = None) -> ImplicitCFRecommender:
        self._data = data = _UserItems(interactions, catalog)
        self._pop_order = _popularity_order(np.asarray(data.counts.sum(axis=0)).ravel(), data.item_ids)
        self._seen = data.binary()
        h = self.hyper
        with _threadpool_limits():
            if self.algorithm == "als":
                from implicit.cpu.als import AlternatingLeastSquares

                matrix = data.counts.copy()
                matrix.data = (1.0 + float(h["alpha"]) * matrix.data).astype(np.float32)
                model: Any = AlternatingLeastSquares(
                    factors=int(h["factors"]),
                    regularization=float(h["regularization"]),
                    alpha=1.0,
                    iterations=int(h["iterations"]),
                    random_state=self.random_state,
                    num_threads=self.num_threads,
                )
            else:
                from implicit.cpu.bpr import BayesianPersonalizedRanking

                matrix = self._seen
                model = BayesianPersonalizedRanking(
                    factors=int(h["factors"]),
                    learning_rate=float(h["learning_rate"]),
                    regularization=float(h["regularization"]),
                    iterations=int(h["iterations"]),
                    random_state=self.random_state,
                    num_threads=self.num_threads,
                )
            if matrix.nnz:
                model.fit(matrix, show_progress=False)
                self.model = model
            else:
                self.model = None  # nothing to learn from: every user falls back to popularity
        return self

    def recommend(
        self,
        user_ids: Sequence[str],
        k: int,
        *,
        exclude: Mapping[str, set[str]] | None = None,
        batch_size: int = 4096,
    ) -> list[list[str]]:
        if self._data is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(interactions) first")
        data = self._data
        user_ids = [str(u) for u in user_ids]
        out: list[list[str]] = [[] for _ in user_ids]
        n_items = len(data.item_ids)
        if k <= 0 or not n_items:
            return out
        extra = data.exclusion_codes(user_ids, exclude)
        rows = data.users.get_indexer(user_ids)
        known = np.flatnonzero(rows >= 0) if self.model is not None else np.empty(0, np.int64)
        indptr, indices = self._seen.indptr, self._seen.indices
        for i in np.setdiff1d(np.arange(len(user_ids)), known):  # cold users: popularity
            excluded = extra[i]
            if self.filter_seen and rows[i] >= 0:
                excluded = np.concatenate([indices[indptr[rows[i]] : indptr[rows[i] + 1]], excluded])
            out[i] = data.item_ids[_first_k_not_excluded(self._pop_order, excluded, k)].tolist()
        n = min(k, n_items)
        floor = np.finfo(np.float32).min
        with _threadpool_limits():
            for start in range(0, len(known), batch_size):
                batch = known[start : start + batch_size]
                user_rows = rows[batch]
                ex_lengths = np.fromiter((len(extra[i]) for i in batch), np.int64, count=len(batch))
                ex_cols = np.concatenate([extra[i] for i in batch]) if ex_lengths.sum() else np.empty(0, np.int64)
                ex_rows = np.repeat(np.arange(len(batch)), ex_lengths)
                filt = sp.csr_matrix(
                    (np.ones(len(ex_cols), np.float32), (ex_rows, ex_cols)), shape=(len(batch), n_items)
                )
                if self.filter_seen:
                    filt = filt + self._seen[user_rows]
                filt = sp.csr_matrix(filt)
                filt.sum_duplicates()
                filt.sort_indices()
                ids, scores = self.model.recommend(user_rows, filt, N=n, filter_already_liked_items=True)
                ids, scores = np.atleast_2d(ids), np.atleast_2d(scores)
                for j, i in enumerate(batch):
                    valid = (scores[j] > floor) & (ids[j] >= 0)
                    out[i] = data.item_ids[ids[j][valid]].tolist()
        return out


# --- tuning ------------------------------------------------------------------------------------------


def _grid_points(grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]
    return [dict(point) for point in grid]


def tune(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None = None,
    *,
    algorithm: str = "als",
    catalog: Iterable[str] | None = None,
    k: int = MAIN_K,
    metric: str = "recall",
    random_state: int = 42,
    num_threads: int | None = None,
    max_valid_users: int | None = 10_000,
    seed: int = 0,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Grid search of ImplicitCFRecommender hyper-parameters: fit on `train`, score `metric`@`k` on
    `valid` (same protocol as :func:`evaluate`: train positives excluded, full ranking), return the best
    point (the first in grid order on ties). `grid` is ``{param: values}`` (Cartesian product) or a list
    of points; default :data:`ALS_GRID` / :data:`BPR_GRID`. At most `max_valid_users` validation users
    (a seeded sample) are scored. Each trial is appended to `history` when given. Never pass the test
    set as `valid`."""
    if metric not in ACCURACY_METRICS:
        raise ValueError(f"metric must be one of {ACCURACY_METRICS}, got {metric!r}")
    points = _grid_points(grid if grid is not None else (ALS_GRID if algorithm == "als" else BPR_GRID))
    if not points:
        raise ValueError("empty grid")
    catalog = list(catalog) if catalog is not None else None
    users, truth = _relevant(train, valid, exclude_seen=True)[:2]
    if max_valid_users is not None and len(users) > max_valid_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(users), max_valid_users, replace=False))
        users, truth = [users[i] for i in pick], [truth[i] for i in pick]
    exclude = SeenItems(train)
    best, best_score = points[0], -math.inf
    for point in points:
        t0 = time.perf_counter()
        rec = ImplicitCFRecommender(algorithm, random_state=random_state, num_threads=num_threads, **point)
        rec.fit(train, catalog)
        recs = rec.recommend(users, k, exclude=exclude)
        score = _metric(recs, truth, k, metric) if users else float("nan")
        trial = {**point, f"{metric}@{k}": score, "seconds": round(time.perf_counter() - t0, 3)}
        log.info("tune %s %s", algorithm, trial)
        if history is not None:
            history.append(trial)
        if score > best_score:
            best, best_score = point, score
    return dict(best)


# --- splits ------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Train / (valid) / test interaction frames and a JSON-ready description of how they were made."""

    train: pd.DataFrame
    test: pd.DataFrame
    valid: pd.DataFrame | None = None
    description: dict[str, Any] = field(default_factory=dict)


def _drop_cold(part: pd.DataFrame, train_users: pd.Index) -> tuple[pd.DataFrame, int, int]:
    """`part` restricted to users of train; also the number of cold users and their interactions."""
    warm = part["user_id"].isin(train_users).to_numpy()
    cold_users = int(part.loc[~warm, "user_id"].nunique())
    return part.loc[warm].reset_index(drop=True), cold_users, int((~warm).sum())


def _utc(ts: Any) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def time_split(interactions: pd.DataFrame, cutoff: Any, *, end: Any = None) -> Split:
    """Train on interactions before `cutoff`, test on those from `cutoff` on (before `end`, if given).
    Test users are limited to users present in train; the others are counted as cold."""
    _check_interactions(interactions, "interactions")
    cut = _utc(cutoff)
    times = pd.to_datetime(interactions["event_time"], utc=True)
    before = (times < cut).to_numpy()
    after = ~before
    if end is not None:
        after &= (times < _utc(end)).to_numpy()
    train = interactions.loc[before].reset_index(drop=True)
    test, cold_users, cold_rows = _drop_cold(interactions.loc[after], pd.Index(train["user_id"].unique()))
    description = {
        "kind": "time",
        "cutoff": cut.isoformat(),
        "end": _utc(end).isoformat() if end is not None else None,
        "train_interactions": len(train),
        "test_interactions": len(test),
        "cold_test_users": cold_users,
        "cold_test_interactions": cold_rows,
    }
    return Split(train=train, test=test, valid=None, description=description)


def random_split(
    interactions: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """The classic random split: ``(train, valid, test)`` fractions (or ``(train, test)``) of the
    distinct (user, video) pairs, shuffled with `seed`; every interaction of a pair goes to the pair's
    part (no pair leaks between parts). Valid / test users are limited to users present in train."""
    _check_interactions(interactions, "interactions")
    fractions = [float(f) for f in fractions]
    if len(fractions) not in (2, 3) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 2 or 3 non-negative numbers summing to 1, got {fractions}")
    pair = interactions["user_id"].astype(str) + "\x1f" + interactions["video_id"].astype(str)
    codes, uniques = pd.factorize(pair, sort=True)
    n = len(uniques)
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    part_of_rank = np.searchsorted(bounds, np.arange(n), side="right")
    part_of_pair = np.empty(n, np.int64)
    part_of_pair[np.random.default_rng(seed).permutation(n)] = part_of_rank
    part = part_of_pair[codes]
    names = ["train", "valid", "test"] if len(fractions) == 3 else ["train", "test"]
    frames = {name: interactions.loc[part == i].reset_index(drop=True) for i, name in enumerate(names)}
    train_users = pd.Index(frames["train"]["user_id"].unique())
    description: dict[str, Any] = {
        "kind": "random",
        "fractions": dict(zip(names, fractions)),
        "seed": seed,
        "unit": "distinct (user_id, video_id) pairs",
        "pairs": {name: int(np.diff(np.concatenate([[0], bounds]))[i]) for i, name in enumerate(names)},
        "train_interactions": len(frames["train"]),
    }
    for name in names[1:]:
        frames[name], cold_users, cold_rows = _drop_cold(frames[name], train_users)
        description[f"{name}_interactions"] = len(frames[name])
        description[f"cold_{name}_users"] = cold_users
        description[f"cold_{name}_interactions"] = cold_rows
    return Split(train=frames["train"], test=frames["test"], valid=frames.get("valid"), description=description)


# --- the harness -------------------------------------------------------------------------------------


class AccuracyAtK(TypedDict):
    recall: float | None
    ndcg: float | None
    map: float | None
    hit_rate: float | None


class RecommenderResult(TypedDict, total=False):
    users_evaluated: int
    metrics: dict[str, AccuracyAtK]  # keyed by str(k)
    beyond_accuracy: dict[str, Any]  # at the main k
    seconds: dict[str, float]
    params: dict[str, Any]
    tuning: dict[str, Any]


class EvaluationResult(TypedDict):
    """The JSON written by :func:`write_json` (every key a string, every value JSON-native)."""

    format: int
    protocol: dict[str, Any]
    split: dict[str, Any]
    catalog_size: int
    ks: list[int]
    main_k: int
    interactions: dict[str, int]
    users: dict[str, int]
    users_evaluated: int
    recommenders: dict[str, RecommenderResult]


PROTOCOL = {
    "positive": "a watch (watched_s > 0) that was completed, liked or lasted >= 50% of the video's "
    "duration; ratings: rating >= 4",
    "ranking": "full ranking over all catalogue items (no sampled negatives)",
    "relevant": "a user's test positives, minus videos they already had a positive with in train",
    "users": "test users present in train with at least one relevant video; cold users are skipped",
}


def _relevant(
    train: pd.DataFrame, test: pd.DataFrame, *, exclude_seen: bool
) -> tuple[list[str], list[set[str]], dict[str, int]]:
    """Evaluated users (sorted), their relevant sets, and user counts."""
    _check_interactions(test, "test")
    train_users = pd.Index(train["user_id"].astype(str).unique())
    t = test[["user_id", "video_id"]].astype(str).drop_duplicates()
    test_users = t["user_id"].nunique()
    warm = t["user_id"].isin(train_users)
    cold = int(t.loc[~warm, "user_id"].nunique())
    t = t.loc[warm]
    if exclude_seen and len(t):
        seen = train[["user_id", "video_id"]].astype(str).drop_duplicates()
        t = t.merge(seen, on=["user_id", "video_id"], how="left", indicator=True)
        t = t.loc[t["_merge"] == "left_only", ["user_id", "video_id"]]
    t = t.sort_values(["user_id", "video_id"], kind="stable")
    grouped = t.groupby("user_id", sort=True)["video_id"]
    users = list(grouped.groups.keys())
    truth = [set(v) for v in grouped.agg(list).tolist()] if len(users) else []
    counts = {
        "train": int(len(train_users)),
        "test": int(test_users),
        "cold_test_users": cold,
        "without_relevant_videos": int(test_users - cold - len(users)),
        "evaluated": len(users),
    }
    return [str(u) for u in users], truth, counts


def _check_lists(name: str, users: list[str], recs: list[list[str]], k: int, seen: SeenItems | None) -> None:
    """A recommender's answer must be one list per user of at most k distinct, non-excluded videos."""
    if len(recs) != len(users):
        raise ValueError(f"{name}: returned {len(recs)} lists for {len(users)} users")
    for user, r in zip(users, recs):
        if len(r) > k:
            raise ValueError(f"{name}: returned {len(r)} > k={k} videos for user {user!r}")
        if len(set(r)) != len(r):
            raise ValueError(f"{name}: repeated videos in the list of user {user!r}")
    if seen is None or not len(users):
        return
    rows, _, items = _flatten(recs)
    s_users, s_items = seen.pairs()
    s_rows = pd.Index(users).get_indexer(s_users)
    keep = s_rows >= 0
    codes, uniques = pd.factorize(np.concatenate([items.astype(str), s_items[keep].astype(str)]))
    n = max(len(uniques), 1)
    bad = np.isin(rows * n + codes[: len(items)], s_rows[keep] * n + codes[len(items) :])
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: recommended excluded (already seen) video {items[j]!r} to user {users[rows[j]]!r}")


def _json_float(x: float | np.floating) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _json_float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (pd.Timestamp, Path)):
        return str(obj)
    return str(obj)


def _catalog_frame(catalog: pd.DataFrame | Iterable[str], *extra: pd.DataFrame) -> pd.DataFrame:
    if isinstance(catalog, pd.DataFrame):
        cat = catalog.copy()
    else:
        cat = pd.DataFrame({"video_id": list(catalog)})
    cat["video_id"] = cat["video_id"].astype(str)
    if "category" not in cat.columns:
        cat["category"] = UNKNOWN_CATEGORY
    ids = [cat["video_id"]] + [df["video_id"].astype(str) for df in extra]
    missing = pd.Index(pd.unique(pd.concat(ids, ignore_index=True))).difference(pd.Index(cat["video_id"]))
    if len(missing):
        cat = pd.concat([cat, pd.DataFrame({"video_id": missing, "category": UNKNOWN_CATEGORY})], ignore_index=True)
    return cat.drop_duplicates("video_id", keep="first").reset_index(drop=True)


def evaluate(
    recommenders: Mapping[str, Recommender],
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    catalog: pd.DataFrame | Iterable[str],
    ks: Iterable[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    main_k: int = MAIN_K,
    split: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate fitted recommenders on `test` (JSON-ready result, see :class:`EvaluationResult`).

    `train` / `test` are interaction frames (``user_id, video_id, event_time`` positives); `catalog` the
    videos (``video_id`` and, for diversity, ``category``) -- videos of train or test missing from it are
    added. Every recommender is asked once for max(ks ∪ {main_k}) videos per evaluated user with
    ``exclude`` = the user's training positives (when `exclude_seen`), and shorter cut-offs use the
    prefix of that list. Its answer is checked (one list per user, at most k distinct videos, none
    excluded); a breach raises ValueError.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or main_k < 1:
        raise ValueError(f"ks and main_k must be >= 1, got {ks} and {main_k}")
    _check_interactions(train, "train")
    cat = _catalog_frame(catalog, train, test)
    catalog_size = len(cat)
    users, truth, user_counts = _relevant(train, test, exclude_seen=exclude_seen)
    seen = SeenItems(train) if exclude_seen else None
    popularity = pd.Series(0.0, index=pd.Index(cat["video_id"]))
    counts = train["video_id"].astype(str).value_counts()
    popularity = popularity.add(counts.astype(np.float64), fill_value=0.0)
    category = pd.Series(cat["category"].astype(str).to_numpy(), index=cat["video_id"].to_numpy())
    k_max = max(max(ks), main_k)

    out: dict[str, RecommenderResult] = {}
    for name, rec in recommenders.items():
        t0 = time.perf_counter()
        recs = rec.recommend(users, k_max, exclude=seen) if users else []
        seconds = time.perf_counter() - t0
        recs = [list(map(str, r)) for r in recs]
        _check_lists(name, users, recs, k_max, seen)
        accuracy = accuracy_metrics(recs, truth, sorted(set(ks) | {main_k})) if users else {}
        main = [r[:main_k] for r in recs]
        beyond: dict[str, Any] = {"k": main_k}
        if users:
            beyond.update({m: accuracy[main_k][m] for m in ACCURACY_METRICS})
            beyond.update(
                catalog_coverage=catalog_coverage(main, catalog_size),
                intra_list_diversity=intra_list_diversity(main, category),
                novelty=novelty(main, popularity) if popularity.sum() > 0 else float("nan"),
                popularity_concentration=popularity_concentration(main, popularity),
                identical_list_share=identical_list_share(main),
            )
        metrics: dict[str, Any] = {
                str(k): {m: accuracy[k][m] for m in ACCURACY_METRICS} if users else dict.fromkeys(ACCURACY_METRICS)
                for k in ks
        }
        result: RecommenderResult = {
            "users_evaluated": len(users),
            "metrics": metrics,
            "beyond_accuracy": beyond,
            "seconds": {"recommend": round(seconds, 3)},
        }
        params = getattr(rec, "params", None)
        if isinstance(params, Mapping):
            result["params"] = dict(params)
        tuning = getattr(rec, "tuning", None)
        if isinstance(tuning, Mapping):
            result["tuning"] = dict(tuning)
        out[name] = result
        log.info("evaluated %s on %d users in %.2fs", name, len(users), seconds)

    result_all = {
        "format": RESULT_FORMAT,
        "protocol": {**PROTOCOL, "exclude_seen": exclude_seen},
        "split": dict(split or {}),
        "catalog_size": catalog_size,
        "ks": ks,
        "main_k": main_k,
        "interactions": {"train": len(train), "test": len(test)},
        "users": user_counts,
        "users_evaluated": len(users),
        "recommenders": out,
    }
    return _jsonable(result_all)


def flat_metrics(result: Mapping[str, Any], recommender: str) -> dict[str, float]:
    """One recommender's numbers as flat names (``recall_at_10``, ``catalog_coverage_at_10``, ...), e.g.
    for MLflow; metrics that are undefined (None) are left out."""
    r = result["recommenders"][recommender]
    flat: dict[str, float] = {}
    for k, values in r["metrics"].items():
        for m, v in values.items():
            if v is not None:
                flat[f"{m}_at_{k}"] = v
    beyond = r["beyond_accuracy"]
    for m, v in beyond.items():
        if m != "k" and m not in ACCURACY_METRICS and v is not None:
            flat[f"{m}_at_{beyond['k']}"] = v
    return flat


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write `result` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return path


# --- files -------------------------------------------------------------------------------------------

_USER_COLUMNS = {"user_id": False, "userId": True}  # name -> MovieLens numeric ids (prefixed ml_u / ml_v)
_ITEM_COLUMNS = {"video_id": False, "movieId": True}


def _movielens_ids(prefix: str, values: pd.Series) -> pd.Series:
    return prefix + pd.to_numeric(values, errors="raise").astype(np.int64).astype(str)


def _times(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values.astype(np.int64), unit="s", utc=True)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return pd.to_datetime(numeric.astype(np.int64), unit="s", utc=True)
    return pd.to_datetime(values, utc=True, format="ISO8601")


def _read_table(path: Path) -> pd.DataFrame:
    """A Parquet file, or a delimited text file (',', tab, ';', '|' or '::'; header optional: a
    header-less file of 3-4 numeric columns is MovieLens ``user item rating [timestamp]``)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path).to_pandas()
    with path.open("rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if "::" in first:
        sep = "::"
    else:
        sep = max(["\t", ",", ";", "|"], key=first.count)
        if not first.count(sep):
            sep = r"\s+"
    fields = [f.strip() for f in (first.split(sep) if sep != r"\s+" else first.split())]
    numeric = all(_is_number(f) for f in fields) and len(fields) in (3, 4)
    engine = "python" if len(sep) > 1 else "c"
    if numeric:
        names = ["userId", "movieId", "rating", "timestamp"][: len(fields)]
        df = pd.read_csv(path, sep=sep, header=None, names=names, engine=engine, encoding="latin-1")
        if "timestamp" not in df.columns:
            df["timestamp"] = 0
        return df
    return pd.read_csv(path, sep=sep, engine=engine, dtype=str, keep_default_na=False, na_values=[""])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _movies_beside(path: Path, ids: pd.Series) -> pd.Series | None:
    """Category (first genre) of the MovieLens movies next to a ratings file (movies.csv, movies.dat or
    u.item), indexed like `ids` (``ml_v{movieId}``); None when there is no movies file."""
    from recloop.data import movielens

    folder = path.parent
    for layout, name in (("ml-latest", "movies.csv"), ("ml-1m", "movies.dat"), ("ml-100k", "u.item")):
        if (folder / name).is_file():
            movies = movielens._read_movies(layout, folder)
            if movies is None:
                return None
            first = movies["genres"].astype(str).str.partition("|")[0]
            first = first.where(first != "", UNKNOWN_CATEGORY)
            first.index = "ml_v" + pd.Index(movies.index).astype(str)
            first = first[~first.index.duplicated(keep="first")]
            return first.reindex(ids.to_numpy()).fillna(UNKNOWN_CATEGORY)
    return None


def _videos_beside(path: Path) -> pd.DataFrame | None:
    for name in ("videos.parquet", "videos.csv"):
        candidate = path.parent / name
        if candidate.is_file() and candidate != path:
            return _read_table(candidate)
    return None


def load_interactions_file(
    path: str | Path, *, videos_path: str | Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Positive interactions (``user_id, video_id, event_time``) and the videos (``video_id, category,
    duration_s``, ...) of one file or folder:

    (a) a MovieLens-format folder (ML-100K, ML-1M/10M, ml-latest; via recloop.data.movielens);
    (b) a CSV or Parquet file of events in the schema of docs/data_schema.md (positives by the recloop
        rule; durations from `videos_path`, else a ``videos.parquet`` / ``videos.csv`` next to the file,
        else an events column ``duration_s``, else only completed / liked count);
    (c) a ratings CSV / TSV / Parquet with ``user_id,video_id,rating,timestamp`` or MovieLens
        ``userId,movieId,rating,timestamp`` columns (also header-less ``u.data`` / ``ratings.dat`` lines);
        rating >= 4 is a positive. MovieLens ids become ``ml_u{userId}`` / ``ml_v{movieId}`` as in (a),
        and a movies file beside it (movies.csv, movies.dat, u.item) gives the categories.

    The videos are every video of the file (rated or shown, positive or not).
    """
    path = Path(path)
    if path.is_dir():
        from recloop.data.movielens import read_movielens

        tables = read_movielens(path)
        events = tables["events"].to_pandas()
        videos = tables["videos"].to_pandas()
        return interactions_from_events(events, videos), videos.reset_index(drop=True)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    df = _read_table(path)
    columns = set(df.columns)
    if "watched_s" in columns:
        missing = [c for c in ("user_id", "video_id", "event_time") if c not in columns]
        if missing:
            raise ValueError(f"{path}: events file lacks column(s) {missing}")
        videos = _read_table(Path(videos_path)) if videos_path is not None else _videos_beside(path)
        if videos is None and "duration_s" not in columns:
            log.warning("%s: no video durations; only completed / liked watches count as positives", path)
        df["event_time"] = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
        if videos is not None:
            videos = videos.copy()
            videos["video_id"] = videos["video_id"].astype(str)
            if "duration_s" in videos.columns:
                videos["duration_s"] = pd.to_numeric(videos["duration_s"], errors="coerce")
        interactions = interactions_from_events(df, videos)
        catalog = _catalog_frame(videos if videos is not None else [], df)
        return interactions, catalog
    user_col = next((c for c in _USER_COLUMNS if c in columns), None)
    item_col = next((c for c in _ITEM_COLUMNS if c in columns), None)
    if user_col is None or item_col is None or "rating" not in columns:
        raise ValueError(
            f"{path}: not an events file (user_id, video_id, event_time, watched_s, ...) nor a ratings file "
            f"(user_id,video_id,rating,timestamp or userId,movieId,rating,timestamp); columns: {sorted(columns)}"
        )
    time_col = "timestamp" if "timestamp" in columns else ("event_time" if "event_time" in columns else None)
    if time_col is None:
        raise ValueError(f"{path}: a ratings file needs a timestamp column")
    movielens = _USER_COLUMNS[user_col]
    users = _movielens_ids("ml_u", df[user_col]) if movielens else df[user_col].astype(str)
    items = _movielens_ids("ml_v", df[item_col]) if _ITEM_COLUMNS[item_col] else df[item_col].astype(str)
    rating = pd.to_numeric(df["rating"], errors="raise").to_numpy(np.float64)
    times = _times(df[time_col])
    positive = rating >= POSITIVE_RATING
    interactions = _interaction_frame(users[positive], items[positive], times[positive])
    ids = pd.Series(pd.unique(items)).sort_values(kind="stable").reset_index(drop=True)
    category = _movies_beside(path, ids) if _ITEM_COLUMNS[item_col] else None
    videos = pd.DataFrame(
        {
            "video_id": ids.to_numpy(),
            "category": category.to_numpy() if category is not None else UNKNOWN_CATEGORY,
            "duration_s": MOVIELENS_DURATION_S,
        }
    )
    return interactions, videos


# --- factories and file mode -------------------------------------------------------------------------

RecommenderFactory = Callable[..., Recommender]
"""``factory(train_interactions, videos) -> fitted Recommender``; a factory that also takes a keyword
``valid`` receives the validation interactions when there are some (evaluate_files(valid_path=...))."""


def popularity_factory(train: pd.DataFrame, videos: pd.DataFrame) -> PopularityRecommender:
    return PopularityRecommender().fit(train, catalog=videos["video_id"].astype(str))


def tuned_cf_factory(
    algorithm: str = "als",
    grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None = None,
    *,
    valid_fraction: float = 0.1,
    seed: int = 0,
    k: int = MAIN_K,
    metric: str = "recall",
    random_state: int = 42,
    num_threads: int | None = None,
    max_valid_users: int | None = 10_000,
) -> RecommenderFactory:
    """A factory that tunes an ImplicitCFRecommender on validation data, then fits it on all of train.

    Validation data: the ``valid`` interactions when given; otherwise carved from train -- a random
    `valid_fraction` of its (user, video) pairs (`seed`), the model being tuned on the rest. The test
    set is never seen. The fitted recommender carries ``tuning`` (chosen params, trials, seconds).
    """

    def factory(train: pd.DataFrame, videos: pd.DataFrame, valid: pd.DataFrame | None = None) -> ImplicitCFRecommender:
        t0 = time.perf_counter()
        catalog = videos["video_id"].astype(str).tolist()
        if valid is not None:
            fit_on, valid_on, source = train, valid, "given validation interactions"
        else:
            carved = random_split(train, (1.0 - valid_fraction, valid_fraction), seed=seed)
            fit_on, valid_on = carved.train, carved.test
            source = f"random {valid_fraction:.0%} of train's (user, video) pairs, seed {seed}"
        history: list[dict[str, Any]] = []
        params = tune(
            fit_on, valid_on, grid, algorithm=algorithm, catalog=catalog, k=k, metric=metric,
            random_state=random_state, num_threads=num_threads, max_valid_users=max_valid_users,
            seed=seed, history=history,
        )  # fmt: skip
        tune_seconds = time.perf_counter() - t0
        rec = ImplicitCFRecommender(algorithm, random_state=random_state, num_threads=num_threads, **params)
        rec.fit(train, catalog)
        rec.tuning = {
            "validation": source,
            "metric": f"{metric}@{k}",
            "params": params,
            "trials": history,
            "seconds": round(tune_seconds, 3),
        }
        return rec

    factory.__name__ = f"tuned_{algorithm}_factory"
    return factory


def baseline_factories(
    *,
    include_bpr: bool = True,
    als_grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None = None,
    bpr_grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, RecommenderFactory]:
    """``{"popularity", "als", "bpr"}`` factories: popularity, and ALS / BPR tuned on validation data."""
    factories: dict[str, RecommenderFactory] = {
        "popularity": popularity_factory,
        "als": tuned_cf_factory("als", als_grid, seed=seed),
    }
    if include_bpr:
        factories["bpr"] = tuned_cf_factory("bpr", bpr_grid, seed=seed)
    return factories


def _call_factory(factory: RecommenderFactory, train: pd.DataFrame, videos: pd.DataFrame, valid) -> Recommender:
    if valid is not None:
        parameters: Mapping[str, inspect.Parameter]
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            parameters = {}
        if "valid" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return factory(train, videos, valid=valid)
    return factory(train, videos)


def _merge_videos(*frames: pd.DataFrame | None) -> pd.DataFrame:
    present = [f for f in frames if f is not None and len(f)]
    if not present:
        return pd.DataFrame({"video_id": pd.Series([], dtype=object), "category": pd.Series([], dtype=object)})
    merged = pd.concat(present, ignore_index=True)
    merged["video_id"] = merged["video_id"].astype(str)
    return merged.drop_duplicates("video_id", keep="first").reset_index(drop=True)


def evaluate_files(
    train_path: str | Path,
    test_path: str | Path,
    *,
    recommenders: Mapping[str, RecommenderFactory] | None = None,
    valid_path: str | Path | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    main_k: int = MAIN_K,
) -> EvaluationResult:
    """Fit every factory (default :func:`baseline_factories`) on the train file and evaluate on the test
    file; see :func:`load_interactions_file` for the accepted files. The catalogue is the union of the
    files' videos. With `valid_path`, tuned factories tune on it instead of carving validation data from
    train. The result records the files, fit times and tuning."""
    train, train_videos = load_interactions_file(train_path)
    test, test_videos = load_interactions_file(test_path)
    valid, valid_videos = load_interactions_file(valid_path) if valid_path is not None else (None, None)
    videos = _catalog_frame(_merge_videos(train_videos, valid_videos, test_videos), train, test)
    factories = recommenders if recommenders is not None else baseline_factories()
    fitted: dict[str, Recommender] = {}
    fit_seconds: dict[str, float] = {}
    for name, factory in factories.items():
        t0 = time.perf_counter()
        fitted[name] = _call_factory(factory, train, videos, valid)
        fit_seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("fitted %s in %.2fs", name, fit_seconds[name])
    split = {
        "kind": "files",
        "train": str(train_path),
        "valid": str(valid_path) if valid_path is not None else None,
        "test": str(test_path),
        "train_interactions": len(train),
        "valid_interactions": len(valid) if valid is not None else None,
        "test_interactions": len(test),
    }
    result = evaluate(
        fitted, train, test, catalog=videos, ks=ks, exclude_seen=exclude_seen, main_k=main_k, split=split
    )
    for name, seconds in fit_seconds.items():
        result["recommenders"][name]["seconds"]["fit"] = seconds
    return result
