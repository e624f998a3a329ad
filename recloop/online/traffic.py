"""The served-traffic monitor: what the recommender actually showed on a day, against a reference window.

A feedback loop narrows what is served: the model learns from what it showed, shows more of it, and
learns from that. Offline metrics do not see it (they replay logged data); the impressions do. Per day,
from `silver/impression_outcomes` (every served impression) and the catalogue (`silver/videos` up to
that day):

* `gini`: Gini coefficient of impressions over the catalogue's videos (0: every video shown equally
  often, 1: one video gets everything; unserved videos count as zeros);
* `top1_share`: share of impressions on the 1 % most shown videos of the catalogue (the same definition
  as the drift report's popularity concentration);
* `coverage`: distinct videos served / catalogue size;
* `category_share`: share of impressions per category, and `category_shift`, the total variation
  distance (half the L1 distance) between the day's shares and the reference's.

The reference is the mean of the previous `reference_days` days that have impressions. Breach rules,
in the style of the drift thresholds (defaults below, each overridable by its environment variable):
gini up by more than RECLOOP_TRAFFIC_MAX_GINI_INCREASE (0.05), top-1 % share up by more than
RECLOOP_TRAFFIC_MAX_TOP1_INCREASE (0.05), coverage below RECLOOP_TRAFFIC_MIN_COVERAGE_RATIO (0.8) of the
reference's, category shift above RECLOOP_TRAFFIC_MAX_CATEGORY_SHIFT (0.1). A day with fewer than
RECLOOP_TRAFFIC_MIN_IMPRESSIONS (1000) impressions, or without a reference, is reported, not judged.
RECLOOP_TRAFFIC_REFERENCE_DAYS (7) sets the window.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recloop.online.metrics import OUTCOMES_DATASET

if TYPE_CHECKING:
    from recloop.lake import Lake

REPORT_DATASET = "monitoring/served_traffic"
RECORD = "served_traffic.json"

ENV = {
    "max_gini_increase": "RECLOOP_TRAFFIC_MAX_GINI_INCREASE",
    "max_top1_increase": "RECLOOP_TRAFFIC_MAX_TOP1_INCREASE",
    "min_coverage_ratio": "RECLOOP_TRAFFIC_MIN_COVERAGE_RATIO",
    "max_category_shift": "RECLOOP_TRAFFIC_MAX_CATEGORY_SHIFT",
    "reference_days": "RECLOOP_TRAFFIC_REFERENCE_DAYS",
    "min_impressions": "RECLOOP_TRAFFIC_MIN_IMPRESSIONS",
}


@dataclass(frozen=True)
class TrafficThresholds:
    max_gini_increase: float = 0.05
    max_top1_increase: float = 0.05
    min_coverage_ratio: float = 0.8
    max_category_shift: float = 0.1
    reference_days: int = 7
    min_impressions: int = 1000

    @classmethod
    def from_env(cls) -> TrafficThresholds:
        """Defaults with the environment variables of `ENV` over them; a malformed value is one clear error."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(ENV[f.name])
            if raw in (None, ""):
                continue
            kind = int if f.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{ENV[f.name]}: {raw!r} is not a {'whole number' if kind is int else 'number'}") from None
            if value < 0 or (f.name == "reference_days" and value < 1):
                raise ValueError(f"{ENV[f.name]}: must be {'>= 1' if f.name == 'reference_days' else '>= 0'}, got {raw!r}")
            values[f.name] = value
        return replace(cls(), **values)


def gini(counts: Sequence[float] | np.ndarray) -> float:
    """The Gini coefficient of non-negative counts (0 equal, towards 1 concentrated); NaN when empty or
    all zero."""
    x = np.sort(np.asarray(counts, dtype="float64"))
    n, total = len(x), float(x.sum()) if len(x) else 0.0
    if n == 0 or total <= 0:
        return math.nan
    ranks = np.arange(1, n + 1)
    return float((2.0 * (ranks * x).sum()) / (n * total) - (n + 1.0) / n)


