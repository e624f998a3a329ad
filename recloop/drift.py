"""Drift monitoring: each new daily partition against the reference, the champion's training window.

`detect_drift(lake, partition, reference_partitions)` answers "does day D still look like the data the
champion was trained on?" with a deterministic, explained decision (`DriftResult`), an Evidently HTML
report stored in the lake (`monitoring/drift/date=D/report.html`; `recloop.drift_report`: a summary on
top, the drifted columns first and in shares), its summary as JSON next to it (`summary.json`) and a
flat dict of summary numbers (Dagster asset metadata, so the UI plots every number over partitions).

What is compared — one row per impression (`partition_frame`), the day's events joined with what was
known about their user and video:

* engagement: `watched_s`, `watch_ratio` (watched_s / duration), `completed`, `liked`;
* context: `surface`, `position`;
* user: `device`, `country`, `age_bucket`, `user_new_24h` (signed up less than 24 h before the
  impression), `user_tenure_days`, and from the feature snapshot the ranker read while serving the day
  (the previous day's, as Feast's point-in-time retrieval returns it): `user_impressions_1d`,
  `user_watch_s_1d`, `user_completion_rate_28d`, `user_category_share_28d` (the user's 28-day watch
  share of the shown video's category);
* video: `category`, `video_duration_s`, `video_age_days`, `video_new_24h`, `video_impressions_1d`.

How:

* feature drift per column with Evidently's own distance methods (`ValueDrift`), by default the
  Wasserstein distance normalised by the reference's standard deviation for numerical columns and the
  Jensen-Shannon distance for categorical ones. Distances, not p-values: at 20k impressions a day a
  KS or chi-square test rejects differences nobody would act on, while a distance measures how large
  the change is and stays put on stationary data (monitoring/drift.yaml records the measured margins);
* prediction drift: the champion's two-tower score u.v of every impression of the day vs of the
  reference's impressions (the same `ValueDrift`, on a `champion_score` column). The retrieval score
  decides which videos reach the ranker, costs two tower passes (no ANN search, no ranker features),
  and scoring the impressions that were actually served compares like with like;
* recommender signals: popularity concentration (share of impressions on the top 1% videos, the day vs
  the reference days' mean), cold-start shares (impressions whose user / video has no impression in the
  reference window, the champion's training data, above the share the reference's own last day shows),
  and the shift of the champion's user embeddings (Evidently's embedding distance between the mean user
  embedding of the day's and the reference's impressions).

Methods, thresholds, which columns and signals may raise an alert, the minimum sample size and the
decision rule live in monitoring/drift.yaml (`DriftConfig`). The decision is a pure function of the
statistics and the config, so the same data always gets the same decision and the same numbers.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from recloop.config import REPO_ROOT
from recloop.features import (
    ENTITY_KEYS,
    USER_ACTIVITY,
    USER_CATEGORY_AFFINITY,
    VIDEO_POPULARITY,
    feature_dataset,
)
from recloop.lake import Lake, partition_key

if TYPE_CHECKING:  # evidently (~6 s) and torch load only when a report is run or a champion is scored
    from evidently.core.report import Snapshot

    from recloop.model_plane.recommender import MultiStageRecommender
    from recloop.training import TwoTowerResult

DEFAULT_CONFIG = REPO_ROOT / "monitoring" / "drift.yaml"
REPORT_DATASET = "monitoring/drift"

NUMERICAL, CATEGORICAL = "numerical", "categorical"
KINDS = (NUMERICAL, CATEGORICAL)

# The columns `partition_frame` builds that can be tested, and their kind. Besides these the frame holds
# KEY_COLUMNS, which identify the impression and feed the recommender signals but are never tested.
FRAME_COLUMNS: dict[str, str] = {
    "watched_s": NUMERICAL,
    "watch_ratio": NUMERICAL,
    "completed": CATEGORICAL,
    "liked": CATEGORICAL,
    "surface": CATEGORICAL,
    "position": NUMERICAL,
    "device": CATEGORICAL,
    "country": CATEGORICAL,
    "age_bucket": CATEGORICAL,
    "user_new_24h": CATEGORICAL,
    "user_tenure_days": NUMERICAL,
    "user_impressions_1d": NUMERICAL,
    "user_watch_s_1d": NUMERICAL,
    "user_completion_rate_28d": NUMERICAL,
    "user_category_share_28d": NUMERICAL,
    "category": CATEGORICAL,
    "video_duration_s": NUMERICAL,
    "video_age_days": NUMERICAL,
    "video_new_24h": CATEGORICAL,
    "video_impressions_1d": NUMERICAL,
}
KEY_COLUMNS = ("partition", "event_time", "user_id", "video_id")

# Frame columns read from the feature snapshots: (view, feature). An entity without a row in an existing
# snapshot had no event in the view's window, which the feature definitions count as 0; without any
# snapshot the value is unknown (NaN) and the column goes untested when too few values remain.
_SNAPSHOT_COLUMNS: dict[str, tuple[str, str]] = {
    "user_impressions_1d": (USER_ACTIVITY, "impressions_1d"),
    "user_watch_s_1d": (USER_ACTIVITY, "watch_s_1d"),
    "user_completion_rate_28d": (USER_ACTIVITY, "completion_rate_28d"),
    "user_category_share_28d": (USER_CATEGORY_AFFINITY, "watch_share_28d"),
    "video_impressions_1d": (VIDEO_POPULARITY, "impressions_1d"),
}
# The ranker serving day D reads the snapshot of D-1, or of D-2 when that one is late (Feast's 2-day
# ttl): the frame uses the same one.
SNAPSHOT_MAX_AGE_DAYS = 2

# Evidently drift methods that return a distance (drifted when distance >= threshold), by the column
# kinds they accept. p-value tests are left out on purpose (see the module docstring).
DISTANCE_METHODS: dict[str, tuple[str, ...]] = {
    "wasserstein": (NUMERICAL,),
    "ed": (NUMERICAL,),
    "jensenshannon": (NUMERICAL, CATEGORICAL),
    "psi": (NUMERICAL, CATEGORICAL),
    "hellinger": (NUMERICAL, CATEGORICAL),
    "kl_div": (NUMERICAL, CATEGORICAL),
}
# Distances of Evidently's embedding drift method (`DistanceDriftMethod`) between mean embeddings.
EMBEDDING_DISTANCES = ("euclidean", "cosine", "cityblock", "chebyshev")

PREDICTION_DRIFT = "prediction_drift"
USER_EMBEDDING_SHIFT = "user_embedding_shift"
COLD_START_USERS = "cold_start_users"
COLD_START_VIDEOS = "cold_start_videos"
POPULARITY_CONCENTRATION = "popularity_concentration"
SIGNALS = (PREDICTION_DRIFT, USER_EMBEDDING_SHIFT, COLD_START_USERS, COLD_START_VIDEOS,
           POPULARITY_CONCENTRATION)
CHAMPION_SCORE = "champion_score"
# Rows whose user embedding enters the embedding shift, per side (a seeded sample beyond): the mean of
# 200k unit vectors is exact to ~0.002, and 200k x 64 floats stay at 50 MB whatever the traffic.
EMBEDDING_MAX_ROWS = 200_000

_DAY_S = 86_400.0


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _check_known(what: str, names: Iterable[Any], known: Iterable[Any]) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected one of {sorted(known)}")


def _check_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"threshold must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ColumnRule:
    """How one column is tested: Evidently `method`, drifted when the statistic >= `threshold`;
    `alert=False` columns are reported but decide only through the drifted share."""

    kind: str
    method: str
    threshold: float
    alert: bool = True

    def __post_init__(self) -> None:
        _check_known("column kind", [self.kind], KINDS)
        valid = sorted(m for m, kinds in DISTANCE_METHODS.items() if self.kind in kinds)
        if self.method not in valid:
            raise ValueError(f"method {self.method!r} is not an Evidently distance for {self.kind} columns; "
                             f"use one of {valid}")
        _check_threshold(self.threshold)


@dataclass(frozen=True)
class SignalRule:
    """A recommender signal's threshold (drifted when the statistic >= it), whether crossing it alone
    makes the partition drifted, and for the two Evidently-computed signals the method."""

    threshold: float
    alert: bool = True
    method: str | None = None

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)


# The methods each signal accepts (None: the signal has no method).
_SIGNAL_METHODS: dict[str, tuple[str | None, ...]] = {
    PREDICTION_DRIFT: tuple(m for m, kinds in DISTANCE_METHODS.items() if NUMERICAL in kinds),
    USER_EMBEDDING_SHIFT: EMBEDDING_DISTANCES,
    COLD_START_USERS: (None,),
    COLD_START_VIDEOS: (None,),
    POPULARITY_CONCENTRATION: (None,),
}


@dataclass(frozen=True)
class DriftConfig:
    """Which columns and signals are checked, how, and the decision rule (see monitoring/drift.yaml)."""

    columns: dict[str, ColumnRule]
    signals: dict[str, SignalRule]
    min_rows: int = 1000
    drift_share: float = 0.3
    reference_max_rows: int | None = 1_000_000
    popularity_top_share: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_known("column(s)", self.columns, FRAME_COLUMNS)
        for name, column in self.columns.items():
            if column.kind != FRAME_COLUMNS[name]:
                raise ValueError(f"column {name!r} is {FRAME_COLUMNS[name]}, not {column.kind}")
        _check_known("signal(s)", self.signals, SIGNALS)
        for name, signal in self.signals.items():
            if signal.method not in _SIGNAL_METHODS[name]:
                raise ValueError(f"signal {name!r}: method must be one of {list(_SIGNAL_METHODS[name])}, "
                                 f"got {signal.method!r}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise ValueError(f"min_rows must be an integer >= 1, got {self.min_rows!r}")
        if not 0 < self.drift_share <= 1:
            raise ValueError(f"drift_share must be in (0, 1], got {self.drift_share!r}")
        if self.reference_max_rows is not None and self.reference_max_rows < self.min_rows:
            raise ValueError(f"reference_max_rows ({self.reference_max_rows}) must be >= min_rows "
                             f"({self.min_rows})")
        if not 0 < self.popularity_top_share < 1:
            raise ValueError(f"popularity_top_share must be in (0, 1), got {self.popularity_top_share!r}")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> DriftConfig:
        """The config in `path` (default monitoring/drift.yaml of the repo), with `overrides` (same layout
        as the file, e.g. `{"columns": {"device": {"threshold": 0.2}}, "min_rows": 50}`) merged on top.
        Errors name the file and the problem."""
        source = Path(path) if path is not None else DEFAULT_CONFIG
        raw = yaml.safe_load(source.read_text()) or {}
        if overrides:
            raw = _merged(raw, overrides)
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DriftConfig:
        """Build from the file's layout: `defaults` per kind, `columns` (each merged over its kind's
        defaults), `signals`, `decision.drift_share` and the top-level numbers."""
        numbers = ("min_rows", "reference_max_rows", "seed", "popularity_top_share")
        _check_known("key(s)", raw, ("defaults", "columns", "signals", "decision", *numbers))
        defaults = raw.get("defaults") or {}
        _check_known("defaults kind(s)", defaults, KINDS)
        specs = raw.get("columns") or {}
        _check_known("column(s)", specs, FRAME_COLUMNS)
        columns = {}
        for name, spec in specs.items():
            kind = FRAME_COLUMNS[name]
            columns[name] = ColumnRule(kind=kind, **{**(defaults.get(kind) or {}), **(spec or {})})
        signals = {name: SignalRule(**(spec or {})) for name, spec in (raw.get("signals") or {}).items()}
        decision = raw.get("decision") or {}
        _check_known("decision key(s)", decision, ("drift_share",))
        return cls(columns=columns, signals=signals, **{k: raw[k] for k in numbers if k in raw}, **decision)


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, recursively for nested mappings."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnDrift:
    """One column's test. `statistic` is NaN (and `drifted` False) when the column was not tested
    because one side had fewer than `min_rows` values."""

    column: str
    kind: str
    method: str
    statistic: float
    threshold: float
    drifted: bool
    n_current: int
    n_reference: int
    alert: bool = True

    @property
    def tested(self) -> bool:
        return not math.isnan(self.statistic)

    def explain(self) -> str:
        """E.g. `device: jensenshannon 0.213 >= 0.100`, or why it was not tested."""
        if not self.tested:
            return (f"{self.column}: not tested, {self.n_current} values in the partition and "
                    f"{self.n_reference} in the reference")
        sign = ">=" if self.drifted else "<"
        return f"{self.column}: {self.method} {self.statistic:.3f} {sign} {self.threshold:.3f}"


@dataclass(frozen=True)
class Signal:
    """One recommender signal. `statistic` is NaN when it was skipped (`detail` says why); `values` holds
    the numbers behind it (e.g. the day's and the reference's popularity share)."""

    name: str
    statistic: float
    threshold: float
    drifted: bool
    alert: bool
    detail: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def computed(self) -> bool:
        return not math.isnan(self.statistic)

    def explain(self) -> str:
        """E.g. `cold_start_users: 0.572 >= 0.400 (share of ...)`, or why it was skipped."""
        if not self.computed:
            return f"{self.name}: {self.detail}"
        sign = ">=" if self.drifted else "<"
        return f"{self.name}: {self.statistic:.3f} {sign} {self.threshold:.3f} ({self.detail})"


@dataclass(frozen=True)
class DriftResult:
    """The decision for one partition and everything behind it.

    `reasons` explains the decision: with `drifted`, one line per trigger (an alerting column, the
    drifted share, an alerting signal), then notes (drifted columns and signals that do not alert,
    columns not tested, signals skipped); without, a "no drift" line, then the notes. `decided` is False
    when the partition or the reference had fewer than `min_rows` impressions: no decision, never an
    alert. `summary` holds finite floats only (Dagster metadata); `report_uri` and `summary_uri` (the
    report's summary as JSON, `recloop.drift_report.report_summary`) are None when no report was
    written."""

    drifted: bool
    reasons: list[str]
    columns: list[ColumnDrift]
    signals: dict[str, Signal]
    summary: dict[str, float]
    report_uri: str | None
    partition: str = ""
    reference_partitions: list[str] = field(default_factory=list)
    decided: bool = True
    champion_version: str | None = None
    summary_uri: str | None = None


# --------------------------------------------------------------------------------------------------
# The per-impression frame
# --------------------------------------------------------------------------------------------------


def _latest(
    lake: Lake, dataset: str, upto: str, key: str, ids: pa.Array, columns: list[str]
) -> pd.DataFrame:
    """The rows of `ids` in `dataset`'s partitions up to `upto`, the latest delivery of a key winning."""
    tables = []
    for p in lake.partitions(dataset):
        if p <= upto:
            t = lake.read_partition(dataset, p).select(columns)
            tables.append(t.filter(pc.is_in(t[key], value_set=ids)))
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pa.concat_tables(tables).to_pandas().drop_duplicates(key, keep="last")


def _snapshot(lake: Lake, view: str, partition: str) -> pd.DataFrame | None:
    """The newest snapshot of `view` that serving day `partition` could read, indexed by its keys."""
    day = date.fromisoformat(partition)
    for back in range(1, SNAPSHOT_MAX_AGE_DAYS + 1):
        p = (day - timedelta(days=back)).isoformat()
        if lake.has_partition(feature_dataset(view), p):
            snapshot = lake.read_partition(feature_dataset(view), p).to_pandas()
            return snapshot.set_index(list(ENTITY_KEYS[view]))
    return None


def _flag(values: pd.Series) -> pd.Series:
    """Booleans as "true"/"false" categories (missing stays missing)."""
    return values.map({True: "true", False: "false"})


def _frame(lake: Lake, partitions: Sequence[str]) -> pd.DataFrame:
    """The impressions of `partitions` with their user, video and snapshot columns (`partition_frame`);
    users and videos are read once, as known at the end of the last partition."""
    parts = sorted(set(partitions))
    if not parts:
        raise ValueError("no partitions given")
    tables = []
    for p in parts:
        t = lake.read_partition("silver/events", p)
        tables.append(t.append_column("partition", pa.array([p] * t.num_rows, pa.string())))
    events = pa.concat_tables(tables, promote_options="default")  # request_id: absent in days validated before it
    users = _latest(lake, "silver/users", parts[-1], "user_id", pc.unique(events["user_id"]),
                    ["user_id", "country", "age_bucket", "signup_time", "device"])
    videos = _latest(lake, "silver/videos", parts[-1], "video_id", pc.unique(events["video_id"]),
                     ["video_id", "category", "duration_s", "upload_time"])
    ev = events.to_pandas().merge(users, on="user_id", how="left").merge(videos, on="video_id", how="left")

    t = pd.to_datetime(ev["event_time"], utc=True)
    tenure = (t - pd.to_datetime(ev["signup_time"], utc=True)).dt.total_seconds() / _DAY_S
    video_age = (t - pd.to_datetime(ev["upload_time"], utc=True)).dt.total_seconds() / _DAY_S
    watched = ev["watched_s"].astype("float64")
    duration = ev["duration_s"].astype("float64")
    frame = pd.DataFrame(
        {
            "partition": ev["partition"],
            "event_time": t,
            "user_id": ev["user_id"],
            "video_id": ev["video_id"],
            "watched_s": watched,
            "watch_ratio": watched / duration,
            "completed": _flag(ev["completed"]),
            "liked": _flag(ev["liked"]),
            "surface": ev["surface"],
            "position": ev["position"].astype("float64"),
            "device": ev["device"],
            "country": ev["country"],
            "age_bucket": ev["age_bucket"],
            "user_new_24h": _flag(tenure.lt(1.0).where(tenure.notna())),
            "user_tenure_days": tenure,
            "category": ev["category"],
            "video_duration_s": duration,
            "video_age_days": video_age,
            "video_new_24h": _flag(video_age.lt(1.0).where(video_age.notna())),
        }
    )
    for column in _SNAPSHOT_COLUMNS:
        frame[column] = np.nan
    for p in parts:
        rows = np.flatnonzero(frame["partition"].to_numpy() == p)
        day = frame.iloc[rows]
        for view in dict.fromkeys(v for v, _ in _SNAPSHOT_COLUMNS.values()):
            snapshot = _snapshot(lake, view, p)
            if snapshot is None:
                continue
            keys = [day[k].to_numpy() for k in ENTITY_KEYS[view]]
            index = pd.MultiIndex.from_arrays(keys) if len(keys) > 1 else pd.Index(keys[0])
            for column, (v, feature) in _SNAPSHOT_COLUMNS.items():
                if v == view:
                    values = snapshot[feature].reindex(index).fillna(0.0).to_numpy(np.float64)
                    frame.iloc[rows, frame.columns.get_loc(column)] = values
    return frame[[*KEY_COLUMNS, *FRAME_COLUMNS]]


def partition_frame(lake: Lake, partition: str) -> pd.DataFrame:
    """One row per impression of `silver/events` day `partition`: `KEY_COLUMNS` then `FRAME_COLUMNS`
    (see the module docstring). Users and videos are the latest accepted rows up to the day; snapshot
    features come from the snapshot serving read (day D-1, else D-2; NaN without one)."""
    return _frame(lake, [partition])


def _sample(frame: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    """At most `max_rows` rows of `frame`, drawn with `seed`, in their original order."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_rows, replace=False))
    return frame.iloc[rows].reset_index(drop=True)


def reference_frame(
    lake: Lake, partitions: Sequence[str], max_rows: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The frames of all `partitions` together (users and videos read once, up to the last of them),
    at most `max_rows` rows (a seeded sample)."""
    return _sample(_frame(lake, partitions), max_rows, seed)


def champion_reference(bundle_dir: str | Path) -> list[str]:
    """The training partitions of the model bundle in `bundle_dir`: the training plan recorded in its
    metadata (`save_bundle(..., metadata={"plan": ...})` by the model plane), else the two-tower's
    training window."""
    manifest = json.loads((Path(bundle_dir) / "bundle.json").read_text())
    plan = (manifest.get("metadata") or {}).get("plan") or {}
    partitions = plan.get("train_partitions") or manifest.get("training_window", {}).get("partitions")
    if not partitions:
        raise ValueError(f"the bundle in {bundle_dir} records no training partitions")
    return sorted(partitions)


# --------------------------------------------------------------------------------------------------
# Column drift (Evidently)
# --------------------------------------------------------------------------------------------------


def _evidently_frame(frame: pd.DataFrame, rules: Mapping[str, ColumnRule]) -> pd.DataFrame:
    """The tested columns, categorical ones as pandas categoricals: Evidently's value counts and
    histograms on category codes instead of Python strings took a 1M-row report from 20 s to 12 s."""
    dtypes = {name: "category" if rule.kind == CATEGORICAL else "float64" for name, rule in rules.items()}
    return pd.DataFrame({name: frame[name].astype(dtype) for name, dtype in dtypes.items()})


def column_drift(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    rules: Mapping[str, ColumnRule],
    *,
    min_rows: int,
    timestamp: datetime | None = None,
) -> tuple[list[ColumnDrift], Snapshot | None]:
    """Test each column of `rules` with Evidently's `ValueDrift` (its method and threshold), all in one
    Evidently report. A column with fewer than `min_rows` non-null values on either side is not tested
    (statistic NaN). Returns the results in `rules` order and the report's snapshot (None when no column
    could be tested)."""
    counts = {name: (int(current[name].notna().sum()), int(reference[name].notna().sum())) for name in rules}
    testable = {name: rule for name, rule in rules.items() if min(counts[name]) >= min_rows}
    statistics: dict[str, float] = {}
    snapshot = None
    if testable:
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import ValueDrift

        definition = DataDefinition(
            numerical_columns=[n for n, r in testable.items() if r.kind == NUMERICAL],
            categorical_columns=[n for n, r in testable.items() if r.kind == CATEGORICAL],
        )
        report = Report([ValueDrift(column=n, method=r.method, threshold=r.threshold)
                         for n, r in testable.items()])
        snapshot = report.run(
            Dataset.from_pandas(_evidently_frame(current, testable), data_definition=definition),
            Dataset.from_pandas(_evidently_frame(reference, testable), data_definition=definition),
            timestamp=timestamp,
        )
        statistics = {m["config"]["column"]: float(m["value"]) for m in snapshot.dict()["metrics"]}
    out = []
    for name, rule in rules.items():
        statistic = statistics.get(name, math.nan)
        n_current, n_reference = counts[name]
        out.append(ColumnDrift(name, rule.kind, rule.method, statistic, rule.threshold,
                               bool(statistic >= rule.threshold), n_current, n_reference, rule.alert))
    return out, snapshot


# --------------------------------------------------------------------------------------------------
# Recommender signals
# --------------------------------------------------------------------------------------------------


def _signal(name: str, rule: SignalRule, statistic: float, detail: str, **values: float) -> Signal:
    return Signal(name=name, statistic=float(statistic), threshold=rule.threshold,
                  drifted=bool(statistic >= rule.threshold), alert=rule.alert, detail=detail,
                  values={k: float(v) for k, v in values.items()})


def _skipped(name: str, rule: SignalRule, why: str) -> Signal:
    return Signal(name=name, statistic=math.nan, threshold=rule.threshold, drifted=False, alert=rule.alert,
                  detail=f"skipped: {why}")


def _top_share(video_ids: pd.Series, share: float) -> float:
    """Share of impressions on the `share` most shown videos (at least one video)."""
    counts = video_ids.value_counts(sort=True).to_numpy()
    top = max(1, math.ceil(share * len(counts)))
    return float(counts[:top].sum() / counts.sum())


def _unseen_share(ids: pd.Series, seen: pd.Series) -> float:
    """Share of `ids` not among `seen`."""
    return float((~ids.isin(set(seen))).mean()) if len(ids) else 0.0


def _data_signals(current: pd.DataFrame, reference: pd.DataFrame, config: DriftConfig) -> dict[str, Signal]:
    """Cold-start shares and popularity concentration, from the full (unsampled) reference.

    How many of a day's users are new to a window depends on traffic per user (20k impressions a day
    over 5,000 users: 15-20% against 7 days; 3k a day: 60%), so a cold-start share is measured against
    what the reference itself shows, with look-backs of the same length: the share of the day's
    impressions whose user is not in the reference's last n-1 days, minus the share of the reference's
    last day whose user is not in the n-1 days before it (n reference days; with one day, the plain
    share). `values["training_window"]` is the share of the day's impressions not in the whole
    reference, the champion's training data."""
    out: dict[str, Signal] = {}
    days = sorted(reference["partition"].unique())
    partition = reference["partition"]
    window = reference[partition > days[0]] if len(days) > 1 else reference
    last, earlier = reference[partition == days[-1]], reference[partition < days[-1]]
    for name, key, what in ((COLD_START_USERS, "user_id", "user"), (COLD_START_VIDEOS, "video_id", "video")):
        if name in config.signals:
            now = _unseen_share(current[key], window[key])
            before = _unseen_share(last[key], earlier[key]) if len(days) > 1 else 0.0
            whole = _unseen_share(current[key], reference[key])
            look_back = max(len(days) - 1, 1)
            detail = (f"share of impressions whose {what} is not in the {look_back}-day look-back: "
                      f"{now:.3f} of the day's vs {before:.3f} of the reference's last day")
            out[name] = _signal(name, config.signals[name], now - before, detail,
                                current=now, reference=before, training_window=whole)
    if POPULARITY_CONCENTRATION in config.signals:
        top = config.popularity_top_share
        now = _top_share(current["video_id"], top)
        before = float(np.mean([_top_share(g, top) for _, g in reference.groupby("partition")["video_id"]]))
        detail = f"share on the top {top:.0%} videos: {now:.3f} of the day's, {before:.3f} of the reference's"
        rule = config.signals[POPULARITY_CONCENTRATION]
        out[POPULARITY_CONCENTRATION] = _signal(POPULARITY_CONCENTRATION, rule, abs(now - before), detail,
                                                current=now, reference=before)
    return out


def _two_tower(champion: MultiStageRecommender | TwoTowerResult) -> TwoTowerResult | None:
    """The champion's two-tower model: from a recommender (`load_bundle`; None when it has no two-tower
    source), or the model itself."""
    from recloop.model_plane.recommender import MultiStageRecommender

    if isinstance(champion, MultiStageRecommender):
        return champion.two_tower.model if champion.two_tower is not None else None
    return champion


def _champion_scores(tower: TwoTowerResult, frame: pd.DataFrame) -> np.ndarray:
    """The champion's two-tower score u.v of each impression, the user as of the impression's time."""
    from recloop.training import retrieval_scores

    return retrieval_scores(tower, frame[["user_id", "video_id", "event_time"]]).astype(np.float64)


def _user_embeddings(tower: TwoTowerResult, frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The champion's embedding (as of its training cutoff) of the user of each impression, one row per
    impression (at most EMBEDDING_MAX_ROWS, a seeded sample): heavy users weigh as much as they are
    served, on the day as in the reference."""
    from recloop.training import user_embeddings

    users = _sample(frame[["user_id"]], EMBEDDING_MAX_ROWS, seed)["user_id"]
    codes, uniques = pd.factorize(users)
    return pd.DataFrame(user_embeddings(tower, list(uniques))[codes])


def _champion_signals(
    tower: TwoTowerResult | None,
    score: ColumnDrift | None,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    config: DriftConfig,
) -> dict[str, Signal]:
    """Prediction drift (from the `champion_score` column's test `score`) and the user-embedding shift,
    or why they were skipped."""
    out: dict[str, Signal] = {}
    rule = config.signals.get(PREDICTION_DRIFT)
    if rule is not None:
        if tower is None:
            out[PREDICTION_DRIFT] = _skipped(PREDICTION_DRIFT, rule, "no champion given")
        elif score is None or not score.tested:
            out[PREDICTION_DRIFT] = _skipped(PREDICTION_DRIFT, rule, "too few scored impressions")
        else:
            detail = (f"{rule.method} distance between the champion's two-tower scores of the day's and the "
                      f"reference's impressions")
            out[PREDICTION_DRIFT] = _signal(PREDICTION_DRIFT, rule, score.statistic, detail)
    rule = config.signals.get(USER_EMBEDDING_SHIFT)
    if rule is not None:
        if tower is None:
            out[USER_EMBEDDING_SHIFT] = _skipped(USER_EMBEDDING_SHIFT, rule, "no champion given")
        else:
            # Evidently's own statistic, called directly: its EmbeddingsDrift metric also fits a t-SNE of
            # 5,000 points for the report's picture, ~40 s on two cores for a 2-D plot.
            from evidently.metrics.embeddings import DistanceDriftMethod

            method = DistanceDriftMethod(dist=rule.method, threshold=rule.threshold)
            distance, _, _ = method(_user_embeddings(tower, current, config.seed),
                                    _user_embeddings(tower, reference, config.seed))
            detail = (f"{rule.method} distance between the mean champion user embeddings of the day's and "
                      f"the reference's impressions")
            out[USER_EMBEDDING_SHIFT] = _signal(USER_EMBEDDING_SHIFT, rule, float(distance), detail)
    return out


# --------------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------------


def _decide(
    columns: list[ColumnDrift], signals: dict[str, Signal], config: DriftConfig
) -> tuple[bool, list[str]]:
    """Drifted or not, and why (triggers first, then notes). Pure: statistics and config in, decision out."""
    tested = [c for c in columns if c.tested]
    drifted_columns = [c for c in tested if c.drifted]
    share = len(drifted_columns) / len(tested) if tested else 0.0
    triggers = [c.explain() for c in drifted_columns if c.alert]
    if tested and share >= config.drift_share:
        names = ", ".join(c.column for c in drifted_columns)
        triggers.append(f"{len(drifted_columns)} of {len(tested)} columns drifted (share {share:.2f} >= "
                        f"drift_share {config.drift_share:.2f}): {names}")
    triggers += [s.explain() for s in signals.values() if s.drifted and s.alert]
    quiet = [*(c.explain() for c in drifted_columns if not c.alert),
             *(s.explain() for s in signals.values() if s.drifted and not s.alert)]
    notes = [f"informational (alert: false): {line}" for line in quiet]
    notes += [f"{c.explain()}, min_rows {config.min_rows}" for c in columns if not c.tested]
    notes += [s.explain() for s in signals.values() if not s.computed]
    if triggers:
        return True, triggers + notes
    ratios = [(c.statistic / c.threshold, c.explain()) for c in tested]
    ratios += [(s.statistic / s.threshold, s.explain()) for s in signals.values() if s.computed]
    closest = f"; closest to its threshold: {max(ratios)[1]}" if ratios else ""
    verdict = (f"no drift: {len(drifted_columns)} of {len(tested)} columns drifted, no alerting column or "
               f"signal crossed its threshold{closest}")
    return False, [verdict, *notes]


def _summary(
    columns: list[ColumnDrift], signals: dict[str, Signal], numbers: dict[str, float]
) -> dict[str, float]:
    """Flat finite floats: `numbers`, the column counts, then every computed statistic."""
    tested = [c for c in columns if c.tested]
    drifted = sum(c.drifted for c in tested)
    out = {
        **numbers,
        "columns.tested": float(len(tested)),
        "columns.drifted": float(drifted),
        "columns.drifted_share": drifted / len(tested) if tested else 0.0,
        **{f"column.{c.column}": c.statistic for c in tested},
    }
    for s in signals.values():
        if s.computed:
            out[f"signal.{s.name}"] = s.statistic
            out.update({f"signal.{s.name}.{k}": v for k, v in s.values.items()})
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def report_key(partition: str) -> str:
    """The lake key of `partition`'s HTML report."""
    return f"{partition_key(REPORT_DATASET, partition)}/report.html"


def summary_key(partition: str) -> str:
    """The lake key of `partition`'s report summary (JSON, next to the HTML report)."""
    return f"{partition_key(REPORT_DATASET, partition)}/summary.json"


def detect_drift(
    lake: Lake,
    partition: str,
    reference_partitions: Sequence[str],
    *,
    config: DriftConfig | None = None,
    champion: MultiStageRecommender | TwoTowerResult | None = None,
    champion_version: str | None = None,
    write_report: bool = True,
) -> DriftResult:
    """Compare day `partition` with `reference_partitions` (the champion's training window, see
    `champion_reference`) and decide whether it drifted (see the module docstring and
    monitoring/drift.yaml, the default `config`).

    `champion` (a recommender from `load_bundle`, or its `TwoTowerResult`) enables prediction drift and the
    user-embedding shift; without it they are skipped and the reasons say so. `champion_version` names it
    in the report. With `write_report` a decided day's Evidently HTML report goes to the lake at
    `report_key(partition)` and its summary (JSON) at `summary_key(partition)`, replacing earlier ones."""
    config = config or DriftConfig.load()
    reference_partitions = sorted(set(reference_partitions))
    current = partition_frame(lake, partition)
    reference_full = reference_frame(lake, reference_partitions)
    rows = {"rows.current": float(len(current)), "rows.reference": float(len(reference_full))}
    short = [f"{what} has {n} events < min_rows {config.min_rows}"
             for what, n in (("the partition", len(current)), ("the reference", len(reference_full)))
             if n < config.min_rows]
    if short:
        columns = [ColumnDrift(name, rule.kind, rule.method, math.nan, rule.threshold, False,
                               int(current[name].notna().sum()), int(reference_full[name].notna().sum()),
                               rule.alert)
                   for name, rule in config.columns.items()]
        signals = {name: _skipped(name, rule, "no decision") for name, rule in config.signals.items()}
        summary = _summary(columns, signals, {"decided": 0.0, "drifted": 0.0, **rows})
        return DriftResult(False, [f"no decision: {'; '.join(short)}"], columns, signals, summary, None,
                           partition, reference_partitions, decided=False, champion_version=champion_version)

    reference = _sample(reference_full, config.reference_max_rows, config.seed)
    rules = dict(config.columns)
    tower = _two_tower(champion) if champion is not None else None
    prediction = config.signals.get(PREDICTION_DRIFT)
    if tower is not None and prediction is not None:
        assert prediction.method is not None  # DriftConfig requires one for this signal
        current = current.assign(**{CHAMPION_SCORE: _champion_scores(tower, current)})
        reference = reference.assign(**{CHAMPION_SCORE: _champion_scores(tower, reference)})
        rules[CHAMPION_SCORE] = ColumnRule(NUMERICAL, prediction.method, prediction.threshold,
                                           prediction.alert)
    day = date.fromisoformat(partition)
    tested, snapshot = column_drift(current, reference, rules, min_rows=config.min_rows,
                                    timestamp=datetime(day.year, day.month, day.day))
    columns = [c for c in tested if c.column != CHAMPION_SCORE]
    score = next((c for c in tested if c.column == CHAMPION_SCORE), None)
    found = {**_data_signals(current, reference_full, config),
             **_champion_signals(tower, score, current, reference, config)}
    signals = {name: found[name] for name in config.signals}  # in the config's order

    drifted, reasons = _decide(columns, signals, config)
    summary = _summary(columns, signals, {"decided": 1.0, "drifted": float(drifted), **rows})
    result = DriftResult(drifted, reasons, columns, signals, summary, None, partition, reference_partitions,
                         champion_version=champion_version)
    if not write_report:
        return result
    from recloop.drift_report import build_report

    report, report_summary = build_report(result, tested=tested, columns_snapshot=snapshot, current=current,
                                          reference=reference, drift_share=config.drift_share,
                                          timestamp=datetime(day.year, day.month, day.day))
    uri = lake.write_bytes(report_key(partition), report.get_html_str(as_iframe=False).encode("utf-8"))
    summary_uri = lake.write_bytes(summary_key(partition), json.dumps(
        {**report_summary, "report": uri}, indent=1, allow_nan=False).encode("utf-8"))
    return replace(result, report_uri=uri, summary_uri=summary_uri)
