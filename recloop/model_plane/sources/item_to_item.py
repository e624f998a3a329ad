"""Item-to-item candidates: EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data").

EASE learns an item x item weight matrix B in closed form,

    B = I - P diag(1 / diag(P)),   P = (X^T X + l2 I)^-1,   diag(B) = 0,

and scores a user's items as `x_u B` (x_u: the user's row of X). The same closed form is the `ease`
baseline of `recloop evaluate` (`ease_weights`), so the baseline and the platform's source cannot drift.

The source fits two such models over the same items:

* `B_pos` on positive engagements (what the user liked): the classic EASE;
* `B_watch` on everything watched (every rating, every watch, liked or not): it predicts what a user
  will watch at all, and the positives-only model then tells whether they will like it.

For a user it gives four scores per item: `x_pos B_pos`, `x_watch B_watch`, and the user's negatives
(watched, not liked) through both matrices, `x_neg B_pos` and `x_neg B_watch`. Its candidates are the
top-n of the first two. Items are those watched at least `min_support` times, at most `max_items` of
them (the most watched): B is dense, n_items^2 floats.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recloop.model_plane.history import History

NAME = "item_to_item"
SCORES = ("i2i_pos", "i2i_watch", "i2i_neg", "i2i_watch_neg")


def gram(x: sp.spmatrix, dtype: type = np.float32) -> np.ndarray:
    """X^T X of the user x item matrix `x`, dense (what `ease_weights` inverts, plus l2 I)."""
    return np.asarray((x.T @ x).toarray(), dtype=dtype)


def ease_weights(x: sp.spmatrix, l2: float, *, gram_matrix: np.ndarray | None = None) -> np.ndarray:
    """EASE's closed-form item x item weights (float32) for the user x item matrix `x`.

    G + l2 I is symmetric positive definite, so P is its Cholesky inverse (LAPACK potrf + potri: a
    quarter of the time of a general inverse; float64 when float32 loses definiteness). `gram_matrix`:
    `gram(x)` already computed (tuning tries several l2 on one G; it is copied, not changed)."""
    from scipy.linalg import lapack

    n = x.shape[1]
    if not n:
        return np.zeros((0, 0), np.float32)
    for dtype, potrf, potri in ((np.float32, lapack.spotrf, lapack.spotri), (np.float64, lapack.dpotrf, lapack.dpotri)):
        g = gram_matrix.copy() if gram_matrix is not None and dtype == np.float32 else gram(x, dtype)
        g[np.diag_indices_from(g)] += dtype(l2)
        c, info = potrf(g, lower=1, overwrite_a=1, clean=1)
        if info == 0:
            p, info = potri(c, lower=1, overwrite_c=1)
        if info == 0:
            break
    else:
        raise np.linalg.LinAlgError(f"EASE: the Gram matrix plus {l2} I is not positive definite")
    _mirror_lower(p)
    # LAPACK hands back a Fortran-ordered (column-major) P; P is symmetric, so its transpose is the same
    # matrix in row order, for free. B must be row-major: scoring a user sums B's rows of their items, a
    # contiguous read in row order and a read strided by a whole row per element in column order (27x slower).
    p = p.T if not p.flags.c_contiguous else p
    p /= -np.diag(p).copy()  # B_ij = -P_ij / P_jj, in place: one n x n matrix in memory
    np.fill_diagonal(p, 0.0)
    return p.astype(np.float32, copy=False)


def climb_grid(grid: Sequence[float], score: Callable[[float], float]) -> tuple[float, dict[float, float]]:
    """The grid value with the best `score`, found by climbing from the grid's middle (EASE's validation
    recall is unimodal in its L2 weight: too little shrinkage overfits, too much flattens): score the
    middle and its upper neighbour, walk towards the better side while the score improves strictly, stop at
    the first value that is not better. (best value, {value: score} of the values tried): 3-4 of 6 values
    scored instead of all 6 -- each is an n x n inversion. On a unimodal curve it is the grid's argmax; on
    ties the first value tried wins."""
    values = list(grid)
    if not values:
        raise ValueError("empty grid")
    tried: dict[float, float] = {}

    def at(i: int) -> float:
        if values[i] not in tried:
            tried[values[i]] = float(score(values[i]))
        return tried[values[i]]

    i = (len(values) - 1) // 2
    best = at(i)
    for step in (1, -1):
        moved = False
        while 0 <= i + step < len(values) and at(i + step) > best:
            i += step
            best = tried[values[i]]
            moved = True
        if moved:
            break
    return values[i], tried


def _mirror_lower(p: np.ndarray, block: int = 256) -> None:
    """Copies the lower triangle of the square `p` onto its upper one, in place, by blocks of columns (a
    whole-matrix transpose walks memory with a stride of a row: several times slower at n = 8192, and
    it needs two more n x n copies)."""
    n = p.shape[0]
    for i in range(0, n, block):
        j = min(n, i + block)
        d = p[i:j, i:j]
        d[np.triu_indices(j - i, 1)] = d.T[np.triu_indices(j - i, 1)]
        p[i:j, j:] = p[j:, i:j].T


def item_rows(history: History, config: ItemToItemConfig) -> np.ndarray:
    """The catalog rows the item x item model covers: watched `min_support` times or more, at most
    `max_items` of them (the most watched), in catalog order."""
    support = history.item_watches
    eligible = np.flatnonzero(support >= config.min_support)
    if len(eligible) > config.max_items:
        eligible = eligible[np.argsort(-support[eligible], kind="stable")[: config.max_items]]
    return np.sort(eligible).astype(np.int64)


_BLOCK = 1024  # columns of b per task of `sparse_product`
_PAIRS = 1 << 22  # (pair, user item) terms per step of `_pair_product`
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it starts its own pool when it needs one."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def sparse_product(x: sp.csr_matrix, b: np.ndarray) -> np.ndarray:
    """x @ b (float32) for a sparse binary x and a dense b. For a few rows, the sum of b's selected rows
    (numpy's contiguous row gathers beat scipy's generic sparse x dense product). For many, scipy's
    product by blocks of `_BLOCK` columns of b on a thread per core (scipy releases the GIL): each block
    of b stays in the cache while every row of x reads it, where the whole product reads a row of b
    from memory for each of x's entries (2.4x faster on 2 cores at 8192 items)."""
    global _pool
    if x.shape[0] <= 64:
        out = np.zeros((x.shape[0], b.shape[1]), np.float32)
        for i in range(x.shape[0]):
            cols = x.indices[x.indptr[i] : x.indptr[i + 1]]
            if len(cols):
                out[i] = b[cols].sum(axis=0)
        return out
    out = np.empty((x.shape[0], b.shape[1]), np.float32)
    x = x.astype(b.dtype, copy=False)

    def block(start: int) -> None:
        out[:, start : start + _BLOCK] = x @ np.ascontiguousarray(b[:, start : start + _BLOCK])

    starts = range(0, b.shape[1], _BLOCK)
    if len(starts) == 1 or (os.cpu_count() or 1) == 1:
        for start in starts:
            block(start)
        return out
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8), thread_name_prefix="recloop-ease")
        pool = _pool
    for done in [pool.submit(block, start) for start in starts]:
        done.result()
    return out