def top_share(counts: Sequence[float] | np.ndarray, catalog_size: int, share: float = 0.01) -> float:
    """Share of the total held by the `share` most counted of `catalog_size` items (at least one item)."""
    x = np.sort(np.asarray(counts, dtype="float64"))[::-1]
    total = float(x.sum())
    if total <= 0:
        return math.nan
    k = max(1, int(math.ceil(share * max(catalog_size, len(x)))))
    return float(x[:k].sum() / total)


@dataclass(frozen=True)
class TrafficStats:
    """One day's served traffic."""

    day: str
    impressions: int
    catalog_size: int
    distinct_videos: int
    gini: float
    top1_share: float
    coverage: float
    category_share: dict[str, float] = field(default_factory=dict)

    def numbers(self) -> dict[str, float]:
        return {"impressions": float(self.impressions), "catalog_size": float(self.catalog_size),
                "distinct_videos": float(self.distinct_videos), "gini": self.gini, "top1_share": self.top1_share,
                "coverage": self.coverage}

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, **self.numbers(), "category_share": dict(self.category_share)}


def traffic_stats(day: str, impressions: pd.DataFrame, catalog: pd.DataFrame) -> TrafficStats:
    """Statistics of one day's `impressions` (`video_id`) over `catalog` (`video_id`, `category`): videos
    served but missing from the catalogue count in it (category "unknown")."""
    served = impressions["video_id"].astype(str).value_counts()
    known = catalog.drop_duplicates("video_id", keep="last")
    cat = pd.Series(known["category"].to_numpy(), index=known["video_id"].astype(str).to_numpy(), dtype=object)
    size = len(set(cat.index) | set(served.index))
    counts = np.zeros(size)
    counts[: len(served)] = served.to_numpy()
    categories = cat.reindex(served.index).fillna("unknown")
    shares = (served.groupby(categories.to_numpy()).sum() / served.sum()) if served.sum() else pd.Series(dtype=float)
    return TrafficStats(
        day=day,
        impressions=int(served.sum()),
        catalog_size=int(size),
        distinct_videos=int(len(served)),
        gini=gini(counts),
        top1_share=top_share(served.to_numpy(), size),
        coverage=len(served) / size if size else math.nan,
        category_share={str(k): float(v) for k, v in sorted(shares.items())},
    )


