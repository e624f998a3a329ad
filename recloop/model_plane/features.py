"""The ranker's features: one row per (user, candidate video), computed the same way for training rows
(candidates of a held-out period or fold), offline evaluation and serving.

| group | features |
|---|---|
| sources | each source's score of the pair (`i2i_pos`, `i2i_watch`, `i2i_neg`, `i2i_watch_neg`, `tt_score`), its rank in the user's candidate list, the EASE score relative to the user's best, which sources proposed it (`in_*`) |
| video | positives, watches and impressions (log), like and watch rates, positives within 7 / 30 / 365 days of the user's time, age, first event relative to the user's time |
| user | positives and watches (log), like rate, days since the last event |
| affinity | the user's share of positives in the video's category and (mean over the video's tags) tags |
| feature store | Feast's `ranking_features` service (`user_activity`, `user_category_affinity`, `video_popularity`) when the recommender has a store (`StoreFeatures`); absent for files |

"The user's time" is the history's cutoff (time splits, serving: what was known at the moment of
recommending) or, for random splits of a ratings file, the median time of the user's own events (when
they were active, so that "popular then" means something for a user who rated movies in 1998).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recloop.model_plane.history import US_PER_DAY, History

SOURCE_SCORES = ("i2i_pos", "i2i_watch", "i2i_neg", "i2i_watch_neg", "tt_score")
RANKED = ("i2i_pos", "i2i_watch", "tt_score")
WINDOWS_DAYS = (7, 30, 365)
BASE_FEATURES: tuple[str, ...] = (
    *SOURCE_SCORES,
    *(f"{s}_rank" for s in RANKED),
    "i2i_pos_norm", "i2i_watch_norm",
    "in_item_to_item", "in_two_tower", "in_popular", "in_fresh",
    "item_log_pos", "item_log_watch", "item_log_impressions", "item_pos_rate", "item_watch_rate",
    *(f"item_pos_{w}d" for w in WINDOWS_DAYS),
    "item_age_days", "item_first_days",
    "user_log_pos", "user_log_watch", "user_pos_rate", "user_days_since_last",
    "category_share", "tag_share",
)


SOURCE_NAMES: tuple[str, ...] = ("item_to_item", "two_tower", "popular", "fresh")  # = sources.SOURCES


class StoreFeatures(Protocol):
    """Feature-store columns (Feast's full names `<view>__<feature>`) for (user, video, category) rows
    as of a time: Feast's historical retrieval offline (`recloop.model_plane.store.FeastHistorical`, or
    `LakeSnapshots` without Feast), Feast online at serving. `lookup` returns [rows, len(columns)]."""

    columns: list[str]

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> np.ndarray:
        ...


@dataclass
class CandidateScores:
    """One batch of candidates, grouped by user: `user` (position in `batch`, ascending), `item` (catalog
    row), `source` (code into SOURCE_NAMES: the first source that proposed it), `flags` ([n, sources]:
    which sources proposed it), `scores` (each source's score, absent when the recommender has no such
    source); `batch` the users (`recloop.model_plane.recommender.UserBatch`). Plain arrays: the same code
    runs for 500 users offline and for one request at serving, where per-call overheads are the cost."""

    batch: Any
    user: np.ndarray
    item: np.ndarray
    source: np.ndarray
    flags: np.ndarray
    scores: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> "CandidateScores":
        return CandidateScores(self.batch, self.user[mask], self.item[mask], self.source[mask], self.flags[mask],
                               {k: v[mask] for k, v in self.scores.items()})

    def source_names(self) -> np.ndarray:
        return np.asarray(SOURCE_NAMES, dtype=object)[self.source]

    def frame(self) -> pd.DataFrame:
        """For inspection: `user`, `item`, `source` and the scores."""
        return pd.DataFrame({"user": self.user, "item": self.item, "source": self.source_names(), **self.scores})


@dataclass
class FeatureMatrix:
    """The ranker's input: float32 [rows, len(names)]."""

    values: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.values)

    def columns(self, names: list[str]) -> np.ndarray:
        where = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise ValueError(f"the ranker needs features this input does not have: {missing}")
        return self.values[:, [where[n] for n in names]]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, columns=self.names, copy=False)


def user_times(history: History, user_rows: np.ndarray, user_time: str) -> np.ndarray:
    """The time (microseconds) each user's features are taken at; see the module docstring."""
    cutoff = np.full(len(user_rows), float(history.cutoff_us))
    if user_time == "cutoff":
        return cutoff
    if user_time == "median":
        t = np.where(user_rows >= 0, history.user_median_us[np.maximum(user_rows, 0)], np.nan)
        return np.where(np.isfinite(t), t, cutoff)
    raise ValueError(f"user_time must be 'cutoff' or 'median', got {user_time!r}")


def _group_starts(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start of each user's run, each row's run start) for rows sorted by user."""
    if not len(users):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], change])
    return starts, np.repeat(starts, np.diff(np.append(starts, len(users))))


def _rank_within(users: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based rank of each value among its user's values, largest first; NaN ranks last."""
    v = np.where(np.isfinite(values), values, -np.inf)
    order = np.lexsort((-v, users))
    _, row_start = _group_starts(users[order])
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values)) - row_start + 1
    return rank


