"""The ranker's features from Feast's online store (SQLite embedded, Redis in production).

Per request only what changes per request is read: the user's `user_activity` row and their
`user_category_affinity` rows for the categories among the candidates, in one `get_online_features`
call. The `video_popularity` features of the whole catalog are a daily snapshot, identical for every
user until the next materialization: they are read once into an array when a model is loaded and again
when Feast records a newer materialization, so a request never reads hundreds of video rows. This is
the usual split between request-time and batch features.

The user rows read are kept in a bounded in-process cache tied to the materialized snapshot they came
from: online user features change only when a new snapshot is materialized, so within one snapshot a
cached row is exactly what Feast would return, and the cache is emptied as soon as the service sees a
newer snapshot (`ServingModel.feature_snapshot`, checked every poll). A user's second request within a
snapshot then costs no store read at all; only what is missing (a new user, a category not read
before) goes to Feast, in one call for the whole batch of requests.

Failures of the store (unreachable Redis, broken SQLite file, missing tables) surface as
`FeatureStoreUnavailable`, which the service answers with its popularity fallback. Rows already cached
keep being served while the store is down (they are the current snapshot's values).

A store that is down must not make requests slow. Two things bound the time a read can take:

* Feast's Redis client (redis-py) is configured with short socket timeouts (`timeout_s`, through Feast's
  `connection_string` options `socket_timeout` and `socket_connect_timeout`) and no retries: redis-py's
  default of 3 retries with exponential back-off (1 s, 2 s, 4 s, with jitter) is what made every
  request wait 6-13 s for its fallback while Redis was unreachable;
* a `CircuitBreaker` around every read: after `failures` failed reads in a row it opens, and reads are
  refused at once (`FeatureStoreUnavailable`, no store call) while it is open. Requests never test a
  store known to be down: a background probe (one daemon thread, only while the breaker is not closed)
  reads one row every `reset_seconds`; the breaker is half-open during that probe, closes when it
  succeeds (requests read the store again) and opens again when it fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from recloop.features import (
    USER_ACTIVITY,
    USER_CATEGORY_AFFINITY,
    VIDEO_POPULARITY,
    feature_freshness,
    feature_names,
    feature_store,
)

if TYPE_CHECKING:
    import feast

    from recloop.config import Settings

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
PROBE_USER = "__recloop_probe__"


class FeatureStoreUnavailable(RuntimeError):
    """The online store could not be read (`refused`: not tried, the circuit breaker is open)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class CircuitBreaker:
    """The state of the online store as reads found it: `closed` (reads go to the store), `open` (reads
    are refused without touching the store) or `half_open` (the background probe is reading).

    `failures` failed reads in a row open it; `probe_succeeded` closes it, `probe_failed` opens it again.
    `listeners` are called with the new state on every change (metrics, logs). Thread-safe.
    """

    def __init__(self, failures: int = 2, reset_seconds: float = 1.0) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if reset_seconds <= 0:
            raise ValueError(f"reset_seconds must be > 0, got {reset_seconds}")
        self.failures = failures
        self.reset_seconds = reset_seconds
        self.listeners: list[Callable[[str], None]] = []
        self._state = CLOSED
        self._consecutive = 0
        self._lock = threading.Lock()
        self.opened_at: float | None = None  # time.monotonic() of the last opening

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        """Whether a request may read the store now."""
        return self._state == CLOSED

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0

    def record_failure(self) -> bool:
        """Counts a failed read; returns True when this failure opened the breaker."""
        with self._lock:
            self._consecutive += 1
            if self._state != CLOSED or self._consecutive < self.failures:
                return False
        self._set(OPEN)
        return True

    def start_probe(self) -> None:
        self._set(HALF_OPEN)

    def probe_succeeded(self) -> None:
        with self._lock:
            self._consecutive = 0
        self._set(CLOSED)

    def probe_failed(self) -> None:
        self._set(OPEN)

    def _set(self, state: str) -> None:
        with self._lock:
            if state == self._state:
                return
            self._state = state
            if state == OPEN:
                self.opened_at = time.monotonic()
        for listener in list(self.listeners):
            listener(state)


