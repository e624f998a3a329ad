"""The training loop of the multi-stage recommender: `fit_recommender(history, valid=...)`.

The ranker must learn from candidate lists that look like the ones it will rank: lists built by sources
that have NOT seen the positives the ranker is taught to find. So the sources are fitted several times:

* **folds**: the history is cut into label folds; for each, the sources are fitted on the rest of the
  history and propose candidates for the fold's users; a candidate is a positive of its list when the
  user liked it in the fold. Time splits (the lifecycle: train on the past, test on the next days) cut
  by time: fold k holds the positives of a period and the sources see only what came before it, so
  recency matters as it will when serving. Random splits (a ratings file split at random) cut the
  user x video pairs at random, K times.
* **validation**: candidate lists of the validation users (the `valid` positives given, or the newest
  time fold) from sources fitted on everything before; it tunes the EASE L2 weights and stops the
  ranker's boosting (NDCG@10).
* **final**: the sources refitted on the whole history; the ranker as trained (time splits: refitted on
  the validation fold too, with the number of rounds validation chose, so the newest period counts).

The report (`FitReport`) records what a practitioner looks at: the L2 weights tried and chosen, each
source's recall of the validation positives (and of their union: the ranker's ceiling), the ranker's
per-round NDCG curves, its feature importances and the time of every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recloop.model_plane.features import BASE_FEATURES, StoreFeatures, ranker_features
from recloop.model_plane.history import History
from recloop.model_plane.ranker import Ranker, RankerConfig
from recloop.model_plane.recommender import CandidateConfig, MultiStageRecommender
from recloop.model_plane.sources import Fresh, ItemToItem, ItemToItemConfig, Popular, TwoTowerSource
from recloop.model_plane.sources.item_to_item import climb_grid, ease_weights, gram, item_rows, sparse_product

log = logging.getLogger(__name__)

L2_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)


class NotEnoughData(ValueError):
    """The history is too small to fit the recommender (said in one sentence, with the numbers)."""


@dataclass(frozen=True)
class FitConfig:
    split: str = "time"  # "time" (label folds by period) or "random" (random pair folds)
    folds: int = 5  # label folds the ranker trains on
    fold_share: float = 0.1  # time split: the share of the history's positives in each fold
    l2_grid: tuple[float, ...] = L2_GRID  # EASE L2 weights tried on validation (empty: keep the config's)
    item_to_item: ItemToItemConfig = field(default_factory=ItemToItemConfig)
    two_tower: Any = None  # a recloop.training.TwoTowerConfig; None: no two-tower source
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    max_users_per_fold: int = 5000  # users whose lists train the ranker, per fold (sampled)
    negatives_per_list: int | None = 150  # negatives kept per training list (all its positives are kept)
    seed: int = 0


@dataclass
class Labels:
    """Held-out positives: the (user row, item row) pairs a list should find, over a history's indices."""

    user: np.ndarray
    item: np.ndarray

    @classmethod
    def of(cls, history: History, mask: np.ndarray) -> "Labels":
        m = mask & history.ev_positive
        pairs = np.unique(history.ev_user[m].astype(np.int64) * len(history.items) + history.ev_item[m])
        return cls(pairs // len(history.items), pairs % len(history.items))

    @classmethod
    def from_pairs(cls, history: History, user_ids: Any, video_ids: Any) -> "Labels":
        u = history.users.get_indexer(pd.Index(np.asarray(user_ids, dtype=object), dtype=object))
        i = history.items.get_indexer(pd.Index(np.asarray(video_ids, dtype=object), dtype=object))
        ok = (u >= 0) & (i >= 0)
        pairs = np.unique(u[ok].astype(np.int64) * len(history.items) + i[ok])
        return cls(pairs // len(history.items), pairs % len(history.items))

    def users(self) -> np.ndarray:
        return np.unique(self.user)

    def keys(self, n_items: int) -> np.ndarray:
        return self.user * n_items + self.item


@dataclass
class FitReport:
    split: str
    folds: list[dict[str, Any]] = field(default_factory=list)
    l2: dict[str, Any] = field(default_factory=dict)
    source_recall: dict[str, float] = field(default_factory=dict)
    ranker: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    two_tower: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    recommender: MultiStageRecommender
    report: FitReport


def fit_sources(history: History, config: FitConfig, *, l2: dict[str, float] | None = None,
                two_tower: Any = None, item_to_item: ItemToItem | None = None) -> dict[str, Any]:
    """Every candidate source fitted on `history` (with the chosen L2 weights); `two_tower` and
    `item_to_item` reuse already fitted models (of this history)."""
    i2i_cfg = config.item_to_item
    if l2:
        i2i_cfg = ItemToItemConfig(**{**asdict(i2i_cfg), **l2})
    parts: dict[str, Any] = {"item_to_item": item_to_item or ItemToItem.fit(history, i2i_cfg)}
    if two_tower is not None:
        parts["two_tower"] = two_tower
    elif config.two_tower is not None:
        parts["two_tower"] = TwoTowerSource.fit(history, config.two_tower, n_candidates=config.candidates.n_two_tower)
    else:
        parts["two_tower"] = None
    parts["popular"] = Popular.fit(history, n=config.candidates.n_popular, days=config.candidates.popular_days)
    parts["fresh"] = Fresh.fit(history, n=config.candidates.n_fresh)
    return parts


def _recommender(history: History, parts: dict[str, Any], config: FitConfig, ranker: Ranker | None,
                 store: StoreFeatures | None, mode: str = "ranker") -> MultiStageRecommender:
    return MultiStageRecommender(history, parts["item_to_item"], parts["two_tower"], parts["popular"], parts["fresh"],
                                 ranker, config.candidates, store, mode=mode)


def candidate_rows(rec: MultiStageRecommender, labels: Labels, users: np.ndarray, *, query: str = "",
                   batch: int = 512) -> pd.DataFrame:
    """Feature rows of the candidate lists of `users` (history rows) with `label` (1: a held-out
    positive) and `query` (one id per list)."""
    n_items = len(rec.history.items)
    truth = labels.keys(n_items)
    prefetch = getattr(rec.store, "prefetch", None)
    if prefetch is not None and len(users):
        h = rec.history
        prefetch(h.users[users].to_numpy(dtype=object), h.items.to_numpy(dtype=object),
                 h.catalog["category"].astype(str).to_numpy(dtype=object), h.cutoff_us)
    frames = []
    for s in range(0, len(users), batch):
        rows = users[s : s + batch]
        cands = rec.candidate_scores(rec.user_batch(rows))
        if not len(cands):
            continue
        x = ranker_features(rec.history, cands, rec.config.user_time, rec.store).frame()
        u = rows[cands.user]
        key = u.astype(np.int64) * n_items + cands.item
        x["label"] = np.isin(key, truth).astype(np.int32)
        x["query"] = [f"{query}{v}" for v in u] if query else u
        x["_user"], x["_item"], x["_source"] = u, cands.item, cands.source_names()
        frames.append(x)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*BASE_FEATURES, "label", "query"])


