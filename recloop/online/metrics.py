"""Per-arm online metrics of an experiment, with confidence intervals that respect clustering.

Input: `silver/impression_outcomes` (one row per served impression with its outcome: `watched_s`,
`completed`, `liked`, `feedback`; see docs/data_schema.md), read with `read_outcomes`.

Impressions are not independent: one user sees many, one request holds up to k. Every metric here is a
ratio of sums over *units* (users by default, or requests), and its standard error is the delta-method
(linearisation) one over those units:

    R = sum_k y_k / sum_k n_k,    Var(R) ~ K / (K - 1) * sum_k (y_k - R n_k)^2 / (sum_k n_k)^2

with y_k the unit's numerator (watches, seconds watched, completions) and n_k its impressions. This is
the cluster-robust variance of a ratio metric (Deng et al., "Applying the Delta Method in Metric
Analytics", 2018): treating impressions as independent would understate the variance several times
over on engaged users and make every sequential test fire too early.

A/B: the unit (user) belongs to one arm, so the two arms are independent samples and the variance of
their difference is the sum of the variances. Interleaving: each request is credited to the arm whose
placed items were watched more (`interleaving_credit`); the challenger's share of the non-tied requests
is again a ratio over users (wins / decided requests per user), so a heavy user counts as one cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from recloop.lake import Lake

OUTCOMES_DATASET = "silver/impression_outcomes"
CHAMPION_ARM = "champion"
CHALLENGER_ARM = "challenger"
ARMS = (CHAMPION_ARM, CHALLENGER_ARM)
Z95 = 1.959963984540054

# The columns the metrics read (the rest of the table is ignored).
COLUMNS = ("impression_id", "request_id", "user_id", "video_id", "served_at", "position", "experiment", "arm",
           "propensity", "explored", "watched_s", "completed", "liked")

METRICS = ("ctr", "watch_time", "completion_rate")
METRIC_TEXT = {"ctr": "CTR (watched impressions / impressions)", "watch_time": "watch time per impression (s)",
               "completion_rate": "completion rate (completed / impressions)"}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_outcomes(lake: Lake, days: Iterable[str], *, experiment: str | None = None) -> pd.DataFrame:
    """The impression outcomes of `days` (those the lake has), with a `day` column; only the rows of
    `experiment` when given. Missing optional columns come back empty (null)."""
    frames = []
    for day in sorted(set(days)):
        if not lake.has_partition(OUTCOMES_DATASET, day):
            continue
        table = lake.read_partition(OUTCOMES_DATASET, day)
        present = [c for c in COLUMNS if c in table.column_names]
        frame = table.select(present).to_pandas()
        for column in COLUMNS:
            if column not in frame:
                frame[column] = None
        frame["day"] = day
        frames.append(frame)
    if not frames:
        return normalise(pd.DataFrame({c: pd.Series(dtype=object) for c in (*COLUMNS, "day")}))
    out = pd.concat(frames, ignore_index=True)
    if experiment is not None:
        out = out[out["experiment"] == experiment].reset_index(drop=True)
    return normalise(out)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Outcome columns as numbers (missing outcome = not watched), `watched` as 0/1."""
    out = frame.copy()
    out["watched_s"] = pd.to_numeric(out["watched_s"], errors="coerce").fillna(0.0).astype("float64")
    for column in ("completed", "liked"):
        out[column] = out[column].fillna(False).astype(bool) if column in out else False
    out["watched"] = (out["watched_s"] > 0).astype("float64")
    return out


# --------------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and 95 % interval (normal approximation)."""

    value: float
    se: float
    units: int

    @property
    def low(self) -> float:
        return self.value - Z95 * self.se

    @property
    def high(self) -> float:
        return self.value + Z95 * self.se

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "se": self.se, "low": self.low, "high": self.high, "units": self.units}


def ratio_estimate(numerators: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray) -> Estimate:
    """sum(y) / sum(n) over units with its delta-method (cluster-robust) standard error; NaN when there
    are no impressions, an infinite standard error with fewer than two units."""
    y = np.asarray(numerators, dtype="float64")
    n = np.asarray(denominators, dtype="float64")
    k, total = len(n), float(n.sum())
    if k == 0 or total <= 0:
        return Estimate(math.nan, math.nan, k)
    r = float(y.sum()) / total
    if k < 2:
        return Estimate(r, math.inf, k)
    residual = y - r * n
    variance = k / (k - 1) * float((residual**2).sum()) / total**2
    return Estimate(r, math.sqrt(max(variance, 0.0)), k)


def difference(challenger: Estimate, champion: Estimate) -> Estimate:
    """challenger - champion for independent samples (A/B: a unit is in one arm)."""
    return Estimate(challenger.value - champion.value, math.sqrt(challenger.se**2 + champion.se**2),
                    min(challenger.units, champion.units))


