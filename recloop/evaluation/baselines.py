"""The baselines every model is compared with: popularity, ALS and BPR (`implicit`), EASE (closed form),
each tuned on validation data by its factory."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recloop.recommender import Recommender
from recloop.evaluation.data import SeenItems, _first_k_not_excluded, _popularity_order, _UserItems, random_split
from recloop.evaluation.harness import MAX_EVAL_USERS, _relevant
from recloop.evaluation.metrics import ACCURACY_METRICS, MAIN_K, _metric

log = logging.getLogger(__name__)


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


def validation_data(
    train: pd.DataFrame, valid: pd.DataFrame | None, valid_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(what to fit on, what to tune on, how it was chosen): the given validation interactions, else a
    random `valid_fraction` of train's (user, video) pairs carved out of it (never the test set)."""
    if valid is not None:
        return train, valid, "given validation interactions"
    carved = random_split(train, (1.0 - valid_fraction, valid_fraction), seed=seed)
    return carved.train, carved.test, f"random {valid_fraction:.0%} of train's (user, video) pairs, seed {seed}"


EASE_GRID: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
# EASE's weights are a dense item x item matrix (n^2 floats) from an n x n inverse (n^3): at most this many
# items, the most popular in train (the platform's item-to-item source has the same cap,
# `ItemToItemConfig.max_items`). 100k items would need 40 GB and hours; 8192 need 256 MB.
EASE_MAX_ITEMS = 8192
# Users x catalogue scores held at once by EaseRecommender.recommend (32M floats: 128 MB, with 256 MB of
# top-k indices beside them).
SCORE_BATCH_CELLS = 2**25