def _groups(frame: pd.DataFrame, negatives: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows sorted by query (only queries with a positive and a negative: the others teach nothing);
    with `negatives`, each list keeps all its positives and at most that many negatives (a seeded
    sample: LambdaRank learns the order of positives above negatives, and a few hundred negatives of
    the same list say as much as all of them, for a fraction of the time)."""
    stats = frame.groupby("query")["label"].agg(["sum", "size"])
    useful = stats.index[(stats["sum"] > 0) & (stats["sum"] < stats["size"])]
    f = frame[frame["query"].isin(useful)]
    if negatives is not None and len(f):
        positive = f["label"].to_numpy() > 0
        noise = pd.Series(np.random.default_rng(seed).random(len(f)), index=f.index)[~positive]
        rank = noise.groupby(f.loc[~positive, "query"].to_numpy()).rank(method="first")
        f = f[positive | f.index.isin(rank.index[rank.to_numpy() <= negatives])]
    f = f.sort_values("query", kind="stable").reset_index(drop=True)
    return f, f.groupby("query", sort=False).size().to_numpy()


def source_recall(rows: pd.DataFrame, labels: Labels, sources: list[str]) -> dict[str, float]:
    """Share of the held-out positives that each source's candidates (and all of them) contain."""
    if not len(labels.user):
        return {}
    total = len(labels.user)
    out = {s: float(rows.loc[rows[f"in_{s}"] > 0, "label"].sum() / total) for s in sources}
    out["all_candidates"] = float(rows["label"].sum() / total)
    return out


def _sample(users: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(users) <= n:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, n, replace=False))


