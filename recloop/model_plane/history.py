"""The interaction history the model plane learns from: a training window's events as user x video
matrices, per-video and per-user statistics, and cuts of it (earlier periods, held-out folds).

A `History` is built from a `recloop.training.Window` (the lake's validated days, or a user's files
turned into the canonical tables), so training in the lifecycle and `recloop evaluate` on files read the
same structure. Every event is kept with three flags:

* `watched`: `watched_s > 0` (an impression that was not watched is a real served negative);
* `positive`: recloop's one positive rule (`recloop.data.engagement.positive_mask`: completed, liked, or
  watched at least half of the video; for MovieLens, rating >= 4);
* negatives are the watched events that are not positive (a rating below 4, a skip after a few seconds).

Users and videos are rows of `users` / `items` (pd.Index); all arrays are aligned with them, so a
fold (`subset`) shares the indices of the history it was cut from and its matrices can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recloop.data.engagement import positive_mask

US_PER_DAY = 86_400 * 1_000_000


def to_us(values: Any) -> np.ndarray:
    """Microseconds since the epoch (int64) of timestamps (naive ones are taken as UTC)."""
    t = pd.to_datetime(pd.Series(values) if not isinstance(values, pd.Series) else values, utc=True)
    return t.astype("datetime64[us, UTC]").astype("int64").to_numpy()


def ts_us(value: Any) -> int:
    """Microseconds since the epoch of one timestamp (naive = UTC)."""
    t = pd.Timestamp(value)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value // 1000)


@dataclass(frozen=True)
class History:
    """Events of a window over fixed user and video indices, and the time they are known up to."""

    users: pd.Index  # user ids; row u of every user array
    items: pd.Index  # video ids of the catalog; row i of every video array
    catalog: pd.DataFrame  # VIDEOS columns, one row per item, in `items` order
    user_meta: pd.DataFrame  # USERS columns, one row per user, in `users` order (unknown: "unknown")
    ev_user: np.ndarray  # int32 user row of each event
    ev_item: np.ndarray  # int32 item row of each event
    ev_time: np.ndarray  # int64 microseconds since the epoch, UTC
    ev_watched: np.ndarray  # bool
    ev_positive: np.ndarray  # bool
    cutoff_us: int  # the history holds what was known before this time
    frame: pd.DataFrame  # the window's events (EVENTS columns); event j of the arrays is row ev_row[j]
    ev_row: np.ndarray
    partitions: tuple[str, ...] = ()

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_window(cls, window: Any, *, users: pd.Index | None = None) -> "History":
        """The history of a `recloop.training.Window` (events, videos, users, cutoff). Events of videos
        missing from the catalog are dropped (validation keeps such rows out of silver anyway)."""
        ev = window.events
        catalog = window.videos.drop_duplicates("video_id", keep="last").reset_index(drop=True)
        catalog["video_id"] = catalog["video_id"].astype(str)
        items = pd.Index(catalog["video_id"], dtype=object)
        item = items.get_indexer(pd.Index(ev["video_id"].astype(str), dtype=object))
        duration = pd.to_numeric(catalog["duration_s"], errors="coerce").to_numpy(np.float64)
        positive = positive_mask(ev, np.where(item >= 0, duration[np.maximum(item, 0)], np.nan))
        watched = pd.to_numeric(ev["watched_s"], errors="coerce").fillna(0).to_numpy() > 0
        ev_users = ev["user_id"].astype(str).to_numpy(dtype=object)
        if users is None:
            known = window.users["user_id"].astype(str).to_numpy(dtype=object)
            users = pd.Index(pd.unique(np.concatenate([known, ev_users])), dtype=object)
        meta = window.users.drop_duplicates("user_id", keep="last").assign(user_id=lambda d: d["user_id"].astype(str))
        meta = meta.set_index("user_id").reindex(users)
        for col in ("device", "country", "age_bucket"):
            if col in meta.columns:
                meta[col] = meta[col].fillna("unknown").astype(str)
        keep = item >= 0
        user = users.get_indexer(pd.Index(ev_users, dtype=object))
        keep &= user >= 0
        time = to_us(ev["event_time"])
        order = np.argsort(time[keep], kind="stable")
        return cls(
            users=users,
            items=items,
            catalog=catalog,
            user_meta=meta.reset_index(names="user_id"),
            ev_user=user[keep][order].astype(np.int32),
            ev_item=item[keep][order].astype(np.int32),
            ev_time=time[keep][order],
            ev_watched=watched[keep][order],
            ev_positive=positive[keep][order],
            cutoff_us=ts_us(window.cutoff),
            frame=ev.reset_index(drop=True),
            ev_row=np.flatnonzero(keep)[order].astype(np.int64),
            partitions=tuple(getattr(window, "partitions", ()) or ()),
        )

    # --- cuts -------------------------------------------------------------------------------------

    def subset(self, mask: np.ndarray, *, cutoff_us: int | None = None) -> "History":
        """The same indices with only the events of `mask` (and, optionally, an earlier cutoff)."""
        return replace(
            self,
            ev_user=self.ev_user[mask],
            ev_item=self.ev_item[mask],
            ev_time=self.ev_time[mask],
            ev_watched=self.ev_watched[mask],
            ev_positive=self.ev_positive[mask],
            cutoff_us=self.cutoff_us if cutoff_us is None else int(cutoff_us),
            ev_row=self.ev_row[mask],
        )

    def to_window(self) -> Any:
        """This history as a `recloop.training.Window` (what the two-tower trains on)."""
        from recloop.training import Window

        return Window.from_tables(self.frame.iloc[self.ev_row], self.catalog, self.user_meta,
                                  cutoff=self.cutoff, partitions=list(self.partitions))

    @property
    def cutoff(self) -> pd.Timestamp:
        return pd.Timestamp(self.cutoff_us * 1000, tz="UTC")

    def before(self, t_us: int) -> "History":
        """What was known before `t_us`: events before it; the catalog stays (upload times tell which
        videos existed, see `item_live`)."""
        return self.subset(self.ev_time < t_us, cutoff_us=t_us)

    # --- matrices -----------------------------------------------------------------------------------

    def _matrix(self, mask: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix(
            (np.ones(int(mask.sum()), np.float32), (self.ev_user[mask], self.ev_item[mask])),
            shape=(len(self.users), len(self.items)),
        )
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @cached_property
    def positives(self) -> sp.csr_matrix:
        """users x items, 1 where the user had a positive engagement with the video."""
        return self._matrix(self.ev_positive)

    @cached_property
    def watched(self) -> sp.csr_matrix:
        """users x items, 1 where the user watched the video (rated it, for ratings data)."""
        return self._matrix(self.ev_watched)

    @cached_property
    def negatives(self) -> sp.csr_matrix:
        """users x items, 1 where the user watched the video without a positive engagement."""
        neg = self.watched - self.positives
        neg.data = np.maximum(neg.data, 0)
        neg.eliminate_zeros()
        return sp.csr_matrix(neg)

    @property
    def seen(self) -> sp.csr_matrix:
        """What is never recommended again to a user: the videos they watched."""
        return self.watched

    # --- statistics ---------------------------------------------------------------------------------

    def _count(self, mask: np.ndarray, by: str) -> np.ndarray:
        rows, n = (self.ev_item, len(self.items)) if by == "item" else (self.ev_user, len(self.users))
        return np.bincount(rows[mask], minlength=n).astype(np.float64)

    @cached_property
    def item_positives(self) -> np.ndarray:
        return self._count(self.ev_positive, "item")

    @cached_property
    def item_watches(self) -> np.ndarray:
        return self._count(self.ev_watched, "item")

    @cached_property
    def item_impressions(self) -> np.ndarray:
        return self._count(np.ones(len(self.ev_item), bool), "item")

    @cached_property
    def user_positives(self) -> np.ndarray:
        return self._count(self.ev_positive, "user")

    @cached_property
    def user_watches(self) -> np.ndarray:
        return self._count(self.ev_watched, "user")

    @cached_property
    def upload_us(self) -> np.ndarray:
        """Upload time of each item (float microseconds; NaN when unknown)."""
        up = pd.to_datetime(self.catalog["upload_time"], utc=True)
        out = up.astype("datetime64[us, UTC]").astype("int64").to_numpy(np.float64)
        out[up.isna().to_numpy()] = np.nan
        return out

    def item_live(self, at_us: int) -> np.ndarray:
        """Items uploaded before `at_us` (unknown upload times count as live)."""
        up = self.upload_us
        return ~(up >= at_us)

    @cached_property
    def item_first_us(self) -> np.ndarray:
        """First event time of each item in the history (NaN when it has none)."""
        out = np.full(len(self.items), np.inf)
        np.minimum.at(out, self.ev_item, self.ev_time.astype(np.float64))
        out[np.isinf(out)] = np.nan
        return out

    @cached_property
    def user_last_us(self) -> np.ndarray:
        out = np.full(len(self.users), -np.inf)
        np.maximum.at(out, self.ev_user, self.ev_time.astype(np.float64))
        out[np.isinf(out)] = np.nan
        return out

    @cached_property
    def user_median_us(self) -> np.ndarray:
        """Median event time of each user (NaN without events): when the user was active."""
        if not len(self.ev_user):
            return np.full(len(self.users), np.nan)
        order = np.lexsort((self.ev_time, self.ev_user))
        u, t = self.ev_user[order], self.ev_time[order].astype(np.float64)
        starts = np.searchsorted(u, np.arange(len(self.users)), side="left")
        ends = np.searchsorted(u, np.arange(len(self.users)), side="right")
        out = np.full(len(self.users), np.nan)
        has = ends > starts
        lo = (starts + (ends - 1)) // 2
        hi = (starts + ends) // 2
        out[has] = (t[lo[has]] + t[np.minimum(hi[has], len(t) - 1)]) / 2
        return out

    @cached_property
    def _positive_times(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive event times sorted by (item, time), and each item's start offset (CSR layout)."""
        item, time = self.ev_item[self.ev_positive], self.ev_time[self.ev_positive]
        order = np.lexsort((time, item))
        ptr = np.searchsorted(item[order], np.arange(len(self.items) + 1), side="left")
        return time[order].astype(np.float64), ptr

    @cached_property
    def _banded_times(self) -> tuple[np.ndarray, float, float]:
        """Every item's positive times (seconds from the first) shifted into a band of its own, so one
        sorted array answers "how many positives of item i in [lo, hi)" with two searches."""
        times, ptr = self._positive_times
        if not len(times):
            return np.zeros(0), 0.0, 1.0
        base, width = float(times.min()), float((times.max() - times.min()) / 1e6 + 3.0)
        item_of = np.repeat(np.arange(len(self.items), dtype=np.float64), np.diff(ptr))
        return item_of * width + (times - base) / 1e6 + 1.0, base, width

    def item_positives_between(self, items: np.ndarray, lo_us: np.ndarray, hi_us: np.ndarray) -> np.ndarray:
        """For each (item, [lo, hi)) the number of the item's positives in that time range."""
        keyed, base, width = self._banded_times
        items = np.asarray(items, np.int64)
        if not len(keyed) or not len(items):
            return np.zeros(len(items))

        def key(t_us: np.ndarray) -> np.ndarray:
            t = np.clip((np.asarray(t_us, np.float64) - base) / 1e6, -1.0, width - 2.0)
            return items * width + t + 1.0

        return (np.searchsorted(keyed, key(hi_us)) - np.searchsorted(keyed, key(lo_us))).astype(np.float64)

    @cached_property
    def item_ids(self) -> np.ndarray:
        return self.items.to_numpy(dtype=object)

    @cached_property
    def catalog_categories(self) -> np.ndarray:
        return self.catalog["category"].fillna("unknown").astype(str).to_numpy(dtype=object)

    @cached_property
    def item_category(self) -> np.ndarray:
        """Each item's category code (codes of `categories`)."""
        return pd.factorize(self.catalog["category"].fillna("unknown").astype(str))[0]

    @cached_property
    def item_category_matrix(self) -> sp.csr_matrix:
        """items x categories, one 1 per item (its category)."""
        codes, n = self.item_category, len(self.items)
        return sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), codes)), shape=(n, int(codes.max()) + 1 if n else 1))

    @cached_property
    def item_tags(self) -> sp.csr_matrix:
        """items x tags, 1 where the video carries the tag (the `tags` column split on '|')."""
        tags = self.catalog["tags"].fillna("").astype(str) if "tags" in self.catalog.columns else pd.Series([""] * len(self.items))
        exploded = tags.reset_index(drop=True).str.split("|").explode()
        exploded = exploded[exploded.str.len() > 0]
        codes, _ = pd.factorize(exploded.to_numpy())
        shape = (len(self.items), int(codes.max()) + 1 if len(codes) else 1)
        m = sp.csr_matrix((np.ones(len(codes), np.float32), (exploded.index.to_numpy(), codes)), shape=shape)
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @property
    def n_events(self) -> int:
        return int(len(self.ev_user))

    def describe(self) -> dict[str, Any]:
        return {
            "users": len(self.users),
            "items": len(self.items),
            "events": self.n_events,
            "watched": int(self.ev_watched.sum()),
            "positives": int(self.ev_positive.sum()),
            "cutoff": self.cutoff.isoformat(),
        }

