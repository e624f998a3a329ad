"""A range of days in bulk (history imports, `recloop run --start --end`): the same steps as the daily
data plane (`recloop.lifecycle.data`), one pass over every day of `[first, last]`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.lifecycle.alerts import Alert

if TYPE_CHECKING:
    from recloop.lake import Lake
    from recloop.validation import SchemaReport

# Bronze rows a range keeps in memory between ingestion and validation (more are read back from the lake).
RANGE_KEEP_ROWS = 3_000_000
# How many days a summary lists by name (the rest are counted).
LISTED_DAYS = 20


def history_range(landing: Lake, first: str | None = None, last: str | None = None) -> tuple[str, str]:
    """The `[first, last]` of a range run: as given, else the first and last day the landing zone holds
    events for. Raises ValueError when the landing zone has none."""
    from recloop.ingestion import landed_days

    if first and last:
        return first, last
    days = list(landed_days(landing, "events", first or None, last or None))
    if not days:
        raise ValueError(f"the landing zone {landing.uri()} holds no events"
                         + (f" between {first or 'its start'} and {last or 'its end'}" if first or last else "")
                         + ": import a history (recloop import PATH) or land files first")
    return first or days[0], last or days[-1]


def _listed(days: Sequence[str]) -> list[str]:
    days = list(days)
    return days if len(days) <= LISTED_DAYS else [*days[:LISTED_DAYS], f"... and {len(days) - LISTED_DAYS} more"]


@dataclass(frozen=True)
class RangeIngestion:
    """A range's landing files in bronze, one partition per table and landed day."""

    first: str
    last: str
    results: Mapping[str, Mapping[str, Any]]  # table -> day -> recloop.ingestion.IngestResult

    def days(self, table: str) -> list[str]:
        return sorted(self.results.get(table, {}))

    def in_memory(self, table: str) -> dict[str, tuple[Any, Any]]:
        """The bronze tables ingestion kept in memory: day -> (table, manifest)."""
        return {d: (r.table, r.manifest) for d, r in self.results.get(table, {}).items() if r.table is not None}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"first": self.first, "last": self.last}
        for table, days in self.results.items():
            ms = [r.manifest for r in days.values()]
            out[table] = {
                "days": len(days),
                "rows": sum(m.rows for m in ms),
                "bytes": sum(r.written.bytes for r in days.values()),
                "files": sum(len(m.files) for m in ms),
                "malformed_lines": sum(f.malformed_rows for m in ms for f in m.files),
                "encoding_errors": sum(f.encoding_errors for m in ms for f in m.files),
                "rejected_files": [dict(r.__dict__) for m in ms for r in m.rejected_files][:LISTED_DAYS],
            }
        events = self.days("events")
        calendar = (_date_of(self.last) - _date_of(self.first)).days + 1 if self.first and self.last else 0
        out["days_with_event_files"] = len(events)
        out["days_without_events"] = calendar - len(events)
        return out


def _date_of(day: str):
    from datetime import date

    return date.fromisoformat(day)


def ingest_range(landing: Lake, lake: Lake, first: str, last: str) -> RangeIngestion:
    """Every landed day of `[first, last]` into bronze in one pass (`recloop.ingestion.ingest_range`):
    one listing per table, one ingestion time, days without files left alone."""
    from recloop.ingestion import ingest_range as _ingest

    return RangeIngestion(first, last, _ingest(landing, lake, first, last, keep_rows=RANGE_KEEP_ROWS))


