"""Per-user history for serving: what each user already watched (the no-repeat rule) and their
activity since the champion's training cutoff (the two-tower's "recent history").

Two sources, merged on read:

* the lake: `silver/events` of the last `history_days` validated days, loaded in the background and
  replaced whole when a new day is validated (`load_lake`);
* the feedback endpoint: events accepted since then (`add`), kept in memory until the lake holds their
  day (then they are the lake's rows and are dropped here), so a watch reported a second ago already
  counts.

The feedback part is bounded, so that sustained feedback cannot grow the process without limit: at most
`max_users` users (least recently used first out: a user is "used" when their events are added or read),
at most `max_events` events in all (users are evicted, least recently used first, until the total fits)
and at most `max_user_events` per user (their oldest go first). An evicted event is only forgotten by
this process: it is in the feedback spool and the landing zone, and comes back through the lake once its
day is validated; until then, the video it names may be recommended to that user again.
`HistoryCollector` exposes the sizes and evictions to Prometheus.

The online store (Feast) holds aggregates, not the list of watched videos, so it cannot answer "did this
user watch v?"; a dedicated key-value store would be the next step when one process no longer holds
every user (one replica per user shard, or Redis sets), with the same interface.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Defaults of the bounds (ServingConfig.history_max_*). Measured by bench/feedback_memory.py: ~330 bytes
# per held user with one event (each event a new user, the worst case), so ~35 MB for 100,000 users.
MAX_USERS = 100_000
MAX_EVENTS = 500_000
MAX_USER_EVENTS = 1_000


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


@dataclass(frozen=True)
class HistoryStats:
    """Sizes of the history and what the bounds evicted so far."""

    feedback_users: int
    feedback_events: int
    lake_users: int
    lake_events: int
    evicted_users: int  # users whose feedback events were all dropped (least recently used)
    evicted_events: dict[str, int]  # events dropped: lru_user (with their user), user_cap (a user's oldest)


class UserHistory:
    """Thread-safe per-user event history (see the module docstring)."""

    def __init__(
        self, *, max_users: int = MAX_USERS, max_events: int = MAX_EVENTS, max_user_events: int = MAX_USER_EVENTS
    ) -> None:
        if min(max_users, max_events, max_user_events) < 1:
            raise ValueError("history bounds must be >= 1")
        self.max_users = max_users
        self.max_events = max_events
        self.max_user_events = min(max_user_events, max_events)
        self._lake = _LakePart({}, *(np.zeros(0, t) for t in (object, np.int64, bool, bool)), _day_end_us(None))
        # user -> their feedback events, least recently used user first
        self._feedback: OrderedDict[str, list[tuple[str, int, bool, bool]]] = OrderedDict()
        self._events = 0
        self._evicted_users = 0
        self._evicted_events = {"lru_user": 0, "user_cap": 0}
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
            self._feedback = OrderedDict(
                (u, kept) for u, rows in self._feedback.items() if (kept := [r for r in rows if r[1] >= part.until_us])
            )
            self._events = sum(len(rows) for rows in self._feedback.values())

    def add(self, rows: list[tuple[str, str, int, bool, bool]]) -> None:
        """Feedback events `(user_id, video_id, time_us, watched, positive)`; then the bounds are applied."""
        with self._lock:
            feedback = self._feedback
            touched: set[str] = set()
            for user, video, t, watched, positive in rows:
                held = feedback.get(user)
                if held is None:
                    # Interned: the same user or video sent again shares one string object.
                    user = sys.intern(user)
                    held = feedback[user] = []
                else:
                    feedback.move_to_end(user)
                held.append((sys.intern(video), t, watched, positive))
                touched.add(user)
            self._events += len(rows)
            for user in touched:
                held = feedback[user]
                if len(held) > self.max_user_events:
                    excess = len(held) - self.max_user_events
                    held.sort(key=lambda r: r[1])  # the oldest events go first
                    del held[:excess]
                    self._events -= excess
                    self._evicted_events["user_cap"] += excess
            while len(feedback) > self.max_users or self._events > self.max_events:
                _, dropped = feedback.popitem(last=False)
                self._events -= len(dropped)
                self._evicted_users += 1
                self._evicted_events["lru_user"] += len(dropped)

    def _rows(self, user: str) -> tuple[_LakePart, tuple[int, int] | None, list[tuple[str, int, bool, bool]]]:
        lake = self._lake
        with self._lock:
            held = self._feedback.get(user)
            if held is not None:
                self._feedback.move_to_end(user)
            extra = list(held or ())
        return lake, lake.index.get(user), extra

    def stats(self) -> HistoryStats:
        lake = self._lake
        with self._lock:
            return HistoryStats(len(self._feedback), self._events, len(lake.index), len(lake.video),
                                self._evicted_users, dict(self._evicted_events))

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


class HistoryCollector(Collector):
    """Prometheus view of a `UserHistory` (read at scrape time):

        recloop_serving_history_users{source}           feedback (users held in memory), lake
        recloop_serving_history_events{source}          events held: feedback, lake
        recloop_serving_history_evicted_users_total     feedback users dropped, least recently used first
        recloop_serving_history_evicted_events_total{reason}  lru_user, user_cap
    """

    def __init__(self, history: UserHistory) -> None:
        self.history = history

    def collect(self) -> Iterator[Metric]:
        s = self.history.stats()
        users = GaugeMetricFamily("recloop_serving_history_users", "Users in the serving watch history", labels=["source"])
        users.add_metric(["feedback"], s.feedback_users)
        users.add_metric(["lake"], s.lake_users)
        yield users
        events = GaugeMetricFamily("recloop_serving_history_events", "Events in the serving watch history",
                                   labels=["source"])
        events.add_metric(["feedback"], s.feedback_events)
        events.add_metric(["lake"], s.lake_events)
        yield events
        yield CounterMetricFamily("recloop_serving_history_evicted_users",
                                  "Users whose feedback history was dropped (least recently used first)",
                                  value=s.evicted_users)
        evicted = CounterMetricFamily("recloop_serving_history_evicted_events",
                                      "Feedback events dropped from the in-memory history by its bounds", labels=["reason"])
        for reason, n in s.evicted_events.items():
            evicted.add_metric([reason], n)
        yield evicted
