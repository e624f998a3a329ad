"""Settings of the serving API, read from `RECLOOP_SERVING_*` environment variables when asked for.

They sit beside recloop's `Settings` (stores and locations) and only say how the service behaves:
candidate counts, business rules, polling cadence, where feedback and impressions are spooled,
online experiments and exploration. Every field has a
default, so `ServingConfig.from_env()` works on a fresh checkout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_SAFETY_FILE = Path(__file__).with_name("safety.yaml")
# The most events one feedback request may carry whatever the configuration (the OpenAPI schema's bound).
FEEDBACK_EVENTS_CEILING = 10_000


@dataclass(frozen=True)
class ServingConfig:
    """How the service recommends, swaps models and takes feedback.

    Candidate counts (ANN neighbours, popular, fresh) are the bundle's own (`bundle.json`), the ones
    offline evaluation measured. Re-ranking: at most `max_per_creator` videos of one
    creator and `max_per_category` of one category in a response, and a freshness boost of
    `freshness_weight * exp(-age_days / freshness_half_life_days)` added to the ranking score (whose
    scale is a log of expected watch seconds, so 0.5 is a ~65 % uplift for a video uploaded just now).
    """

    default_k: int = 20
    max_k: int = 100
    max_per_creator: int = 2
    max_per_category: int = 6
    freshness_weight: float = 0.5
    freshness_half_life_days: float = 2.0
    # Positives of the last `popularity_days` validated days make the popularity lists (per segment).
    popularity_days: int = 7
    # Validated days of events whose watches count as "already watched" (plus every feedback event).
    history_days: int = 28
    safety_file: Path = DEFAULT_SAFETY_FILE
    safety_check_seconds: float = 1.0  # how often the file's modification time is looked at
    # How often the background thread checks the champion alias, the lake and the feature snapshot.
    poll_seconds: float = 5.0
    # Where accepted feedback waits (fsynced) until it is flushed to the landing zone.
    feedback_spool_dir: Path | None = None  # default: <RECLOOP_HOME>/serving/feedback-spool
    feedback_flush_seconds: float = 10.0
    feedback_max_batch: int = 5_000
    # What one feedback request may carry (422 otherwise): `event_time` at most `feedback_max_age_hours`
    # before now and `feedback_max_future_seconds` after it (clock skew), events of at most
    # `feedback_max_days` distinct UTC days, at most `feedback_max_events` events (10,000 at most).
    feedback_max_age_hours: float = 48.0
    feedback_max_future_seconds: float = 300.0
    feedback_max_days: int = 3
    feedback_max_events: int = 10_000
    # Bounds of the in-memory feedback history (recloop.serving.history): users held (least recently
    # used out first), events held in all, events held per user (oldest out first).
    history_max_users: int = 100_000
    history_max_events: int = 500_000
    history_max_user_events: int = 1_000
    # Authentication (keys: RECLOOP_API_KEYS, recloop.serving.auth). Writes always need a key when keys
    # are set; recommendations need one only when this is "key" ("open": anyone may ask).
    recommendations_auth: str = "open"
    # Per-key and per-endpoint token bucket: requests per second refilled, and the bucket's depth
    # (0 requests per second: no limit).
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    # "sqlite" or "redis"; None: Redis in production (RECLOOP_ENV=production), SQLite otherwise.
    online_store: str | None = None
    # Users whose online feature rows are kept for the current materialized snapshot (0: read every
    # request from Feast); see recloop.serving.online.
    feature_cache_users: int = 200_000
    # Most requests ranked in one batch (see recloop.serving.batching).
    max_ranking_batch: int = 64
    # Online-store reads (recloop.serving.online): the Redis client's socket timeouts (no retries), and
    # the circuit breaker that opens after `breaker_failures` failed reads in a row (requests then get
    # the fallback at once) and probes the store every `breaker_reset_seconds` in the background.
    online_store_timeout_seconds: float = 0.1
    breaker_failures: int = 2
    breaker_reset_seconds: float = 1.0
    # Admission control (recloop.serving.admission): at most `max_in_flight` requests handled at once
    # (0: no admission control); beyond, a request waits at most `admission_max_wait_seconds` in a queue
    # of at most `admission_queue`, else it is answered 503 with `Retry-After: retry_after_seconds`.
    max_in_flight: int = 24
    admission_queue: int = 64
    admission_max_wait_seconds: float = 0.01
    retry_after_seconds: int = 1
    # The limit adapts below `max_in_flight` to keep the admitted requests' p95 time in the app under
    # this target (seconds; 0: the limit stays at max_in_flight).
    admission_target_seconds: float = 0.02
    # ... but never below this many (a few concurrent clients, or a slow spell, are not shed).
    admission_min_in_flight: int = 2
    # The HNSW search breadth at serving time (None: the bundle's own setting). Lower is faster and
    # recalls less; measure with `recloop.index.recall_at_k` before lowering it.
    ef_search: int | None = None
    # The impressions log (recloop.serving.impressions): where answers are spooled, one line per request
    # (default: <RECLOOP_HOME>/serving/impressions-spool), written to the kernel before the answer is
    # returned (survives kill -9 of the process) and fsynced in the background every
    # `impressions_sync_seconds` (a machine crash loses at most that long); `impressions_fsync` fsyncs
    # every line before its answer instead (an fsync per request). Flushed to the landing zone every
    # `impressions_flush_seconds` or `impressions_max_batch` impressions.
    impressions_spool_dir: Path | None = None
    impressions_fsync: bool = False
    impressions_sync_seconds: float = 1.0
    impressions_flush_seconds: float = 10.0
    impressions_max_batch: int = 20_000
    # Online experiments (recloop.serving.experiment), while the registry's `experiment` alias is set:
    # "ab" (a stable share `experiment_share` of users gets the challenger) or "interleave" (team-draft
    # interleaving of both models' rankings for every request).
    experiment_mode: str = "ab"
    experiment_share: float = 0.5
    # Exploration (recloop.serving.explore): each slot of a model answer is, with probability
    # `explore_share`, given to a video drawn uniformly from the next `explore_pool` ranked candidates.
    explore_share: float = 0.0
    explore_pool: int = 100

    def __post_init__(self) -> None:
        if self.online_store not in (None, "sqlite", "redis"):
            raise ValueError(f"online_store must be 'sqlite' or 'redis', got {self.online_store!r}")
        for name in ("default_k", "max_k", "max_per_creator", "max_per_category"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("online_store_timeout_seconds", "breaker_reset_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("breaker_failures", "retry_after_seconds", "admission_min_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_in_flight", "admission_queue", "admission_max_wait_seconds", "admission_target_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.experiment_mode not in ("ab", "interleave"):
            raise ValueError(f"experiment_mode must be 'ab' or 'interleave', got {self.experiment_mode!r}")
        for name in ("experiment_share", "explore_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("explore_pool", "impressions_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("impressions_flush_seconds", "impressions_sync_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        if self.recommendations_auth not in ("open", "key"):
            raise ValueError(f"recommendations_auth must be 'open' or 'key', got {self.recommendations_auth!r}")
        for name in ("feedback_max_days", "history_max_users", "history_max_events", "history_max_user_events",
                     "rate_limit_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.feedback_max_events <= FEEDBACK_EVENTS_CEILING:
            raise ValueError(f"feedback_max_events must be in 1..{FEEDBACK_EVENTS_CEILING}, got {self.feedback_max_events}")
        for name in ("feedback_max_age_hours", "feedback_max_future_seconds", "rate_limit_per_second"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @classmethod
    def from_env(cls) -> "ServingConfig":
        """Each field from `RECLOOP_SERVING_<FIELD>` when that variable is set and not empty."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(f"RECLOOP_SERVING_{f.name.upper()}")
            if raw in (None, ""):
                continue
            default = getattr(cls, f.name, None)
            if isinstance(default, bool):
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            elif f.name in ("safety_file", "feedback_spool_dir", "impressions_spool_dir"):
                values[f.name] = Path(raw)
            elif f.name == "ef_search":
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        return cls(**values)