@dataclass(frozen=True)
class RangeSchemaCheck:
    """The schema-level GX check of every ingested day of a range; a failure names the days and alerts."""

    first: str
    last: str
    reports: Mapping[str, Mapping[str, SchemaReport]]  # table -> day -> report
    alert: Alert | None

    @property
    def failures(self) -> list[str]:
        return [f"{table} of {day}: {'; '.join(r.failures)}" for table, days in self.reports.items()
                for day, r in sorted(days.items()) if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def description(self) -> str:
        failures = self.failures
        if not failures:
            return f"schema conforms on every ingested day of {self.first}..{self.last}"
        return f"{len(failures)} day(s) failed their schema check: " + "; ".join(failures[:3]) + (
            "; ..." if len(failures) > 3 else "")

    def summary(self) -> dict[str, Any]:
        warnings = sorted({w for days in self.reports.values() for r in days.values() for w in r.warnings})
        return {"first": self.first, "last": self.last, "failures": _listed(self.failures), "warnings": warnings,
                "days_checked": {t: len(d) for t, d in self.reports.items()},
                "extra_columns_dropped": sorted({c for days in self.reports.values() for r in days.values()
                                                 for c in r.extra_columns})}


def check_schema_range(lake: Lake, ingestion: RangeIngestion, *, expectations_dir: Path | str,
                       run_id: str) -> RangeSchemaCheck:
    """Great Expectations' schema-level expectations on every ingested day of the range (one GX run per
    distinct column set; a day without rows is a day without data, not a failure), with a
    `validation.failed` alert naming the failed days."""
    from recloop.data.schemas import TABLE_ORDER
    from recloop.validation import schema_reports_range

    reports = {t: schema_reports_range(lake, t, ingestion.days(t), expectations_dir=Path(expectations_dir),
                                       bronze=ingestion.in_memory(t)) for t in TABLE_ORDER}
    check = RangeSchemaCheck(ingestion.first, ingestion.last, reports, None)
    if check.passed:
        return check
    asset = "history/bronze"
    alert = Alert("validation.failed", key=f"{asset}/gx_schema/{ingestion.first}..{ingestion.last}/{run_id}",
                  text=f":x: recloop: the history {ingestion.first}..{ingestion.last} failed its schema check: "
                       f"{check.description}",
                  fields={"asset": asset, "partition": f"{ingestion.first}..{ingestion.last}",
                          "details": {"check": "gx_schema", "failures": check.failures[:LISTED_DAYS]}})
    return RangeSchemaCheck(check.first, check.last, reports, alert)


@dataclass(frozen=True)
class RangeValidation:
    """A range split into silver and quarantine, table by table, with the two blocking checks over the
    range: every day conserves its rows, and each table's quarantine share over the range is at most the
    maximum (days above it are listed, not failed: a day of three events with one bad is 33 %)."""

    first: str
    last: str
    results: Mapping[str, Any]  # table -> recloop.validation.RangeValidationResult
    max_quarantine_rate: float
    alert: Alert | None

    @property
    def conserved(self) -> bool:
        return all(r.conserved for r in self.results.values())

    @property
    def rate_ok(self) -> bool:
        return all(r.quarantine_rate <= self.max_quarantine_rate for r in self.results.values())

    @property
    def passed(self) -> bool:
        return self.conserved and self.rate_ok

    @property
    def rate_description(self) -> str:
        return "; ".join(f"{t}: {r.quarantined} of {r.ingested} rows quarantined ({r.quarantine_rate:.2%})"
                         for t, r in self.results.items()) + f" (maximum {self.max_quarantine_rate:.0%} per table)"

    @property
    def problem(self) -> str | None:
        if self.passed:
            return None
        if not self.conserved:
            lost = [f"{t} of {d}" for t, r in self.results.items() for d, v in r.days.items() if not v.conserved]
            return f"rows lost on {', '.join(lost[:5])}"
        return self.rate_description

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"first": self.first, "last": self.last, "max_quarantine_rate": self.max_quarantine_rate,
                               "conserved": self.conserved, "passed": self.passed}
        for table, r in self.results.items():
            above = [d for d, v in r.days.items() if v.quarantine_rate > self.max_quarantine_rate]
            out[table] = {
                "days": len(r.days),
                "ingested": r.ingested,
                "accepted": r.accepted,
                "quarantined": r.quarantined,
                "quarantine_rate": round(r.quarantine_rate, 6),
                "quarantine_reasons": dict(r.reasons),
                "days_with_accepted_rows": sum(1 for v in r.days.values() if v.accepted),
                "days_above_max_quarantine_rate": _listed(above),
                "failed_expectations": {e["expectation"] + (f"({e['column']})" if e["column"] else ""): e["unexpected_count"]
                                        for e in r.expectations if not e["success"]},
                "extra_columns_dropped": list(r.extra_columns),
                "silver_partitions": r.silver_partitions,
                "quarantine_partitions": r.quarantine_partitions,
                "partitions_removed": r.removed_partitions,
            }
        return out

    def by_day(self, table: str = "events") -> dict[str, dict[str, int]]:
        """Per day of `table`: ingested, accepted, quarantined."""
        r = self.results[table]
        return {d: {"ingested": v.ingested, "accepted": v.accepted, "quarantined": v.quarantined}
                for d, v in sorted(r.days.items())}


def validate_range(lake: Lake, ingestion: RangeIngestion, *, expectations_dir: Path | str, max_quarantine_rate: float,
                   run_id: str) -> RangeValidation:
    """GX row-level expectations over the range in one pass per table (`recloop.validation.validate_range`),
    users, then videos, then events (checked against the users and videos accepted up to their day). A
    failed check comes with a `validation.failed` alert. Raises `SchemaValidationError` on a schema failure."""
    from recloop.data.schemas import TABLE_ORDER
    from recloop.validation import validate_range as _validate

    results = {t: _validate(lake, t, ingestion.days(t), expectations_dir=Path(expectations_dir),
                            bronze=ingestion.in_memory(t)) for t in TABLE_ORDER}
    outcome = RangeValidation(ingestion.first, ingestion.last, results, max_quarantine_rate, None)
    if outcome.passed:
        return outcome
    asset, span = "history/silver", f"{ingestion.first}..{ingestion.last}"
    alert = Alert("validation.failed", key=f"{asset}/{span}/{run_id}",
                  text=f":x: recloop: the history {span} failed validation: {outcome.problem}",
                  fields={"asset": asset, "partition": span,
                          "numbers": {f"{t}_{k}": getattr(r, k) for t, r in results.items()
                                      for k in ("ingested", "accepted", "quarantined")},
                          "details": {t: dict(r.reasons) for t, r in results.items()}})
    return RangeValidation(outcome.first, outcome.last, results, max_quarantine_rate, alert)


def join_served_range(lake: Lake, first: str, last: str) -> dict[str, Any]:
    """The served join again on every day of `[first, last]` that has validated impressions, after a range
    validation rewrote those days' `silver/events` without their served negatives (the range run does not
    ingest impressions: serving writes them day by day, and the daily data plane validates them)."""
    from recloop import served

    days = [d for d in lake.partitions(served.IMPRESSIONS_DATASET) if first <= d <= last]
    negatives = 0
    for day in days:
        negatives += served.append_served_negatives(lake, day).served_negatives
        served.write_outcomes(lake, day)
    return {"days": len(days), "served_negatives": negatives}


def compute_features_range(lake: Lake, first: str, last: str) -> dict[str, Any]:
    """Every feature view's snapshots over `[first, last]` in bulk (`recloop.features.compute_features_range`):
    every day with validated events and the day before each, as the daily asset would compute them."""
    from recloop import features as feature_ops

    out = feature_ops.compute_features_range(lake, first, last)
    days = out["days"]
    return {"first": first, "last": last, "snapshot_days": len(days), "newest": out["newest"],
            "first_snapshot": days[0] if days else None, "rows": out["rows"], "bytes": out["bytes"],
            "removed": out["deleted"]}
