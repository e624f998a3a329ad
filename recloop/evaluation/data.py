"""Interactions (positive engagements), the user x item bookkeeping every recommender shares, and the
splits (time and random) of the protocol."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from recloop.data.engagement import positive_mask
from recloop.evaluation.metrics import INTERACTION_COLUMNS

log = logging.getLogger(__name__)


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