def _tune_l2(history: History, labels: Labels, users: np.ndarray, config: FitConfig,
             report: FitReport) -> tuple[dict[str, float], ItemToItem | None]:
    """The EASE L2 weights (positives, watched) with the best recall@10 of the validation positives, and
    the item-to-item model of `history` with those weights (fitted while tuning: not fitted again).

    Each weight is tuned on its own matrix and score (`l2_positive`: the positives' EASE and `i2i_pos`;
    `l2_watched`: the watched one and `i2i_watch`), by `climb_grid` over `l2_grid` from its middle: 3-4
    inversions per weight instead of one per grid value, each on the Gram matrix computed once."""
    if not config.l2_grid or not len(users):
        return {}, None
    t0 = time.perf_counter()
    rows = item_rows(history, config.item_to_item)
    n_items = len(history.items)
    truth = labels.keys(n_items)
    per_user = np.bincount(labels.user, minlength=len(history.users))[users]
    seen = history.seen[users][:, rows].nonzero()
    keys = users[:, None].astype(np.int64) * n_items
    chosen: dict[str, float] = {}
    trials: dict[str, dict[str, float]] = {}
    weights: dict[str, np.ndarray] = {}
    for param, matrix in (("l2_positive", history.positives), ("l2_watched", history.watched)):
        x = matrix[:, rows]
        x_users = matrix[users][:, rows]
        g = gram(x)
        best: dict[str, Any] = {"score": -np.inf}

        def recall(l2: float) -> float:
            b = ease_weights(x, l2, gram_matrix=g) if len(rows) else np.zeros((0, 0), np.float32)
            s = sparse_product(x_users, b)
            s[seen] = -np.inf
            k = min(10, s.shape[1])
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k else np.zeros((len(users), 0), np.int64)
            hits = np.isin(keys + rows[top], truth).sum(axis=1)
            score = float(np.mean(hits / np.maximum(per_user, 1)))
            if score > best["score"]:
                best.update(score=score, b=b)
            return score

        value, tried = climb_grid(config.l2_grid, recall)
        chosen[param] = float(value)
        trials[param] = {str(l2): round(v, 5) for l2, v in tried.items()}
        weights[param] = best["b"]
        del g, x, x_users, best
    report.l2 = {"chosen": chosen, "recall_at_10": trials, "search": "climb_grid from the grid's middle"}
    tuned = ItemToItem(ItemToItemConfig(**{**asdict(config.item_to_item), **chosen}), rows.astype(np.int64),
                       weights["l2_positive"], weights["l2_watched"], time.perf_counter() - t0)
    return chosen, tuned


def _time_folds(history: History, config: FitConfig) -> list[int]:
    """Start times of the validation fold and the training folds before it (newest first): each holds
    `fold_share` of the history's positives."""
    times = np.sort(history.ev_time[history.ev_positive])
    if len(times) < 10:
        raise NotEnoughData(f"the training history has {len(times)} positive engagements: too few to train a ranker")
    starts = []
    for j in range(1, config.folds + 2):
        q = max(0.0, 1.0 - j * config.fold_share)
        t = int(times[int(q * (len(times) - 1))])
        if starts and t >= starts[-1]:
            break
        starts.append(t)
    return starts