def _pair_product(x: sp.csr_matrix, b: np.ndarray, users: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(x @ b)[users, cols] without the rest of the product: for each pair, the sum of b[j, col] over the
    user's items j (weighted by x), at most `_PAIRS` terms at a time (heavy users have thousands of items)."""
    indptr = x.indptr.astype(np.int64)
    counts = indptr[users + 1] - indptr[users]
    ends = np.cumsum(counts)
    out = np.zeros(len(users), np.float32)
    lo = 0
    while lo < len(users):
        done = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, done + _PAIRS, side="right")))
        n = counts[lo:hi]
        total = int(n.sum())
        if total:
            pair = np.repeat(np.arange(hi - lo), n)
            idx = np.repeat(indptr[users[lo:hi]] - (np.cumsum(n) - n), n) + np.arange(total)
            out[lo:hi] = np.bincount(pair, weights=x.data[idx] * b[x.indices[idx], cols[lo:hi][pair]], minlength=hi - lo)
        lo = hi
    return out


@dataclass
class ItemScores:
    """One batch's item-to-item scores (`ItemToItem.scores`). `dense`: `i2i_pos` and `i2i_watch`, [users, m]
    over the model's items, which pick the candidates. The user's negatives (watched, not liked) through
    both matrices, `i2i_neg` and `i2i_watch_neg`, are ranker features only: `at` computes them for the
    candidate pairs alone, a few hundred columns per user instead of two more dense products."""

    dense: dict[str, np.ndarray]
    negatives: sp.csr_matrix  # [users, m]
    model: "ItemToItem"

    def __getitem__(self, key: str) -> np.ndarray:
        return self.dense[key]

    def at(self, users: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
        """Every score (`SCORES` order) of the pairs (user position in the batch, model column)."""
        return {"i2i_pos": self.dense["i2i_pos"][users, cols], "i2i_watch": self.dense["i2i_watch"][users, cols],
                "i2i_neg": _pair_product(self.negatives, self.model.b_pos, users, cols),
                "i2i_watch_neg": _pair_product(self.negatives, self.model.b_watch, users, cols)}


@dataclass(frozen=True)
class ItemToItemConfig:
    l2_positive: float = 100.0
    l2_watched: float = 200.0
    min_support: int = 2  # watches an item needs to enter the item x item model
    max_items: int = 8192
    n_candidates: int = 200  # per score (positives, watched)


@dataclass
class ItemToItem:
    """The fitted EASE pair over `item_rows` (rows of the history's catalog)."""

    config: ItemToItemConfig
    item_rows: np.ndarray  # int64 catalog rows of the model's items
    b_pos: np.ndarray  # [m, m] float32
    b_watch: np.ndarray
    fit_seconds: float = 0.0
    name: str = NAME

    @classmethod
    def fit(cls, history: History, config: ItemToItemConfig | None = None) -> "ItemToItem":
        config = config or ItemToItemConfig()
        t0 = time.perf_counter()
        rows = item_rows(history, config)
        b_pos = ease_weights(history.positives[:, rows], config.l2_positive) if len(rows) else np.zeros((0, 0), np.float32)
        b_watch = ease_weights(history.watched[:, rows], config.l2_watched) if len(rows) else np.zeros((0, 0), np.float32)
        return cls(config, rows.astype(np.int64), b_pos, b_watch, time.perf_counter() - t0)

    def with_l2(self, history: History, *, l2_positive: float | None = None, l2_watched: float | None = None) -> "ItemToItem":
        """The same items refitted with other L2 weights (tuning)."""
        cfg = ItemToItemConfig(**{**asdict(self.config),
                                  **({"l2_positive": l2_positive} if l2_positive is not None else {}),
                                  **({"l2_watched": l2_watched} if l2_watched is not None else {})})
        b_pos = ease_weights(history.positives[:, self.item_rows], cfg.l2_positive) if l2_positive is not None else self.b_pos
        b_watch = ease_weights(history.watched[:, self.item_rows], cfg.l2_watched) if l2_watched is not None else self.b_watch
        return ItemToItem(cfg, self.item_rows, b_pos, b_watch, self.fit_seconds)

    def columns(self, x: sp.csr_matrix) -> sp.csr_matrix:
        """`x` (users x catalog) restricted to the model's items, in their order (a column map, cheaper
        than scipy's column indexing for the few rows of a request)."""
        n_catalog = x.shape[1]
        if getattr(self, "_col", None) is None or len(self._col) != n_catalog:
            col = np.full(n_catalog, -1, np.int64)
            col[self.item_rows[self.item_rows < n_catalog]] = np.arange(int((self.item_rows < n_catalog).sum()))
            self._col = col
        coo = x.tocoo()
        c = self._col[coo.col]
        ok = c >= 0
        return sp.csr_matrix((coo.data[ok], (coo.row[ok], c[ok])), shape=(x.shape[0], len(self.item_rows)))

    def scores(self, positives: sp.csr_matrix, watched: sp.csr_matrix) -> "ItemScores":
        """The item-to-item scores of users given by their rows of the history's positive and watched
        matrices (all catalog columns): `i2i_pos` and `i2i_watch` dense over the model's items (they choose
        the candidates), the negatives' two scores only where asked (`ItemScores.at`)."""
        xp = self.columns(positives)
        xw = self.columns(watched)
        xn = xw - xp
        xn.data = np.maximum(xn.data, 0)
        xn.eliminate_zeros()
        return ItemScores({"i2i_pos": sparse_product(xp, self.b_pos), "i2i_watch": sparse_product(xw, self.b_watch)}, xn, self)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # float16 halves the bundle; the ranking it gives is the same (checked on MovieLens). Not zlib-
        # compressed: EASE's float16 weights shrink by only ~15 % (229 vs 268 MB at 8192 items) for ~16 s
        # of CPU per save and 2.5x the load time (every evaluation, champion comparison and server start).
        np.savez(directory / "ease.npz", item_rows=self.item_rows,
                 b_pos=self.b_pos.astype(np.float16), b_watch=self.b_watch.astype(np.float16))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: Path) -> "ItemToItem":
        data = np.load(directory / "ease.npz")
        config = ItemToItemConfig(**json.loads((directory / "config.json").read_text()))
        # Row-major float32 (bundles written before B was row-major hold it column-major).
        return cls(config, data["item_rows"].astype(np.int64), np.ascontiguousarray(data["b_pos"], dtype=np.float32),
                   np.ascontiguousarray(data["b_watch"], dtype=np.float32))
