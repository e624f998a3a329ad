"""Per-user history for serving: what each user already watched (the no-repeat rule) and their
activity since the champion's training cutoff (the two-tower's "recent history").

Two sources, merged on read:

* the lake: `silver/events` of the last `history_days` validated days, loaded in the background and
  replaced whole when a new day is validated (`load_lake`);
* the feedback endpoint: events accepted since then (`add`), kept in memory until the lake holds their
  day (then they are the lake's rows and are dropped here), so a watch reported a second ago already
  counts.

The online store (Feast) holds aggregates, not the list of watched videos, so it cannot answer "did this
user watch v?"; a dedicated key-value store would be the next step when one process no longer holds
every user (one replica per user shard, or Redis sets), with the same interface.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Recent:
    """A user's activity after some time: counts, and the positively engaged videos, newest first."""

    impressions: int = 0
    watches: int = 0
    positives: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.impressions > 0


@dataclass(frozen=True)
class _LakePart:
    index: dict[str, tuple[int, int]]  # user -> [start, end) in the arrays, sorted by time
    video: np.ndarray
    time_us: np.ndarray
    watched: np.ndarray
    positive: np.ndarray
    until_us: int  # end of the newest validated day held


def _day_end_us(partition: str | None) -> int:
    if partition is None:
        return -(2**62)
    d = date.fromisoformat(partition) + timedelta(days=1)
    return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp() * 1_000_000)


class UserHistory:
    """Thread-safe per-user event history (see the module docstring)."""

    def __init__(self) -> None:
        self._lake = _LakePart({}, *(np.zeros(0, t) for t in (object, np.int64, bool, bool)), _day_end_us(None))
        self._feedback: dict[str, list[tuple[str, int, bool, bool]]] = {}
        self._lock = threading.Lock()

    def load_lake(self, events: pd.DataFrame, newest_partition: str | None) -> None:
        """Replace the lake part with `events` (`user_id, video_id, time_us, watched, positive`, as from
        `lakeview.recent_events`) whose newest day is `newest_partition`; feedback events of days the lake
        now holds are dropped."""
        ev = events.sort_values(["user_id", "time_us"], kind="stable")
        users = ev["user_id"].to_numpy(dtype=object)
        uniq, starts = np.unique(users, return_index=True) if len(users) else (np.zeros(0, object), np.zeros(0, int))
        ends = np.append(starts[1:], len(users))
        part = _LakePart(
            index={u: (int(s), int(e)) for u, s, e in zip(uniq, starts, ends)},
            video=ev["video_id"].to_numpy(dtype=object),
            time_us=ev["time_us"].to_numpy(dtype=np.int64),
            watched=ev["watched"].to_numpy(dtype=bool),
            positive=ev["positive"].to_numpy(dtype=bool),
            until_us=_day_end_us(newest_partition),
        )
        with self._lock:
            self._lake = part
            self._feedback = {
                u: kept for u, rows in self._feedback.items() if (kept := [r for r in rows if r[1] >= part.until_us])
            }

    def add(self, rows: list[tuple[str, str, int, bool, bool]]) -> None:
        """Feedback events `(user_id, video_id, time_us, watched, positive)`."""
        with self._lock:
            for user, video, t, watched, positive in rows:
                self._feedback.setdefault(user, []).append((video, t, watched, positive))

    def _rows(self, user: str) -> tuple[_LakePart, tuple[int, int] | None, list[tuple[str, int, bool, bool]]]:
        lake = self._lake
        with self._lock:
            extra = list(self._feedback.get(user, ()))
        return lake, lake.index.get(user), extra

    def known(self, user: str) -> bool:
        lake, span, extra = self._rows(user)
        return span is not None or bool(extra)

    def watched(self, user: str) -> set[str]:
        """Every video the user watched (watched_s > 0) in the lake window or through feedback."""
        lake, span, extra = self._rows(user)
        out = {v for v, _, w, _ in extra if w}
        if span is not None:
            s, e = span
            out.update(lake.video[s:e][lake.watched[s:e]])
        return out

    def recent(self, user: str, since_us: int) -> Recent:
        """The user's activity at or after `since_us` (e.g. the model's training cutoff)."""
        lake, span, extra = self._rows(user)
        events: list[tuple[int, str, bool, bool]] = []
        if span is not None:
            s, e = span
            t = lake.time_us[s:e]
            keep = np.flatnonzero(t >= since_us) + s
            events.extend(zip(lake.time_us[keep].tolist(), lake.video[keep], lake.watched[keep], lake.positive[keep]))
        events.extend((t, v, w, p) for v, t, w, p in extra if t >= since_us)
        if not events:
            return Recent()
        events.sort(key=lambda r: r[0], reverse=True)
        return Recent(
            impressions=len(events),
            watches=sum(1 for r in events if r[2]),
            positives=tuple(r[1] for r in events if r[3]),
        )