def category_shift(day: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Total variation distance between two category share vectors."""
    keys = set(day) | set(reference)
    return 0.5 * sum(abs(day.get(k, 0.0) - reference.get(k, 0.0)) for k in keys)


@dataclass
class TrafficReport:
    """A day's served traffic against the reference, the breaches, and the alert-worthy verdict."""

    day: str
    stats: TrafficStats
    reference_days: list[str]
    reference: dict[str, Any]
    checks: dict[str, bool]
    reasons: list[str]
    judged: bool
    status: str

    @property
    def breached(self) -> bool:
        return self.judged and not all(self.checks.values())

    def summary(self) -> dict[str, float]:
        out = self.stats.numbers()
        for key in ("gini", "top1_share", "coverage"):
            if key in self.reference:
                out[f"reference_{key}"] = float(self.reference[key])
        if "category_shift" in self.reference:
            out["category_shift"] = float(self.reference["category_shift"])
        out["breached"] = float(self.breached)
        return out

    def record(self) -> dict[str, Any]:
        return {"day": self.day, "breached": self.breached, "judged": self.judged, "status": self.status,
                "checks": dict(self.checks), "reasons": list(self.reasons), "stats": self.stats.to_dict(),
                "reference_days": list(self.reference_days), "reference": dict(self.reference)}


def read_catalog(lake: Lake, day: str) -> pd.DataFrame:
    """Every video known on `day` (`silver/videos` partitions up to it): video_id, category."""
    frames = [lake.read_partition("silver/videos", p).select(["video_id", "category"]).to_pandas()
              for p in lake.partitions("silver/videos") if p <= day]
    if not frames:
        return pd.DataFrame({"video_id": pd.Series(dtype=str), "category": pd.Series(dtype=str)})
    return pd.concat(frames, ignore_index=True).drop_duplicates("video_id", keep="last")


def day_stats(lake: Lake, day: str, catalog: pd.DataFrame | None = None) -> TrafficStats | None:
    """`traffic_stats` of `day` from the lake; None when the day has no impression outcomes."""
    if not lake.has_partition(OUTCOMES_DATASET, day):
        return None
    impressions = lake.read_partition(OUTCOMES_DATASET, day).select(["video_id"]).to_pandas()
    return traffic_stats(day, impressions, read_catalog(lake, day) if catalog is None else catalog)


def compare(stats: TrafficStats, reference: Sequence[TrafficStats], thresholds: TrafficThresholds) -> TrafficReport:
    """The day against the mean of the reference days, by the thresholds (pure)."""
    t = thresholds
    ref: dict[str, Any] = {}
    if reference:
        for key in ("gini", "top1_share", "coverage"):
            values = [getattr(r, key) for r in reference if math.isfinite(getattr(r, key))]
            if values:
                ref[key] = float(np.mean(values))
        cats = sorted({c for r in reference for c in r.category_share})
        ref["category_share"] = {c: float(np.mean([r.category_share.get(c, 0.0) for r in reference])) for c in cats}
        ref["category_shift"] = category_shift(stats.category_share, ref["category_share"])
    days = [r.day for r in reference]
    if stats.impressions < t.min_impressions:
        return TrafficReport(stats.day, stats, days, ref, {}, [], False,
                             f"{stats.impressions} impressions on {stats.day}: fewer than {t.min_impressions}, not judged")
    if not reference:
        return TrafficReport(stats.day, stats, days, ref, {}, [], False,
                             f"no reference: no impressions in the {t.reference_days} days before {stats.day}")
    checks: dict[str, bool] = {}
    reasons: list[str] = []

    def rule(name: str, ok: bool, text: str) -> None:
        checks[name] = ok
        reasons.append(f"{'PASS' if ok else 'FAIL'} {name}: {text}")

    if "gini" in ref:
        rule("gini", stats.gini - ref["gini"] <= t.max_gini_increase,
             f"Gini {stats.gini:.4f} vs reference {ref['gini']:.4f}; at most +{t.max_gini_increase}")
    if "top1_share" in ref:
        rule("top1_share", stats.top1_share - ref["top1_share"] <= t.max_top1_increase,
             f"top-1% share {stats.top1_share:.4f} vs reference {ref['top1_share']:.4f}; at most +{t.max_top1_increase}")
    if "coverage" in ref:
        rule("coverage", stats.coverage >= t.min_coverage_ratio * ref["coverage"],
             f"coverage {stats.coverage:.4f} vs reference {ref['coverage']:.4f}; at least {t.min_coverage_ratio:.0%} of it")
    rule("category_shift", ref["category_shift"] <= t.max_category_shift,
         f"category shares moved by {ref['category_shift']:.4f} (total variation) from the reference; at most "
         f"{t.max_category_shift}")
    failed = [n for n, ok in checks.items() if not ok]
    status = (f"served traffic of {stats.day} breached {', '.join(failed)}" if failed
              else f"served traffic of {stats.day} within bounds")
    # the failures first: what an alert's text shows
    reasons.sort(key=lambda r: not r.startswith("FAIL"))
    return TrafficReport(stats.day, stats, days, ref, checks, reasons, True, status)


def monitor(lake: Lake, day: str, *, thresholds: TrafficThresholds | None = None) -> TrafficReport:
    """Day `day` against the previous `reference_days` days that have impressions; the report is also
    written to the lake (`monitoring/served_traffic/date=D/served_traffic.json`). Raises
    FileNotFoundError when the day has no impression outcomes."""
    from recloop.lake import partition_key

    t = thresholds or TrafficThresholds.from_env()
    catalog = read_catalog(lake, day)
    stats = day_stats(lake, day, catalog)
    if stats is None:
        raise FileNotFoundError(f"no impression outcomes for {day} ({OUTCOMES_DATASET}): nothing served was "
                                "recorded that day, or the data plane has not joined it yet")
    start = (date.fromisoformat(day) - timedelta(days=t.reference_days)).isoformat()
    reference = [s for p in lake.partitions(OUTCOMES_DATASET) if start <= p < day
                 if (s := day_stats(lake, p, catalog)) is not None]
    report = compare(stats, reference, t)
    lake.write_bytes(f"{partition_key(REPORT_DATASET, day)}/{RECORD}",
                     json.dumps(report.record(), indent=1, default=str).encode())
    return report
