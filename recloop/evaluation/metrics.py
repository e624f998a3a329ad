"""Ranking metrics (accuracy at k) and beyond-accuracy metrics (coverage, diversity, novelty,
popularity concentration, identical lists), vectorised over users."""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
MAIN_K = 10
POSITIVE_RATING = 4.0  # ratings files: rating >= 4 is a positive (as recloop.data.movielens maps them)
MOVIELENS_DURATION_S = 6000.0  # recloop.data.movielens.DURATION_S
UNKNOWN_CATEGORY = "unknown"
INTERACTION_COLUMNS = ("user_id", "video_id", "event_time")
ACCURACY_METRICS = ("recall", "ndcg", "map", "hit_rate")
RESULT_FORMAT = 1

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


def _top_popular(item_popularity: Mapping[str, float], top_share: float) -> np.ndarray:
    """Ids of the ceil(top_share x number of items) most popular items (at least 1; ties by item id)."""
    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], got {top_share}")
    pop = _popularity_series(item_popularity)
    ids = pop.index.astype(str).to_numpy()
    order = np.lexsort((ids, -pop.to_numpy()))
    return ids[order[: max(1, math.ceil(top_share * len(pop) - 1e-9))]]


def popularity_concentration(
    recs: Sequence[Sequence[str]], item_popularity: Mapping[str, float], top_share: float = 0.01
) -> float:
    """Share of all recommended slots that go to the top `top_share` most popular items of
    `item_popularity` (ceil(top_share x number of items), at least 1; ties broken by item id)."""
    top = _top_popular(item_popularity, top_share)
    _, _, items = _flatten(recs)
    if not len(items):
        return float("nan")
    return float(np.isin(items.astype(str), top).mean())


def popularity_concentration_stderr(
    recs: Sequence[Sequence[str]], item_popularity: Mapping[str, float], top_share: float = 0.01
) -> float:
    """Standard error of `popularity_concentration` over users (the lists are the sample: the share of
    each list's slots that go to the top items, its standard deviation over lists / sqrt(lists), weighted
    by list length). NaN for fewer than two non-empty lists. The promotion gate reads it so that a
    guardrail judged on a few dozen held-out users does not refuse on sampling noise."""
    top = _top_popular(item_popularity, top_share)
    rows, _, items = _flatten(recs)
    n = np.bincount(rows, minlength=len(recs)).astype(np.float64)
    ok = n > 0
    if ok.sum() < 2:
        return float("nan")
    hits = np.bincount(rows, weights=np.isin(items.astype(str), top).astype(np.float64), minlength=len(recs))
    share, w = hits[ok] / n[ok], n[ok]
    mean = float((share * w).sum() / w.sum())
    # Ratio-estimator variance of a mean of per-list shares weighted by list length.
    var = float((w**2 * (share - mean) ** 2).sum() / (w.sum() ** 2) * ok.sum() / (ok.sum() - 1))
    return math.sqrt(var)


def identical_list_share(recs: Sequence[Sequence[str]]) -> float:
    """Share of users whose list equals the most common list (1.0: everybody gets the same list -- the
    degenerate-model guard)."""
    if not len(recs):
        return float("nan")
    counts = Counter(tuple(r) for r in recs)
    return counts.most_common(1)[0][1] / len(recs)