class EaseRecommender:
    """EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): the item x item weights
    B = I - P diag(1/diag(P)), P = (X^T X + l2 I)^-1, diag(B) = 0, in closed form over the binary user x
    item matrix of positives (`recloop.model_plane.sources.item_to_item.ease_weights`, the same function
    the platform's item-to-item source uses); a user's scores are x_u B over the whole catalogue. Items
    without a training positive score 0; users unknown at fit time get the popularity ranking.

    The model covers at most `max_items` items (`EASE_MAX_ITEMS`), the ones with the most training
    interactions: the others are scored below every covered item, in popularity order (so a list is
    never short)."""

    def __init__(self, *, l2: float = 100.0, filter_seen: bool = True, name: str = "ease",
                 max_items: int | None = EASE_MAX_ITEMS) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        self.max_items = max_items
        self.l2 = float(l2)
        self.filter_seen = filter_seen
        self.name = name
        self.tuning: dict[str, Any] | None = None
        self._data: _UserItems | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"l2": self.l2, "filter_seen": self.filter_seen, "max_items": self.max_items}

    def fit(self, interactions: pd.DataFrame, catalog: Iterable[str] | None = None) -> EaseRecommender:
        from recloop.model_plane.sources.item_to_item import ease_weights

        self._data = data = _UserItems(interactions, catalog)
        self._seen = data.binary()
        counts = np.asarray(data.counts.sum(axis=0)).ravel()
        self._pop_order = _popularity_order(counts, data.item_ids)
        cols = np.flatnonzero(counts > 0)
        if self.max_items is not None and len(cols) > self.max_items:
            cols = np.sort(cols[np.argsort(-counts[cols], kind="stable")[: self.max_items]])
        self._cols = cols
        self._gram = None
        self._b = ease_weights(self._seen[:, self._cols], self.l2)
        # Items outside the model rank after every covered one, by popularity (a tiny tie-breaker).
        self._rest = None
        if len(cols) < np.count_nonzero(counts):
            rank = np.empty(len(counts), np.float64)
            rank[self._pop_order] = np.arange(len(counts))
            self._rest = (-1e6 - rank).astype(np.float32)
            self._rest[cols] = 0.0
        return self

    def with_l2(self, l2: float) -> EaseRecommender:
        """This fitted EASE with another L2 weight (tuning): the same data and items, the Gram matrix
        computed once and kept for the next weight, only the inversion redone."""
        from recloop.model_plane.sources.item_to_item import ease_weights, gram

        if self._data is None:
            raise RuntimeError("EaseRecommender is not fitted; call fit(interactions) first")
        if float(l2) == self.l2:
            return self
        x = self._seen[:, self._cols]
        if self._gram is None:
            self._gram = gram(x)
        other = copy.copy(self)
        other.l2 = float(l2)
        other._b = ease_weights(x, other.l2, gram_matrix=self._gram)
        return other

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """[users, catalogue] scores of the users at `rows` of the training matrix."""
        from recloop.model_plane.sources.item_to_item import sparse_product

        assert self._data is not None
        out = np.zeros((len(rows), len(self._data.item_ids)), np.float32)
        if self._rest is not None:
            out += self._rest
        out[:, self._cols] = sparse_product(self._seen[rows][:, self._cols], self._b)
        return out

    def recommend(
        self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """At most k videos per user, best first. Users are scored `batch_size` at a time against the whole
        catalogue (None: as many as keep one batch's scores near `SCORE_BATCH_CELLS` floats, at most 2048:
        the scores, their top-k partition and its indices are each users x catalogue, 1.8 GB of indices
        alone for 2048 users at 110k videos)."""
        if self._data is None:
            raise RuntimeError("EaseRecommender is not fitted; call fit(interactions) first")
        data = self._data
        user_ids = [str(u) for u in user_ids]
        out: list[list[str]] = [[] for _ in user_ids]
        if k <= 0 or not len(data.item_ids):
            return out
        extra = data.exclusion_codes(user_ids, exclude)
        rows = data.users.get_indexer(user_ids)
        indptr, indices = self._seen.indptr, self._seen.indices
        for i in np.flatnonzero(rows < 0):
            out[i] = data.item_ids[_first_k_not_excluded(self._pop_order, extra[i], k)].tolist()
        known = np.flatnonzero(rows >= 0)
        n = min(k, len(data.item_ids))
        batch_size = batch_size or max(1, min(2048, SCORE_BATCH_CELLS // len(data.item_ids)))
        for start in range(0, len(known), batch_size):
            batch = known[start : start + batch_size]
            s = self.scores(rows[batch])
            for j, i in enumerate(batch):
                if self.filter_seen:
                    s[j, indices[indptr[rows[i]] : indptr[rows[i] + 1]]] = -np.inf
                s[j, extra[i]] = -np.inf
            top = np.argpartition(-s, n - 1, axis=1)[:, :n]
            order = np.take_along_axis(s, top, axis=1)
            top = np.take_along_axis(top, np.argsort(-order, axis=1, kind="stable"), axis=1)
            for j, i in enumerate(batch):
                picked = top[j][np.isfinite(s[j, top[j]])]
                out[i] = data.item_ids[picked].tolist()
        return out


def tuned_ease_factory(
    grid: Sequence[float] = EASE_GRID, *, valid_fraction: float = 0.1, seed: int = 0, k: int = MAIN_K,
    metric: str = "recall", max_valid_users: int | None = MAX_EVAL_USERS, max_items: int | None = EASE_MAX_ITEMS,
) -> RecommenderFactory:
    """A factory that picks EASE's L2 weight on validation data (the ``valid`` interactions, else a random
    `valid_fraction` of train's pairs), then fits EASE on all of train (at most `max_items` items)."""

    def factory(train: pd.DataFrame, videos: pd.DataFrame, valid: pd.DataFrame | None = None) -> EaseRecommender:
        from recloop.model_plane.sources.item_to_item import climb_grid

        t0 = time.perf_counter()
        catalog = videos["video_id"].astype(str).tolist()
        fit_on, valid_on, source = validation_data(train, valid, valid_fraction, seed)
        users, truth = _relevant(fit_on, valid_on, exclude_seen=True)[:2]
        if max_valid_users is not None and len(users) > max_valid_users:
            pick = np.sort(np.random.default_rng(seed).choice(len(users), max_valid_users, replace=False))
            users, truth = [users[i] for i in pick], [truth[i] for i in pick]
        exclude = SeenItems(fit_on)
        trials: list[dict[str, Any]] = []
        first = EaseRecommender(l2=grid[(len(grid) - 1) // 2], max_items=max_items).fit(fit_on, catalog) if users else None

        def score(l2: float) -> float:
            t1 = time.perf_counter()
            assert first is not None
            rec = first.with_l2(l2)
            value = _metric(rec.recommend(users, k, exclude=exclude), truth, k, metric)
            trials.append({"l2": l2, f"{metric}@{k}": value, "seconds": round(time.perf_counter() - t1, 3)})
            return value

        # Climbing from the grid's middle: 3-4 inversions instead of one per grid value (`climb_grid`).
        best = climb_grid(grid, score)[0] if users else grid[0]
        del first
        rec = EaseRecommender(l2=best, max_items=max_items).fit(train, catalog)
        rec.tuning = {"validation": source, "metric": f"{metric}@{k}", "params": {"l2": best}, "trials": trials,
                      "search": "climb_grid from the grid's middle", "validation_users": len(users),
                      "seconds": round(time.perf_counter() - t0, 3)}
        return rec

    factory.__name__ = "tuned_ease_factory"
    return factory


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
    max_valid_users: int | None = MAX_EVAL_USERS,
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
    max_valid_users: int | None = MAX_EVAL_USERS,
) -> RecommenderFactory:
    """A factory that tunes an ImplicitCFRecommender on validation data, then fits it on all of train.

    Validation data: the ``valid`` interactions when given; otherwise carved from train -- a random
    `valid_fraction` of its (user, video) pairs (`seed`), the model being tuned on the rest. The test
    set is never seen. The fitted recommender carries ``tuning`` (chosen params, trials, seconds).
    """

    def factory(train: pd.DataFrame, videos: pd.DataFrame, valid: pd.DataFrame | None = None) -> ImplicitCFRecommender:
        t0 = time.perf_counter()
        catalog = videos["video_id"].astype(str).tolist()
        fit_on, valid_on, source = validation_data(train, valid, valid_fraction, seed)
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
        "ease": tuned_ease_factory(seed=seed),
    }
    if include_bpr:
        factories["bpr"] = tuned_cf_factory("bpr", bpr_grid, seed=seed)
    return factories


