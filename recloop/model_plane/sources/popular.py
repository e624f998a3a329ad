"""Popular and fresh candidates: the same short lists for every user (cold start, exploration of new
uploads), and the fallback for a user the model does not know."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recloop.model_plane.history import US_PER_DAY, History

POPULAR = "popular"
FRESH = "fresh"


@dataclass(frozen=True)
class Popular:
    """The items with the most positives in the last `days` days before the cutoff (all of the history
    when that leaves fewer than `n`), most popular first; ties by catalog order."""

    rows: np.ndarray
    days: float
    name: str = POPULAR

    @classmethod
    def fit(cls, history: History, *, n: int = 50, days: float = 28.0) -> "Popular":
        recent = history.ev_positive & (history.ev_time >= history.cutoff_us - days * US_PER_DAY)
        counts = np.bincount(history.ev_item[recent], minlength=len(history.items))
        if (counts > 0).sum() < n:
            counts = history.item_positives
        order = np.lexsort((np.arange(len(counts)), -counts))
        return cls(order[: min(n, int((counts > 0).sum()))].astype(np.int64), days)


@dataclass(frozen=True)
class Fresh:
    """The `n` newest uploads before the cutoff."""

    rows: np.ndarray
    name: str = FRESH

    @classmethod
    def fit(cls, history: History, *, n: int = 50) -> "Fresh":
        up = history.upload_us
        live = np.flatnonzero(np.isfinite(up) & (up < history.cutoff_us))
        order = live[np.lexsort((live, -up[live]))]
        return cls(order[:n].astype(np.int64))