def _user_max(users: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each row's user's largest finite value (-inf when none); rows sorted by user."""
    starts, _ = _group_starts(users)
    if not len(starts):
        return np.zeros(0)
    best = np.maximum.reduceat(np.where(np.isfinite(values), values, -np.inf), starts)
    return np.repeat(best, np.diff(np.append(starts, len(users))))


def _log(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))


def _shares(m: sp.spmatrix) -> np.ndarray:
    """Dense rows of `m` divided by their sums (a user's shares of categories or tags)."""
    d = np.asarray(m.todense(), np.float64) if sp.issparse(m) else np.asarray(m, np.float64)
    return d / np.maximum(d.sum(axis=1, keepdims=True), 1e-12)


def _tag_share(user_tags: np.ndarray, tags: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per row, the mean over the item's tags of the user's share of that tag (NaN without tags)."""
    starts, ends = tags.indptr[items], tags.indptr[items + 1]
    counts = ends - starts
    total = int(counts.sum())
    out = np.full(len(items), np.nan)
    if not total:
        return out
    row = np.repeat(np.arange(len(items)), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    tag = tags.indices[np.repeat(starts, counts) + offset]
    sums = np.bincount(row, weights=user_tags[users[row], tag], minlength=len(items))
    has = counts > 0
    out[has] = sums[has] / counts[has]
    return out


VIDEO_FEATURES: tuple[str, ...] = (
    "item_log_pos", "item_log_watch", "item_log_impressions", "item_pos_rate", "item_watch_rate",
    *(f"item_pos_{w}d" for w in WINDOWS_DAYS), "item_age_days", "item_first_days",
)


def _video_block(history: History, items: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The video features (`VIDEO_FEATURES`) of `items`, each as of its row's user time `t`."""
    pos, watch, imp = history.item_positives[items], history.item_watches[items], history.item_impressions[items]
    out = np.empty((len(items), len(VIDEO_FEATURES)))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 0], out[:, 1], out[:, 2] = _log(pos), _log(watch), _log(imp)
        out[:, 3] = np.where(watch > 0, pos / watch, np.nan)
        out[:, 4] = np.where(imp > 0, watch / imp, np.nan)
        for j, w in enumerate(WINDOWS_DAYS):
            out[:, 5 + j] = _log(history.item_positives_between(items, t - w * US_PER_DAY, t + w * US_PER_DAY))
        out[:, -2] = _log((t - history.upload_us[items]) / US_PER_DAY)
        out[:, -1] = (history.item_first_us[items] - t) / US_PER_DAY
    return out


def _cutoff_block(history: History) -> np.ndarray:
    """`_video_block` of every video at the history's cutoff, computed once per history (kept on the
    instance, as `functools.cached_property` keeps its values)."""
    block = history.__dict__.get("_cutoff_video_block")
    if block is None:
        n = len(history.items)
        block = _video_block(history, np.arange(n), np.full(n, float(history.cutoff_us)))
        history.__dict__["_cutoff_video_block"] = block
    return block


def ranker_features(history: History, cands: CandidateScores, user_time: str = "cutoff",
                    store: StoreFeatures | None = None) -> FeatureMatrix:
    """The feature matrix (`BASE_FEATURES`, plus the store's columns) of `cands`."""
    batch = cands.batch
    pos_users = cands.user
    user_rows = np.asarray(batch.rows, np.int64)
    users = user_rows[pos_users]
    known = users >= 0
    items = cands.item
    n = len(items)
    names = list(BASE_FEATURES) + (list(store.columns) if store is not None else [])
    x = np.empty((n, len(names)), np.float32)
    col = {name: j for j, name in enumerate(names)}

    def put(name: str, values: np.ndarray | float) -> None:
        x[:, col[name]] = values

    for key in SOURCE_SCORES:
        put(key, cands.scores[key] if key in cands.scores else np.nan)
    for key in RANKED:
        put(f"{key}_rank", _rank_within(pos_users, cands.scores[key]) if key in cands.scores else np.nan)
    for key in ("i2i_pos", "i2i_watch"):
        if key in cands.scores:
            v = cands.scores[key].astype(np.float64)
            best = _user_max(pos_users, v)
            put(f"{key}_norm", np.where(best > 0, v / np.where(best > 0, best, 1.0), np.nan))
        else:
            put(f"{key}_norm", np.nan)
    for j, source in enumerate(SOURCE_NAMES):
        put(f"in_{source}", cands.flags[:, j])

    if user_time == "cutoff":  # every row's time is the cutoff: the video block is one table per history
        block = _cutoff_block(history)[items]
    else:
        block = _video_block(history, items, user_times(history, user_rows, user_time)[pos_users])
    x[:, [col[name] for name in VIDEO_FEATURES]] = block
    with np.errstate(invalid="ignore", divide="ignore"):
        # The user's own numbers come from the batch (history rows, plus what serving saw since).
        upos = np.diff(batch.positives.indptr)[pos_users].astype(np.float64)
        uwatch = np.diff(batch.watched.indptr)[pos_users].astype(np.float64)
        put("user_log_pos", _log(upos))
        put("user_log_watch", _log(uwatch))
        put("user_pos_rate", np.where(uwatch > 0, upos / uwatch, np.nan))
        last = np.where(known, history.user_last_us[np.maximum(users, 0)], np.nan)
        put("user_days_since_last", _log((history.cutoff_us - last) / US_PER_DAY))
    cats = _shares(batch.positives @ history.item_category_matrix)
    put("category_share", cats[pos_users, history.item_category[items]] if n else 0.0)
    tags = history.item_tags
    put("tag_share", _tag_share(_shares(batch.positives @ tags), tags, pos_users, items))
    if store is not None and n:
        ids = (batch.user_ids if getattr(batch, "user_ids", None) is not None
               else history.users[np.maximum(user_rows, 0)].to_numpy(dtype=object))
        values = store.lookup(np.asarray(ids, dtype=object)[pos_users], history.item_ids[items],
                              history.catalog_categories[items], history.cutoff_us)
        x[:, len(BASE_FEATURES):] = np.asarray(values, np.float32)
    return FeatureMatrix(x, names)