def bound_redis_client(store: "feast.FeatureStore", timeout_s: float) -> bool:
    """Short socket timeouts and no retries on the redis-py client behind Feast's Redis online store
    (before its first use). Timeouts already given in the connection string are kept. Returns whether
    the store is Redis."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    config = store.config.online_store
    if getattr(config, "type", None) != "redis":
        return False
    given = {part.split("=", 1)[0].strip() for part in config.connection_string.split(",") if "=" in part}
    extra = [f"{key}={timeout_s:g}" for key in ("socket_timeout", "socket_connect_timeout") if key not in given]
    if extra:
        config.connection_string = ",".join([config.connection_string, *extra])
    # Feast creates its client lazily from the connection string; its retry policy is not a connection
    # string option, so it is set on the client itself (redis-py's public `set_retry`).
    client = store._get_provider().online_store._get_client(config)
    client.set_retry(Retry(NoBackoff(), 0))
    return True


def _full(view: str) -> list[str]:
    return [f"{view}__{f}" for f in feature_names(view)]


def _refs(view: str) -> list[str]:
    return [f"{view}:{f}" for f in feature_names(view)]


USER_COLUMNS = _full(USER_ACTIVITY)
AFFINITY_COLUMNS = _full(USER_CATEGORY_AFFINITY)
VIDEO_COLUMNS = _full(VIDEO_POPULARITY)


def _matrix(values: dict[str, list], columns: list[str]) -> np.ndarray:
    """Feast's `to_dict()` columns as a float matrix (None → NaN)."""
    if not columns:
        return np.zeros((0, 0))
    return np.column_stack([np.asarray(values[c], dtype=np.float64) for c in columns])


class _UserRows:
    """One user's cached rows: `user_activity` [13] and `user_category_affinity` [3] per category."""

    __slots__ = ("activity", "affinity")

    def __init__(self, activity: np.ndarray) -> None:
        self.activity = activity
        self.affinity: dict[str, np.ndarray] = {}


