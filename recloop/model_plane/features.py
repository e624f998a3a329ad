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


class StoreFeatures(Protocol):
    """Feature-store columns (Feast's full names `<view>__<feature>`) for (user, video, category) rows
    as of a time: a lake snapshot offline (`recloop.model_plane.store.LakeSnapshots`), Feast online at
    serving."""

    columns: list[str]

    def lookup(self, user_ids: np.ndarray, video_ids: np.ndarray, categories: np.ndarray, at_us: int) -> pd.DataFrame:
        ...


@dataclass
class CandidateScores:
    """One batch of candidates: `frame` holds `user` (position in the batch), `item` (catalog row),
    `source` (the first source that proposed it) and `in_<source>` flags; `scores` each source's score
    aligned with `frame` (absent when the recommender has no such source); `batch` the users
    (`recloop.model_plane.recommender.UserBatch`)."""

    batch: Any
    frame: pd.DataFrame
    scores: dict[str, np.ndarray]


def user_times(history: History, user_rows: np.ndarray, user_time: str) -> np.ndarray:
    """The time (microseconds) each user's features are taken at; see the module docstring."""
    cutoff = np.full(len(user_rows), float(history.cutoff_us))
    if user_time == "cutoff":
        return cutoff
    if user_time == "median":
        t = np.where(user_rows >= 0, history.user_median_us[np.maximum(user_rows, 0)], np.nan)
        return np.where(np.isfinite(t), t, cutoff)
    raise ValueError(f"user_time must be 'cutoff' or 'median', got {user_time!r}")


def _rank_within(users: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based rank of each value among its user's values, largest first; NaN ranks last."""
    v = np.where(np.isfinite(values), values, -np.inf)
    order = np.lexsort((-v, users))
    starts = np.searchsorted(users[order], users[order], side="left")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values)) - starts + 1
    return rank


def _log(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))


def _pair_dot(a, b, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Row-wise dot products a[rows_a[j]] . b[rows_b[j]] of two sparse matrices."""
    if not len(rows_a):
        return np.zeros(0)
    return np.asarray(a[rows_a].multiply(b[rows_b]).sum(axis=1)).ravel()


def _one_hot(codes: np.ndarray, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), codes)), shape=(n, int(codes.max()) + 1 if n else 1))


def _row_share(m: Any) -> sp.csr_matrix:
    m = sp.csr_matrix(m)
    totals = np.asarray(m.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(totals, 1e-12)) @ m)


def ranker_features(history: History, cands: CandidateScores, user_time: str = "cutoff",
                    store: StoreFeatures | None = None) -> pd.DataFrame:
    """The feature frame (columns `BASE_FEATURES`, plus the store's columns) of `cands`."""
    f = cands.frame
    batch = cands.batch
    pos_users = f["user"].to_numpy(np.int64)
    user_rows = np.asarray(batch.rows, np.int64)
    users = user_rows[pos_users]
    known = users >= 0
    items = f["item"].to_numpy(np.int64)
    n = len(f)
    out: dict[str, np.ndarray] = {}
    for key in SOURCE_SCORES:
        out[key] = cands.scores.get(key, np.full(n, np.nan, np.float32)).astype(np.float64)
    for key in RANKED:
        out[f"{key}_rank"] = _rank_within(pos_users, out[key]) if key in cands.scores else np.full(n, np.nan)
    for key in ("i2i_pos", "i2i_watch"):
        v = out[key]
        best = pd.Series(np.where(np.isfinite(v), v, -np.inf)).groupby(pos_users).transform("max").to_numpy()
        out[f"{key}_norm"] = np.where(best > 0, v / np.where(best > 0, best, 1.0), np.nan)
    for source in ("item_to_item", "two_tower", "popular", "fresh"):
        out[f"in_{source}"] = f[f"in_{source}"].to_numpy(np.float64) if f"in_{source}" in f else np.zeros(n)

    t = user_times(history, user_rows, user_time)[pos_users]
    pos, watch, imp = history.item_positives[items], history.item_watches[items], history.item_impressions[items]
    out["item_log_pos"], out["item_log_watch"], out["item_log_impressions"] = _log(pos), _log(watch), _log(imp)
    out["item_pos_rate"] = np.where(watch > 0, pos / np.maximum(watch, 1), np.nan)
    out["item_watch_rate"] = np.where(imp > 0, watch / np.maximum(imp, 1), np.nan)
    for w in WINDOWS_DAYS:
        out[f"item_pos_{w}d"] = _log(history.item_positives_between(items, t - w * US_PER_DAY, t + w * US_PER_DAY))
    out["item_age_days"] = _log((t - history.upload_us[items]) / US_PER_DAY)
    out["item_first_days"] = (history.item_first_us[items] - t) / US_PER_DAY
    # The user's own numbers come from the batch (history rows, plus what serving saw since).
    upos = np.asarray(batch.positives.sum(axis=1)).ravel()[pos_users]
    uwatch = np.asarray(batch.watched.sum(axis=1)).ravel()[pos_users]
    out["user_log_pos"], out["user_log_watch"] = _log(upos), _log(uwatch)
    out["user_pos_rate"] = np.where(uwatch > 0, upos / np.maximum(uwatch, 1), np.nan)
    last = np.where(known, history.user_last_us[np.maximum(users, 0)], np.nan)
    out["user_days_since_last"] = _log((history.cutoff_us - last) / US_PER_DAY)
    cats = history.item_category
    cat_share = _row_share(batch.positives @ _one_hot(cats, len(history.items)))
    out["category_share"] = np.asarray(cat_share[pos_users, cats[items]]).ravel() if n else np.zeros(0)
    tags = history.item_tags
    tag_share = _row_share(batch.positives @ tags)
    n_tags = np.diff(tags.indptr)[items]
    out["tag_share"] = np.where(n_tags > 0, _pair_dot(tag_share, tags, pos_users, items) / np.maximum(n_tags, 1), np.nan)
    frame = pd.DataFrame(out)
    if store is not None:
        categories = history.catalog["category"].to_numpy(dtype=object)[items]
        ids = batch.user_ids if getattr(batch, "user_ids", None) is not None else history.users[np.maximum(user_rows, 0)].to_numpy(dtype=object)
        extra = store.lookup(np.asarray(ids, dtype=object)[pos_users], history.items[items].to_numpy(dtype=object),
                             categories, history.cutoff_us)
        for c in store.columns:
            frame[c] = pd.to_numeric(extra[c], errors="coerce").to_numpy(np.float64)
    return frame