def fit_recommender(
    history: History,
    *,
    valid: Labels | None = None,
    config: FitConfig | None = None,
    store: StoreFeatures | None = None,
    final_two_tower: TwoTowerSource | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FitResult:
    """The multi-stage recommender fitted on `history` (see the module docstring). `valid`: validation
    positives over `history`'s indices (random splits; time splits use the newest fold when None)."""
    config = config or FitConfig()
    if config.split not in ("time", "random"):
        raise ValueError(f"split must be 'time' or 'random', got {config.split!r}")
    report = FitReport(split=config.split)
    step = on_step or (lambda text: log.info(text))
    t_all = time.perf_counter()
    all_events = np.ones(history.n_events, bool)
    # --- label folds: (history the sources see, labels) ---
    folds: list[tuple[History, Labels, str]] = []
    if config.split == "time":
        starts = _time_folds(history, config)
        ends = [history.cutoff_us, *starts[:-1]]
        if valid is None:
            t_valid = starts[0]
            valid_history, valid = history.before(t_valid), Labels.of(history, history.ev_time >= t_valid)
            train_starts = list(zip(starts[1:], ends[1:]))
        else:
            valid_history = history
            train_starts = list(zip(starts[:-1], ends[:-1]))
        for start, end in train_starts:
            folds.append((history.before(start), Labels.of(history, (history.ev_time >= start) & (history.ev_time < end)),
                          pd.Timestamp(start * 1000, tz="UTC").isoformat()))
    else:
        rng = np.random.default_rng(config.seed)
        pair = history.ev_user.astype(np.int64) * len(history.items) + history.ev_item
        _, inverse = np.unique(pair, return_inverse=True)
        n_pairs = int(inverse.max()) + 1 if len(inverse) else 0
        if valid is None:  # validation carved from the history: a random tenth of its pairs
            carved = (rng.random(n_pairs) < 0.1)[inverse]
            valid_history, valid = history.subset(~carved), Labels.of(history, carved)
        else:
            valid_history = history
        fold_of_pair = rng.integers(0, config.folds, n_pairs)
        fold = fold_of_pair[inverse]
        for k in range(config.folds):
            folds.append((history.subset(fold != k), Labels.of(history, fold == k), f"fold{k}"))
    del all_events

    # --- validation: EASE L2 weights, then the validation candidate lists ---
    t0 = time.perf_counter()
    valid_users = _sample(valid.users(), config.max_users_per_fold, config.seed)
    step(f"tuning the EASE L2 weights on {len(valid_users)} validation users")
    l2, tuned = _tune_l2(valid_history, valid, valid_users, config, report)
    report.seconds["tune_l2"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    step("fitting the candidate sources for validation")
    valid_parts = fit_sources(valid_history, config, l2=l2, item_to_item=tuned)
    valid_rec = _recommender(valid_history, valid_parts, config, None, store, mode="item_to_item")
    valid_rows = candidate_rows(valid_rec, valid, valid_users, query="v:")
    report.source_recall = source_recall(valid_rows, Labels(valid.user[np.isin(valid.user, valid_users)],
                                                             valid.item[np.isin(valid.user, valid_users)]),
                                         valid_rec.sources)
    report.seconds["validation_candidates"] = round(time.perf_counter() - t0, 2)
    # The validation sources serve again only when they are the whole history's (a given `valid`); otherwise
    # they are freed now, not held through the folds (at 10M events: EASE's two matrices and a two-tower).
    reusable = valid_parts if valid_history is history else None
    del valid_parts, valid_rec, tuned

    # --- training folds ---
    train_frames = []
    for k, (fold_history, labels, name) in enumerate(folds):
        t0 = time.perf_counter()
        users = _sample(labels.users(), config.max_users_per_fold, config.seed + k + 1)
        if not len(users):
            continue
        step(f"fold {k + 1}/{len(folds)} ({name}): fitting the sources on {fold_history.n_events:,} events, "
             f"lists for {len(users):,} users")
        parts = fit_sources(fold_history, config, l2=l2)
        rows = candidate_rows(_recommender(fold_history, parts, config, None, store, mode="item_to_item"), labels,
                              users, query=f"{k}:")
        report.folds.append({"name": name, "events": fold_history.n_events, "users": int(len(users)),
                             "rows": int(len(rows)), "positives_in_lists": int(rows["label"].sum()),
                             "held_out_positives": int(len(labels.user)),
                             "seconds": round(time.perf_counter() - t0, 2)})
        # Each fold's lists cut to what the ranker trains on now (useful lists, their positives and at most
        # `negatives_per_list` negatives), not after every fold's full lists are held together.
        train_frames.append(_groups(rows, config.negatives_per_list, config.seed + k)[0])
        del rows, parts
    train = pd.concat(train_frames, ignore_index=True) if train_frames else valid_rows.iloc[:0]
    train_frames.clear()
    features = [f for f in BASE_FEATURES if f in train.columns and train[f].notna().any()]
    if store is not None:
        features += [c for c in store.columns if c in train.columns]
    train, train_groups = _groups(train, config.negatives_per_list, config.seed)
    vrows, valid_groups = _groups(valid_rows)
    if not len(train_groups):
        raise NotEnoughData("no training fold has a candidate list with a held-out positive: the history is too "
                            "small to train the ranker")
    t0 = time.perf_counter()
    step(f"training the LambdaRank ranker on {len(train):,} rows ({len(train_groups):,} lists)")
    ranker = Ranker.fit(train, train_groups, vrows if len(valid_groups) else None, valid_groups, features, config.ranker)
    if config.split == "time" and len(valid_groups):
        # The newest period is the most like the days the model will serve: train on it too, with the
        # number of rounds validation chose.
        both = pd.concat([train, vrows], ignore_index=True)
        both, both_groups = _groups(both, config.negatives_per_list, config.seed)
        refit = Ranker.fit(both, both_groups, None, None, features, config.ranker, rounds=ranker.best_iteration)
        refit.curves = ranker.curves
        ranker = refit
    report.ranker = {"best_iteration": ranker.best_iteration, "train_rows": ranker.train_rows,
                     "valid_rows": int(len(vrows)), "curves": ranker.curves, "importance": ranker.importance(),
                     "features": features}
    report.seconds["ranker"] = round(time.perf_counter() - t0, 2)

    # --- final sources on the whole history ---
    t0 = time.perf_counter()
    if reusable is not None and final_two_tower is None:
        parts = reusable
    elif reusable is not None:
        parts = {**reusable, "two_tower": final_two_tower}
    else:
        step(f"fitting the candidate sources on the whole history ({history.n_events:,} events)")
        parts = fit_sources(history, config, l2=l2, two_tower=final_two_tower)
    if parts.get("two_tower") is not None:
        tt = parts["two_tower"].model
        report.two_tower = {"epoch_losses": [float(x) for x in tt.epoch_losses], "samples_per_s": float(tt.samples_per_s),
                            "examples": int(tt.n_examples), "seconds": round(float(tt.train_seconds), 2)}
    report.seconds["final_sources"] = round(time.perf_counter() - t0, 2)
    report.seconds["total"] = round(time.perf_counter() - t_all, 2)
    return FitResult(_recommender(history, parts, config, ranker, store), report)