class OnlineFeatures:
    """Reads of one Feast feature store, serialised by a lock (the SQLite store shares one connection),
    with the per-snapshot cache of user rows and the circuit breaker described in the module docstring.

    Args:
        settings, online, project: the Feast store (`recloop.features.feature_store`).
        cache_users: the most users whose rows are kept (least recently used dropped first); 0 = no cache.
        timeout_s: the Redis client's socket and connect timeouts (seconds).
        breaker: the circuit breaker (default: 2 failures in a row, a probe every second).
    """

    def __init__(
        self,
        settings: "Settings",
        *,
        online: str = "sqlite",
        project: str | None = None,
        cache_users: int = 200_000,
        timeout_s: float = 0.1,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.settings = settings
        self.store = feature_store(settings, project=project, online=online)
        bound_redis_client(self.store, timeout_s)
        self.breaker = breaker or CircuitBreaker()
        self.breaker.listeners.append(self._on_breaker)
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._probing = False  # a prober runs (set and cleared under _probe_lock)
        self._probe_lock = threading.Lock()
        self._lock = threading.Lock()
        self._activity_refs = _refs(USER_ACTIVITY)
        self._user_refs = self._activity_refs + _refs(USER_CATEGORY_AFFINITY)
        self.cache_users = cache_users
        self._cache: OrderedDict[str, _UserRows] = OrderedDict()
        self._cache_snapshot: str | None = None
        self._cache_lock = threading.Lock()
        self.hits = 0  # user rows served from the cache / read from Feast (for metrics)
        self.misses = 0

    def user_features(
        self, requests: Sequence[tuple[str, Sequence[str]]], snapshot: str | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (user, categories): the `user_activity` values [13] and the affinity values
        [len(categories), 3], NaN where missing. Rows not cached for `snapshot` (the materialized
        snapshot the caller's model was built on) are read in one `get_online_features` call."""
        with self._cache_lock:
            if snapshot != self._cache_snapshot:
                self._cache.clear()
                self._cache_snapshot = snapshot
            cached = [self._cached(user) for user, _ in requests]
        rows: list[dict[str, str]] = []
        wanted: list[tuple[int, str | None]] = []  # (request, category or None for the activity row)
        for i, ((user, categories), entry) in enumerate(zip(requests, cached)):
            if entry is None:
                rows.append({"user_id": user, "category": ""})
                wanted.append((i, None))
            for c in categories:
                if entry is None or c not in entry.affinity:
                    rows.append({"user_id": user, "category": c})
                    wanted.append((i, c))
        misses = sum(1 for _, c in wanted if c is None)  # users with no cached row (activity row wanted)
        self.hits += len(requests) - misses
        self.misses += misses
        if rows:
            refs = self._user_refs if misses else _refs(USER_CATEGORY_AFFINITY)
            values = self._read(refs, rows)
            affinity = _matrix(values, AFFINITY_COLUMNS)
            activity = _matrix(values, USER_COLUMNS) if misses else None
            fresh: dict[int, _UserRows] = {}
            for j, (i, c) in enumerate(wanted):
                entry = cached[i] or fresh.get(i)
                if c is None:
                    assert activity is not None
                    fresh[i] = _UserRows(activity[j])
                else:  # a request's activity row, when wanted, comes before its affinity rows
                    assert entry is not None
                    entry.affinity[c] = affinity[j]
            with self._cache_lock:
                if self.cache_users and snapshot == self._cache_snapshot:
                    for i, entry in fresh.items():
                        self._cache[requests[i][0]] = entry
                    while len(self._cache) > self.cache_users:
                        self._cache.popitem(last=False)
            cached = [entry or fresh.get(i) for i, entry in enumerate(cached)]
        out = []
        for (user, categories), entry in zip(requests, cached):
            assert entry is not None
            aff = (np.stack([entry.affinity[c] for c in categories]) if len(categories)
                   else np.zeros((0, len(AFFINITY_COLUMNS))))
            out.append((entry.activity, aff))
        return out

    def _cached(self, user: str) -> _UserRows | None:
        entry = self._cache.get(user)
        if entry is not None:
            self._cache.move_to_end(user)
        return entry

    def video_features(self, video_ids: Sequence[str], chunk: int = 10_000) -> np.ndarray:
        """`video_popularity` values [len(video_ids), 13] of the current snapshot (NaN where missing)."""
        refs = _refs(VIDEO_POPULARITY)
        parts = [np.zeros((0, len(VIDEO_COLUMNS)))]
        for s in range(0, len(video_ids), chunk):
            values = self._read(refs, [{"video_id": v} for v in video_ids[s : s + chunk]])
            parts.append(_matrix(values, VIDEO_COLUMNS))
        return np.concatenate(parts)

    def _read(self, refs: list[str], rows: list[dict[str, str]]) -> dict[str, list[Any]]:
        """One `get_online_features` call through the circuit breaker."""
        if not self.breaker.allow():
            raise FeatureStoreUnavailable("online store unavailable (circuit breaker open)", refused=True)
        try:
            with self._lock:
                values = self.store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True)
                out = values.to_dict()
        except Exception as err:  # any store failure means the same thing to serving: no features now
            self.breaker.record_failure()
            raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
        self.breaker.record_success()
        return out

    def has_user(self, user: str, snapshot: str | None) -> bool:
        """Whether `user`'s activity row is cached for `snapshot` (a read may then need no store)."""
        return snapshot == self._cache_snapshot and user in self._cache

    # --- circuit breaker --------------------------------------------------------------------------

    def probe(self) -> None:
        """One read of one (absent) user's activity row, bypassing the breaker; raises on failure."""
        with self._lock:
            self.store.get_online_features(
                features=self._activity_refs, entity_rows=[{"user_id": PROBE_USER}], full_feature_names=True
            ).to_dict()

    def _on_breaker(self, state: str) -> None:
        if state != OPEN or self._closed.is_set():
            return
        with self._probe_lock:
            if self._probing:
                return
            self._probing = True
            self._prober = threading.Thread(target=self._probe_until_closed, name="recloop-online-probe", daemon=True)
            self._prober.start()

    def _probe_until_closed(self) -> None:
        """Runs while the breaker is not closed: every `reset_seconds`, half-open and probe."""
        breaker = self.breaker
        while not self._closed.wait(breaker.reset_seconds):
            breaker.start_probe()
            try:
                self.probe()
            except Exception as err:  # noqa: BLE001 - still down: stay open, try again later
                log.debug("online store probe failed: %s: %s", type(err).__name__, err)
                breaker.probe_failed()
                continue
            with self._probe_lock:
                self._probing = False  # before closing: a failure right after starts a new prober
            breaker.probe_succeeded()
            return
        with self._probe_lock:  # stopped by close()
            self._probing = False

    def close(self) -> None:
        """Stop the background probe (if one runs)."""
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join()

    def snapshot(self) -> str | None:
        """The newest `video_popularity` snapshot materialized online (ISO time; None if none was): when it
        changes, the cached video features are stale."""
        try:
            fresh = feature_freshness(self.settings, store=self.store)
        except Exception as err:
            raise FeatureStoreUnavailable(f"{type(err).__name__}: {err}") from err
        return fresh["views"][VIDEO_POPULARITY]["newest_snapshot"]

    def refresh_registry(self) -> None:
        """Re-read Feast's registry in the background, so that a request never pays the refresh Feast
        otherwise does synchronously when its registry cache expires (Feast's own advice)."""
        self.store.refresh_registry()