# --------------------------------------------------------------------------------------------------
# A/B
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmMetrics:
    """One arm's traffic and metrics; ratio metrics as `Estimate`s clustered by `unit`."""

    arm: str
    impressions: int
    requests: int
    users: int
    unit: str
    ctr: Estimate
    watch_time: Estimate
    completion_rate: Estimate
    distinct_videos: int
    coverage: float  # distinct videos served / catalog size (NaN when the catalog size is unknown)

    def metric(self, name: str) -> Estimate:
        if name not in METRICS:
            raise ValueError(f"unknown online metric {name!r}; expected one of {METRICS}")
        return getattr(self, name)

    def row(self) -> dict[str, Any]:
        """Flat numbers for a table: impressions, users, ctr, ctr_low, ctr_high, ..."""
        out: dict[str, Any] = {"arm": self.arm, "impressions": self.impressions, "requests": self.requests,
                               "users": self.users}
        for name in METRICS:
            e = self.metric(name)
            out.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high, f"{name}_se": e.se})
        out.update({"distinct_videos": self.distinct_videos, "coverage": self.coverage})
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arm_metrics(frame: pd.DataFrame, arm: str, *, catalog_size: int | None = None, unit: str = "user_id") -> ArmMetrics:
    """The metrics of the rows of `frame` served by `arm` (the `arm` column), clustered by `unit`
    (`user_id` or `request_id`)."""
    if unit not in ("user_id", "request_id"):
        raise ValueError(f"unit must be user_id or request_id, got {unit!r}")
    rows = normalise(frame[frame["arm"] == arm]) if len(frame) else normalise(frame)
    grouped = rows.groupby(unit, sort=False).agg(
        n=("watched", "size"), watched=("watched", "sum"), seconds=("watched_s", "sum"),
        completed=("completed", "sum"))
    n = grouped["n"].to_numpy()
    distinct = int(rows["video_id"].nunique())
    return ArmMetrics(
        arm=arm,
        impressions=int(len(rows)),
        requests=int(rows["request_id"].nunique()),
        users=int(rows["user_id"].nunique()),
        unit=unit,
        ctr=ratio_estimate(grouped["watched"].to_numpy(), n),
        watch_time=ratio_estimate(grouped["seconds"].to_numpy(), n),
        completion_rate=ratio_estimate(grouped["completed"].to_numpy(dtype="float64"), n),
        distinct_videos=distinct,
        coverage=distinct / catalog_size if catalog_size else math.nan,
    )


def ab_metrics(frame: pd.DataFrame, *, catalog_size: int | None = None, unit: str = "user_id") -> dict[str, ArmMetrics]:
    """Both arms' metrics, champion first."""
    return {arm: arm_metrics(frame, arm, catalog_size=catalog_size, unit=unit) for arm in ARMS}


def ab_difference(arms: Mapping[str, ArmMetrics], metric: str) -> Estimate:
    """challenger - champion on `metric`, with the standard error of independent arms."""
    return difference(arms[CHALLENGER_ARM].metric(metric), arms[CHAMPION_ARM].metric(metric))


# --------------------------------------------------------------------------------------------------
# Interleaving
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterleavingResult:
    """Requests credited to each arm, ties, and the challenger's win share among non-tied requests."""

    requests: int
    challenger_wins: int
    champion_wins: int
    ties: int
    share: Estimate  # challenger wins / decided requests, clustered by user

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "challenger_wins": self.challenger_wins,
                "champion_wins": self.champion_wins, "ties": self.ties, "challenger_win_share": self.share.to_dict()}


def interleaving_credit(frame: pd.DataFrame, by: str = "watches") -> pd.DataFrame:
    """One row per request: `user_id`, watches of the items each team placed, and `credit` = the arm
    whose items got more watches ("champion" / "challenger"), or "tie" (equal, including none). `by`:
    "watches" (how many of the team's items were watched) or "watch_time" (their watched seconds: the
    credit that follows a watch-time goal).
    Explored slots are left out: their video was drawn at random, not placed by either team's ranking."""
    rows = normalise(frame)
    rows = rows[rows["arm"].isin(ARMS)]
    if "explored" in rows:
        rows = rows[~rows["explored"].fillna(False).astype(bool)]
    if by not in ("watches", "watch_time"):
        raise ValueError(f"interleaving credit by {by!r}: expected 'watches' or 'watch_time'")
    value = "watched" if by == "watches" else "watched_s"
    watches = rows.pivot_table(index=["request_id", "user_id"], columns="arm", values=value, aggfunc="sum",
                               fill_value=0.0)
    for arm in ARMS:
        if arm not in watches:
            watches[arm] = 0.0
    out = watches[list(ARMS)].reset_index()
    out.columns.name = None
    out["credit"] = np.where(out[CHALLENGER_ARM] > out[CHAMPION_ARM], CHALLENGER_ARM,
                             np.where(out[CHAMPION_ARM] > out[CHALLENGER_ARM], CHAMPION_ARM, "tie"))
    return out


def interleaving_result(frame: pd.DataFrame, by: str = "watches") -> InterleavingResult:
    """Credits of every request of `frame` and the challenger's win share with its 95 % interval (the
    ratio wins / decided requests over users: requests of one user are one cluster)."""
    credit = interleaving_credit(frame, by)
    decided = credit[credit["credit"] != "tie"]
    per_user = decided.groupby("user_id").agg(n=("credit", "size"),
                                              wins=("credit", lambda c: float((c == CHALLENGER_ARM).sum())))
    return InterleavingResult(
        requests=int(len(credit)),
        challenger_wins=int((credit["credit"] == CHALLENGER_ARM).sum()),
        champion_wins=int((credit["credit"] == CHAMPION_ARM).sum()),
        ties=int((credit["credit"] == "tie").sum()),
        share=ratio_estimate(per_user["wins"].to_numpy(), per_user["n"].to_numpy()),
    )


def detect_mode(frame: pd.DataFrame) -> str:
    """"interleave" when most requests mix both arms' items, else "ab"."""
    if frame.empty:
        return "ab"
    arms = frame[frame["arm"].isin(ARMS)].groupby("request_id")["arm"].nunique()
    return "interleave" if len(arms) and float((arms > 1).mean()) > 0.5 else "ab"
