"""The lifecycle steps as an orchestrator runs them, shared by the Dagster assets (`pipelines/defs/`) and
the Airflow tasks (`dags/`).

A step here is what one asset or task does beyond calling a core function: the decision of a check, the
alert it sends (event type, key, text and payload), drift episodes and the retraining decision, the
promotion gate with its record in the registry, and the plain summary of what was built. Each function
returns plain values: Dagster turns them into asset metadata and check results, Airflow passes them on as
XCom. Neither orchestrator holds logic of its own, so a Dagster run and an Airflow run over the same data
make the same decisions.

Alerts are returned, not sent (`Alert`): Dagster sends them through its `AlertsResource`, Airflow through
`send_alert`; both end in `recloop.alerts` with the same event ids, so a step that runs again does not
deliver the same event twice.

Imports stay light (numpy, torch, GX, Feast, MLflow load inside the functions): Airflow parses dags/,
which import this module, every few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import Settings

if TYPE_CHECKING:
    from recloop.drift import DriftResult
    from recloop.lake import Lake
    from recloop.registry import GateConfig, GateDecision, Registry
    from recloop.validation import SchemaReport, ValidationResult

__all__ = [
    "AUTOMATION_ENV",
    "COOLDOWN_ENV",
    "CRON_ENV",
    "TIMEZONE_ENV",
    "Alert",
    "DriftOutcome",
    "GateOutcome",
    "ExperimentOutcome",
    "GateRefused",
    "ONLINE_EXPERIMENTS_ENV",
    "Promotion",
    "RetrainingPlan",
    "RetrainingRequest",
    "SchemaCheck",
    "Validation",
    "apply_feature_repo",
    "automation_enabled",
    "build_training_set",
    "candidate_version",
    "check_gate",
    "check_latency",
    "LatencyOutcome",
    "latency_refusal",
    "check_schema",
    "check_schema_range",
    "champion_candidates",
    "compute_features",
    "compute_features_range",
    "corrupt_model_alert",
    "corrupt_model_alerts",
    "drift_links",
    "drift_record_key",
    "drift_report",
    "episode_start",
    "evaluate_candidate",
    "evaluation_figures",
    "gate_config",
    "history_range",
    "impression_outcomes",
    "ingest",
    "join_served",
    "join_served_range",
    "ingest_range",
    "jsonable",
    "materialize_online",
    "online_experiment_step",
    "online_experiments_enabled",
    "online_summary",
    "plan_retraining",
    "promote_candidate",
    "read_drift_record",
    "register_candidate",
    "retrain_cooldown",
    "retrain_schedule",
    "retraining_failed_alert",
    "retraining_key",
    "send_alert",
    "served_traffic_step",
    "TrafficOutcome",
    "validate",
    "validate_range",
]

log = logging.getLogger(__name__)

# Retraining settings come from the environment: a deployment changes them without a code change, and an
# orchestrator reads them when it loads its definitions (a Dagster sensor, an Airflow DAG file).
COOLDOWN_ENV = "RECLOOP_RETRAIN_COOLDOWN_HOURS"
CRON_ENV = "RECLOOP_RETRAIN_CRON"
TIMEZONE_ENV = "RECLOOP_RETRAIN_TIMEZONE"

# With online experiments on, a gate-passing candidate gets live traffic against the champion (alias
# `experiment`) instead of being promoted (`promote_candidate`); off by default.
ONLINE_EXPERIMENTS_ENV = "RECLOOP_ONLINE_EXPERIMENTS"

# The gate's alerts name the asset the decision is about, whichever orchestrator ran it.
REGISTERED_ASSET = "model/registered_version"
DRIFT_ASSET = "monitoring/drift"
DRIFT_RECORD = "decision.json"


# --------------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One alert a step wants sent: the arguments of `recloop.alerts.make_event`."""

    type: str
    key: str
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)


def send_alert(alert: Alert | None, *, logger: Any = None, config_path: str | None = None) -> list[Any]:
    """Sends `alert` to the configured endpoints (`recloop.alerts.AlertDispatcher.from_settings`) and logs
    each endpoint's outcome; returns the `DeliveryResult`s. A receiver that is down never raises: its
    delivery ends in the dead-letter store. A broken configuration does raise."""
    if alert is None:
        return []
    from recloop.alerts import AlertDispatcher, make_event

    event = make_event(alert.type, key=alert.key, text=alert.text, **alert.fields)
    dispatcher = AlertDispatcher.from_settings(config_path=config_path)
    try:
        results = dispatcher.send(event)
    finally:
        dispatcher.store.close()
    for result in results:
        detail = f"HTTP {result.status_code}" if result.status_code else (result.error or "")
        (logger or log).info(f"alert {event.type} {event.id} → {result.endpoint}: {result.outcome} after "
                             f"{result.attempts} attempt(s) {detail}".rstrip())
    return results


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (numpy scalars, paths and dates become numbers and strings; NaN and
    infinities, which strict JSON such as Airflow's XCom refuses, become null)."""
    return _finite(json.loads(json.dumps(value, default=_json_default)))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


# --------------------------------------------------------------------------------------------------
# Ingestion and validation
# --------------------------------------------------------------------------------------------------


def ingest(table: str, partition: str, *, landing: Lake, lake: Lake) -> dict[str, Any]:
    """The day's landing files of `table` into bronze (`recloop.ingestion.ingest_partition`); returns
    what was written: rows, bytes, path, files, malformed lines, encoding errors, rejected files."""
    from recloop.ingestion import ingest_partition

    result = ingest_partition(table, partition, landing=landing, lake=lake)
    m = result.manifest
    return {
        "table": table,
        "partition": partition,
        "rows": m.rows,
        "bytes": result.written.bytes,
        "path": result.written.uri,
        "files": len(m.files),
        "malformed_lines": sum(f.malformed_rows for f in m.files),
        "encoding_errors": sum(f.encoding_errors for f in m.files),
        "rejected_files": [dict(r.__dict__) for r in m.rejected_files],
        "ingested_at": m.ingested_at,
    }


@dataclass(frozen=True)
class SchemaCheck:
    """The schema-level GX check of a bronze partition and the alert it raises when it fails."""

    table: str
    partition: str
    report: SchemaReport
    alert: Alert | None

    @property
    def passed(self) -> bool:
        return bool(self.report.passed)

    @property
    def description(self) -> str:
        if self.report.failures:
            return "; ".join(self.report.failures)
        return "; ".join(w for w in self.report.warnings if w.startswith("no events on")) or "schema conforms"

    def summary(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "rows": self.report.rows,
            "failures": list(self.report.failures),
            "warnings": list(self.report.warnings),
            "missing_columns": list(self.report.missing_columns),
            "extra_columns_dropped": list(self.report.extra_columns),
        }


def check_schema(lake: Lake, table: str, partition: str, *, expectations_dir: Path | str, run_id: str) -> SchemaCheck:
    """Great Expectations' schema-level expectations of `expectations/<table>.json` on the ingested
    partition; a failure comes with a `validation.failed` alert (keyed by the run)."""
    from recloop import validation

    report, _, manifest = validation.check_schema(lake, table, partition, expectations_dir=Path(expectations_dir))
    if not report.passed and _gap_of_imported_history(table, partition, report, manifest):
        return SchemaCheck(table, partition, report, None)
    alert = None
    if not report.passed:
        asset = f"bronze/{table}"
        alert = Alert("validation.failed", key=f"{asset}/gx_schema/{partition}/{run_id}",
                      text=f":x: recloop: {table} of {partition} failed its schema check: {'; '.join(report.failures)}",
                      fields={"asset": asset, "partition": partition, "numbers": {"rows": report.rows},
                              "details": {"check": "gx_schema", "failures": report.failures,
                                          "missing_columns": report.missing_columns}})
    return SchemaCheck(table, partition, report, alert)


def _gap_of_imported_history(table: str, partition: str, report: SchemaReport, manifest: Any) -> bool:
    """A day without events inside an imported history (a day nobody rated anything) is a day without
    data, not a failed delivery: its only failure, the empty events partition, is waived (the report is
    amended to say so). A day outside every imported history still fails."""
    if table != "events" or report.rows or report.missing_columns or manifest.rejected_files:
        return False
    history = _imported_history(partition)
    if history is None:
        return False
    report.failures.clear()
    report.warnings.append(f"no events on {partition}: a day without data inside the history imported for "
                           f"{history[0]}..{history[1]}")
    report.passed = True
    return True


def _imported_history(partition: str) -> tuple[str, str] | None:
    """The imported history (first, last) `partition` falls in, from the landing zone's record."""
    from recloop import partition_range

    try:
        return partition_range.resolve().in_imported_history(partition)
    except Exception:  # noqa: BLE001 - no landing record readable: the usual rules apply
        return None


@dataclass(frozen=True)
class Validation:
    """A bronze partition split into accepted (silver) and quarantined rows, with the two blocking checks
    (row conservation, quarantine rate) and the alert raised when either fails."""

    table: str
    partition: str
    result: ValidationResult
    max_quarantine_rate: float
    alert: Alert | None

    @property
    def rate_ok(self) -> bool:
        return self.result.quarantine_rate <= self.max_quarantine_rate

    @property
    def passed(self) -> bool:
        return self.rate_ok and self.result.conserved

    @property
    def failed_expectations(self) -> dict[str, int]:
        return _failed_expectations(self.result)

    @property
    def rate_description(self) -> str:
        r = self.result
        return (f"{r.quarantined} of {r.ingested} rows quarantined "
                f"({r.quarantine_rate:.2%}; maximum {self.max_quarantine_rate:.0%})")

    @property
    def problem(self) -> str | None:
        """Why the partition failed validation, or None."""
        if self.passed:
            return None
        r = self.result
        if not r.conserved:
            return f"rows lost: {r.accepted} accepted + {r.quarantined} quarantined != {r.ingested}"
        return self.rate_description

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "ingested": r.ingested,
            "accepted": r.accepted,
            "quarantined": r.quarantined,
            "quarantine_rate": round(r.quarantine_rate, 6),
            "max_quarantine_rate": self.max_quarantine_rate,
            "conserved": bool(r.conserved),
            "passed": self.passed,
            "quarantine_reasons": dict(r.reasons),
            "failed_expectations": self.failed_expectations,
            "extra_columns_dropped": list(r.schema.extra_columns),
            "path": r.accepted_written.uri,
            "quarantine_path": r.quarantine_written.uri,
        }


def _failed_expectations(result: ValidationResult) -> dict[str, int]:
    return {e["expectation"] + (f"({e['column']})" if e["column"] else ""): e["unexpected_count"]
            for e in result.expectations if not e["success"]}


def validate(lake: Lake, table: str, partition: str, *, expectations_dir: Path | str, max_quarantine_rate: float,
             run_id: str) -> Validation:
    """GX row-level expectations on the bronze partition: good rows typed into `silver/<table>`, bad rows
    into `quarantine/<table>` with their reasons (`recloop.validation.validate_partition`). Raises
    `SchemaValidationError` on a schema failure. A failed check comes with a `validation.failed` alert."""
    from recloop import validation

    waive = table == "events" and _imported_history(partition) is not None
    result = validation.validate_partition(lake, table, partition, expectations_dir=Path(expectations_dir),
                                           waive_empty=waive)
    if table == "events" and result.ingested == 0:
        # A day without events (a gap of an imported history; an empty delivery stops at the schema
        # check): no silver partition, so `silver/events` lists the days with events.
        for dataset in ("silver/events", "quarantine/events"):
            lake.delete_partition(dataset, partition)
    outcome = Validation(table, partition, result, max_quarantine_rate, None)
    if outcome.passed:
        return outcome
    asset = f"silver/{table}"
    alert = Alert("validation.failed", key=f"{asset}/{partition}/{run_id}",
                  text=f":x: recloop: {table} of {partition} failed validation: {outcome.problem}",
                  fields={"asset": asset, "partition": partition,
                          "numbers": {"ingested": result.ingested, "accepted": result.accepted,
                                      "quarantined": result.quarantined, "quarantine_rate": result.quarantine_rate},
                          "report_url": result.quarantine_written.uri,
                          "details": {"quarantine_reasons": result.reasons,
                                      "failed_expectations": outcome.failed_expectations}})
    return Validation(table, partition, result, max_quarantine_rate, alert)


def join_served(lake: Lake, partition: str) -> dict[str, Any]:
    """The day's served negatives (accepted impressions without feedback) appended to `silver/events`
    (`recloop.served.append_served_negatives`); runs right after the events are validated, which rewrites
    the partition without them. Returns what was joined: impressions, feedback events, served negatives."""
    from recloop import served

    return served.append_served_negatives(lake, partition).summary()


def impression_outcomes(lake: Lake, partition: str) -> dict[str, Any]:
    """`silver/impression_outcomes` of the day: every accepted impression with the outcome its feedback
    reported (`recloop.served.write_outcomes`), what online metrics read."""
    from recloop import served

    return served.write_outcomes(lake, partition).summary()


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def compute_features(lake: Lake, partition: str) -> dict[str, dict[str, Any]]:
    """Every feature view's point-in-time snapshot of the day, in one DuckDB pass; per view: rows, bytes,
    path and snapshot time."""
    from recloop import features as feature_ops

    written = feature_ops.compute_features(lake, partition)
    snapshot = feature_ops.snapshot_time(partition).isoformat()
    return {view: {"rows": part.rows, "bytes": part.bytes, "path": part.uri, "snapshot_time": snapshot}
            for view, part in written.items()}


def apply_feature_repo(settings: Settings) -> dict[str, Any]:
    """`feast apply` of the feature repo (the stores the deployment's settings pick: file registry and
    SQLite embedded, SQL registry and Redis in production); returns what is registered."""
    from recloop import features as feature_ops

    with contextlib.redirect_stdout(io.StringIO()):
        return feature_ops.apply_repo(settings, project=settings.feast_project)


def materialize_online(settings: Settings, days: Sequence[str], *, lake: Lake) -> dict[str, Any]:
    """The newest of `days`' snapshots into the online store (an older day than what it holds is skipped;
    the days before the newest are superseded). Returns `online_summary`."""
    from recloop import features as feature_ops

    days = sorted(days)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = feature_ops.materialize_partition(settings, days[-1], lake=lake, project=settings.feast_project)
    return online_summary({**result, "feast_output": out.getvalue()}, days)


def online_summary(result: Mapping[str, Any], days: Sequence[str]) -> dict[str, Any]:
    """What a materialization (`recloop.features.materialize_partition`) of the newest of `days` did."""
    views = result.get("views", {})
    return {
        "snapshot": result["snapshot"],
        "online_store": result.get("online_store", ""),
        "skipped": bool(result.get("skipped")),
        "reason": result.get("reason"),
        "skipped_views": dict(result.get("skipped_views", {})),
        "superseded_days": list(sorted(days)[:-1]),
        "rows_written": sum(v["rows"] for v in views.values()),
        "views": dict(views),
        "seconds": result.get("seconds", 0.0),
    }


# --------------------------------------------------------------------------------------------------
# A range of days in bulk (history imports, `recloop run --start --end`)
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# The model plane
# --------------------------------------------------------------------------------------------------


def build_training_set(settings: Settings, lake: Lake, workdir: Path, *, train_days: int = 7,
                       test_days: int = 1, train_period: str | None = None,
                       test_period: str | None = None) -> dict[str, Any]:
    """Plans the window (newest validated days held out; as counts of days, or as calendar periods such as
    `train_period="all"`, `test_period="14d"`) and writes its history in `workdir` (`recloop.model_plane`);
    returns its summary and the window."""
    from recloop import model_plane

    plan = model_plane.plan_window(lake, train_days=train_days, test_days=test_days, train_period=train_period,
                                   test_period=test_period)
    out = model_plane.build_training_set(settings, lake, plan, Path(workdir))
    return {**out, "train_partitions": plan.train_partitions, "test_partitions": plan.test_partitions}


def feature_store_columns(settings: Settings, *, project: str | None = None) -> Any:
    """The ranker's feature-store columns: Feast's point-in-time retrieval of `ranking_features`."""
    from recloop.model_plane.store import FeastHistorical

    return FeastHistorical(settings, project=project or settings.feast_project)


def train_ranking(settings: Settings, workdir: Path, *, project: str | None = None) -> dict[str, Any]:
    """The candidate sources on time folds, the LambdaRank ranker on their lists (with Feast's
    point-in-time features), the bundle (`recloop.model_plane.train_ranking`)."""
    from recloop import model_plane

    return model_plane.train_ranking(Path(workdir), store=feature_store_columns(settings, project=project))


def evaluate_candidate(lake: Lake, registry: Registry, workdir: Path, *, settings: Settings | None = None,
                       project: str | None = None) -> dict[str, Any]:
    """Evaluates the candidate in `workdir` on the held-out days beside the baselines and the current
    champion (when there is one), on the same split; returns the headline numbers and the table."""
    from recloop import model_plane

    store = feature_store_columns(settings or Settings.from_env(), project=project)
    ev = model_plane.evaluate_candidate(lake, Path(workdir), store=store, champions=champion_candidates(registry))
    skipped = ev.extras.get("champions_skipped", [])
    table = {name: {m: round(v, 4) for m, v in values.items() if m in (
        "recall_at_10", "ndcg_at_10", "map_at_10", "hit_rate_at_10", "coverage", "diversity", "novelty_at_10",
        "popularity_concentration", "coverage_common", "diversity_common")} for name, values in ev.metrics.items()}
    als, ease = ev.metrics.get("als", {}), ev.metrics.get("ease", {})
    full, pop = ev.metrics[model_plane.PRIMARY], ev.metrics["popularity"]
    return {
        "ndcg_at_10": full["ndcg_at_10"],
        "recall_at_10": full["recall_at_10"],
        "recall_at_10_vs_popularity": (round(full["recall_at_10"] / pop["recall_at_10"], 3)
                                       if pop["recall_at_10"] else float("inf")),
        "recall_at_10_vs_als": (round(full["recall_at_10"] / als["recall_at_10"], 3)
                                if als.get("recall_at_10") else float("inf")),
        "ndcg_at_10_vs_ease": (round(full["ndcg_at_10"] / ease["ndcg_at_10"], 3)
                               if ease.get("ndcg_at_10") else float("inf")),
        "users_evaluated": ev.result["recommenders"][model_plane.PRIMARY]["users_evaluated"],
        # With a champion: how many of them both models know (`coverage_common`, `diversity_common`).
        "users_evaluated_common": ((ev.result.get("segments") or {}).get(model_plane.COMMON) or {}).get(
            "users_evaluated"),
        "by_recommender": table,
        "sanity": ev.sanity,
        "champion_version": ev.champion_version,
        "champion_compared": _champion_compared(ev.champion_version, skipped),
        "champions_skipped": skipped,
        "figures": evaluation_figures(ev.metrics),
    }


# What the promotion gate compares (`recloop.registry.GateConfig`'s metrics), as flat plottable numbers.
GATE_FIGURES = ("ndcg_at_10", "coverage", "diversity", "popularity_concentration")


def evaluation_figures(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The numbers the promotion gate weighs, per recommender evaluated on the same split, flat and finite:
    `challenger_<m>`, `champion_<m>` (when a champion was compared), `popularity_<m>` for the primary
    metric, coverage, diversity and popularity concentration, and `ndcg_at_10_vs_champion` (the ratio)."""
    from recloop import model_plane

    roles = (("challenger", metrics.get(model_plane.PRIMARY) or {}), ("champion", metrics.get("champion") or {}),
             ("popularity", metrics.get("popularity") or {}))
    out = {f"{role}_{m}": float(values[m]) for role, values in roles for m in GATE_FIGURES
           if isinstance(values.get(m), (int, float)) and math.isfinite(float(values[m]))}
    ours, theirs = out.get("challenger_ndcg_at_10"), out.get("champion_ndcg_at_10")
    if ours is not None and theirs:
        out["ndcg_at_10_vs_champion"] = ours / theirs
    return out


def champion_candidates(registry: Registry) -> list[tuple[str, Callable[[], Path]]]:
    """The champions a candidate may be compared with, newest first, each with its bundle download: the
    current champion, then the earlier champions of the lineage (for when the newer cannot be loaded)."""
    current = registry.champion()
    if current is None:
        return []
    versions = dict.fromkeys([str(current.version), *reversed(registry.lineage())])
    return [(v, lambda v=v: registry.bundle_path(v)) for v in versions]


def _champion_compared(version: str | None, skipped: Sequence[Mapping[str, Any]]) -> str:
    why = "; ".join(f"v{s['version']}: {s['reason']}" for s in skipped)
    if version and skipped:
        return f"{version} (the newest champion that loads; skipped {why})"
    if skipped:
        return f"none: no champion loads ({why}); compared with the popularity baseline"
    return version or "none (first model: compared with popularity)"


CORRUPT_ASSET = "model/champion"


def corrupt_model_alert(version: str | int, problems: Mapping[str, str], *, seen_by: str = "training") -> Alert:
    """The `model.corrupt` alert of a registered version whose bundle fails its checksums (`problems`:
    damaged file -> what is wrong with it, as `CorruptModelError.problems`). Keyed by the version and the
    first damaged file: training and serving finding the same damage send one alert."""
    listed = "; ".join(f"{f} {p}" for f, p in problems.items()) or "its bundle does not load"
    first = next(iter(problems), "bundle")
    return Alert("model.corrupt", key=f"version-{version}/{first}",
                 text=(f":rotating_light: recloop: model version {version} is corrupt and cannot be loaded: {listed}. "
                       f"Serving answers with the popularity fallback until the champion loads; move it with "
                       f"`recloop rollback` (or --to VERSION), or retrain"),
                 fields={"asset": CORRUPT_ASSET, "model_version": str(version),
                         "details": {"files": dict(problems), "seen_by": seen_by}})


def corrupt_model_alerts(evaluation: Mapping[str, Any]) -> list[Alert]:
    """The `model.corrupt` alerts of the champions an evaluation (`evaluate_candidate`) skipped as corrupt."""
    return [corrupt_model_alert(s["version"], s.get("problems") or {}, seen_by="training")
            for s in evaluation.get("champions_skipped", []) if s.get("corrupt")]


VERSION_FILE = "version.txt"
# The offline metrics a registered version shows first (its run's `eval.full.*`).
KEY_METRICS = ("ndcg_at_10", "recall_at_10", "map_at_10", "hit_rate_at_10", "coverage", "diversity",
               "novelty_at_10", "popularity_concentration")


def register_candidate(registry: Registry, workdir: Path) -> dict[str, Any]:
    """Logs the candidate as one MLflow run, registers it as a version with alias `challenger` and notes
    the version in `workdir` for the gate and the promotion. The summary links the run and the version in
    the MLflow UI (`mlflow_run_url`, `mlflow_version_url`; base URL `RECLOOP_MLFLOW_UI_URL`)."""
    from recloop import model_plane

    version = model_plane.register_candidate(registry, Path(workdir))
    (Path(workdir) / VERSION_FILE).write_text(version)
    metrics = registry.version_metrics(version)
    return {"version": version, "model_name": registry.model_name,
            "model_uri": f"models:/{registry.model_name}/{version}",
            "metrics": {k: float(metrics[k]) for k in KEY_METRICS if k in metrics},
            **registry.version_links(version)}


def candidate_version(workdir: Path) -> str:
    """The version `register_candidate` registered for the candidate in `workdir`."""
    path = Path(workdir) / VERSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no registered version in {workdir}: register the candidate first")
    return path.read_text().strip()


NONINFERIORITY_ENV = "RECLOOP_GATE_NONINFERIORITY_MARGIN"
DEFAULT_NONINFERIORITY_MARGIN = 0.05


def noninferiority_margin() -> float | None:
    """The offline gate's non-inferiority margin against the champion when online experiments are on
    ($RECLOOP_GATE_NONINFERIORITY_MARGIN, default 0.05; `GateConfig.noninferiority_margin`), None when
    they are off (the gate then asks for superiority). Raises ValueError on a value outside [0, 1)."""
    if not online_experiments_enabled():
        return None
    raw = (os.environ.get(NONINFERIORITY_ENV) or "").strip()
    try:
        margin = float(raw) if raw else DEFAULT_NONINFERIORITY_MARGIN
    except ValueError:
        raise ValueError(f"{NONINFERIORITY_ENV} must be a number in [0, 1), got {raw!r}") from None
    if not 0 <= margin < 1:
        raise ValueError(f"{NONINFERIORITY_ENV} must be a number in [0, 1), got {raw!r}")
    return margin


def gate_config(*, min_improvement: float | None = None, max_identical_list_share: float | None = None) -> GateConfig:
    """The promotion gate's rules, the two an operator tunes per run overridden when given; with online
    experiments on, the primary metric against a champion is a non-inferiority check
    (`noninferiority_margin`)."""
    from recloop.registry import GateConfig

    default = GateConfig()
    return GateConfig(
        min_improvement=default.min_improvement if min_improvement is None else float(min_improvement),
        max_identical_list_share=(default.max_identical_list_share if max_identical_list_share is None
                                  else float(max_identical_list_share)),
        noninferiority_margin=noninferiority_margin(),
    )


def _decision_alert(type: str, version: str, decision: GateDecision, text: str, run_id: str) -> Alert:
    return Alert(type, key=f"version-{version}", text=text,
                 fields={"asset": REGISTERED_ASSET, "model_version": version,
                         "numbers": {k: v for k, v in decision.metrics.items() if isinstance(v, (int, float))},
                         "details": {"compared_to": decision.compared_to, "reasons": decision.reasons,
                                     "run_id": run_id}})


@dataclass(frozen=True)
class GateOutcome:
    """The promotion gate's decision for the registered candidate; a refusal is already recorded in the
    registry and comes with its `model.refused` alert."""

    version: str
    decision: GateDecision
    alert: Alert | None

    @property
    def passed(self) -> bool:
        return bool(self.decision.promote)

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {"version": self.version, "promote": bool(d.promote), "compared_to": d.compared_to,
                "reasons": list(d.reasons), "checks": dict(d.checks), "metrics": dict(d.metrics)}

    def figures(self) -> dict[str, float]:
        """The decision's numbers the gate weighs, flat and plottable: `<role>_<metric>` for the challenger,
        the champion (or popularity, the first model's bar) and the metrics of `GATE_FIGURES`, and
        `sanity_*` (identical list share, distinct items)."""
        out = {}
        for key, value in self.decision.metrics.items():
            role, _, metric = key.partition(".")
            if (metric in GATE_FIGURES or role == "sanity") and isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{role}_{metric}"] = float(value)
        return out


def check_gate(registry: Registry, workdir: Path, *, config: GateConfig | None = None, run_id: str) -> GateOutcome:
    """Decides whether the registered candidate may become champion (`recloop.registry.decide` on its
    evaluation): beat popularity (first model) or the champion by the margin, within the guardrails.
    A refusal is recorded (`Registry.refuse`) and alerted; a pass changes nothing yet (see
    `promote_candidate`)."""
    from recloop import model_plane

    version = candidate_version(workdir)
    decision = model_plane.gate_decision(Path(workdir), config=config or gate_config())
    if decision.promote:
        return GateOutcome(version, decision, None)
    registry.refuse(version, decision)
    return GateOutcome(version, decision, _decision_alert(
        "model.refused", version, decision,
        f":no_entry: recloop: version {version} refused by the promotion gate: {decision.reasons[0]}", run_id))


class GateRefused(RuntimeError):
    """Promotion was asked for a version the gate refuses."""


# --------------------------------------------------------------------------------------------------
# The latency gate (recloop.latency): replayed in a separate process, recorded beside the candidate
# --------------------------------------------------------------------------------------------------

LATENCY_FILE = "latency_gate.json"
LATENCY_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LatencyOutcome:
    """The latency gate's result for the registered candidate: `status` is `passed`, `refused` or
    `skipped` (the offline gate refused it already: nothing to measure). A refusal is already recorded in
    the registry and comes with its `model.refused` alert."""

    version: str
    status: str
    reasons: list[str]
    figures: dict[str, Any]
    decision: Any = None  # recloop.latency.LatencyDecision (None when skipped)
    alert: Alert | None = None

    @property
    def passed(self) -> bool:
        return self.status != "refused"

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {"version": self.version, "status": self.status, "reasons": list(self.reasons),
                "compared_to": d.compared_to if d is not None else None,
                "checks": dict(d.checks) if d is not None else {},
                "metrics": dict(d.metrics) if d is not None else {}, "figures": dict(self.figures)}


def _replay_env(settings: Settings) -> dict[str, str]:
    """This process's environment with `settings` spelled out: the replay reads the same stores."""
    from recloop.config import ENV_VARS

    env = dict(os.environ)
    for name, var in ENV_VARS.items():
        value = getattr(settings, name, None)
        if value is not None and value != "":
            env[var] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


def replay_latency(settings: Settings, challenger: str, champion: str | None, *, sample: int, warmup: int,
                   registry: Registry | None = None, timeout: float = LATENCY_TIMEOUT_S) -> dict[str, Any]:
    """Runs `python -m recloop.latency.replay` in a separate process (a fresh heap, no training state
    around, as a serving process) and returns what it printed; versions are downloaded from `registry`
    (default: the settings' registry). Raises RuntimeError with the replay's error line."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "recloop.latency.replay", "--challenger", str(challenger),
           "--sample", str(int(sample)), "--warmup", str(int(warmup))]
    if champion:
        cmd += ["--champion", str(champion)]
    env = _replay_env(settings)
    if registry is not None:
        env.update(RECLOOP_MLFLOW_TRACKING_URI=registry.tracking_uri, RECLOOP_MODEL_NAME=registry.model_name)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"the latency replay of version {challenger} failed: {error}")
    return json.loads(lines[-1])


def _latency_gate_decision(version: str, decision: Any) -> GateDecision:
    """The latency refusal as the registry records decisions (tags on the version, a run in the log)."""
    from recloop.registry import GateDecision

    return GateDecision(promote=False, reasons=["latency gate: " + r for r in decision.reasons],
                        checks={f"latency.{k}": v for k, v in decision.checks.items()},
                        compared_to=decision.compared_to, primary_metric="p99_ms",
                        metrics={f"latency.{k}" if "." not in k else k: v for k, v in decision.metrics.items()})


def check_latency(registry: Registry, workdir: Path, *, settings: Settings | None = None, config: Any = None,
                  gate: GateConfig | None = None, run_id: str) -> LatencyOutcome:
    """The latency gate of the registered candidate (`recloop.latency`): a sample of real requests
    replayed against its bundle and the champion's in a separate process, then the rule of
    `recloop.latency.gate.decide_latency`. The outcome is written beside the candidate (`latency_refusal`
    reads it: `promote_candidate` refuses what this refused); a refusal is recorded in the registry with
    the figures (`Registry.refuse`) and alerted. A candidate the offline gate refuses (its evaluation in
    `workdir` says so) is not measured."""
    from recloop import model_plane
    from recloop.latency.gate import LatencyConfig, decide_latency

    version = candidate_version(workdir)
    config = config or LatencyConfig.from_env()
    path = Path(workdir) / LATENCY_FILE
    path.unlink(missing_ok=True)
    evaluated = (Path(workdir) / model_plane.steps.EVALUATION).is_file()
    offline = model_plane.gate_decision(Path(workdir), config=gate or gate_config()) if evaluated else None
    if offline is not None and not offline.promote:
        return LatencyOutcome(version, "skipped", [f"not measured: the promotion gate refused version {version}"], {})
    current = registry.champion()
    champion = str(current.version) if current is not None and str(current.version) != version else None
    figures = replay_latency(settings or Settings.from_env(), version, champion, sample=config.sample,
                             warmup=config.warmup, registry=registry)
    decision = decide_latency(figures["challenger"], figures.get("champion"), config,
                              champion_version=(figures.get("champion") or {}).get("version"))
    status = "passed" if decision.passed else "refused"
    reasons = list(decision.reasons) + ([f"champion not replayed: {figures['champion_error']}"]
                                        if figures.get("champion_error") else [])
    path.write_text(json.dumps(jsonable({"version": version, "status": status, "reasons": reasons,
                                         "decision": decision.to_dict(), "figures": figures}), indent=1))
    if decision.passed:
        return LatencyOutcome(version, status, reasons, figures, decision)
    recorded = _latency_gate_decision(version, decision)
    registry.refuse(version, recorded)
    return LatencyOutcome(version, status, reasons, figures, decision, _decision_alert(
        "model.refused", version, recorded,
        f":no_entry: recloop: version {version} refused by the latency gate: {decision.reasons[0]}", run_id))


def latency_refusal(workdir: Path) -> str | None:
    """Why the latency gate refused the candidate in `workdir`, or None (passed, skipped or not run)."""
    path = Path(workdir) / LATENCY_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "refused" or str(record.get("version")) != candidate_version(workdir):
        return None
    return f"version {record['version']} did not pass the latency gate: {record['reasons'][0]}"


@dataclass(frozen=True)
class Promotion:
    """The candidate is champion; the decision recorded, the `model.promoted` alert to send. With online
    experiments on (`online_experiments_enabled`) and a champion present, the candidate is put under the
    `experiment` alias instead: `experiment` holds the experiment id, `version` stays the candidate's,
    the champion does not change and there is no alert (the experiment's conclusion alerts)."""

    version: str
    decision: GateDecision
    lineage: list[str]
    alert: Alert | None
    experiment: str | None = None
    note: str = ""

    def summary(self) -> dict[str, Any]:
        out = {"champion": self.lineage[-1] if self.experiment and self.lineage else self.version,
               "compared_to": self.decision.compared_to, "lineage": list(self.lineage),
               "reasons": list(self.decision.reasons)}
        if self.experiment or self.note:
            out.update({"experiment": self.experiment or "", "candidate": self.version, "note": self.note})
        return out


def promote_candidate(registry: Registry, workdir: Path, *, config: GateConfig | None = None, run_id: str) -> Promotion:
    """Moves `champion` to the registered candidate after the gate passed it, records the decision (when,
    why, the metrics). Raises `GateRefused` when the gate does not pass it. A retried promotion that
    finds the candidate champion already does not promote it twice."""
    if (latency := latency_refusal(workdir)) is not None:  # the latency gate refused it (check_latency)
        raise GateRefused(latency)
    from recloop import model_plane

    version = candidate_version(workdir)
    decision = model_plane.gate_decision(Path(workdir), config=config or gate_config())
    if not decision.promote:
        raise GateRefused(f"version {version} did not pass the promotion gate: {decision.reasons[0]}")
    current = registry.champion()
    if current is not None and str(current.version) != version and online_experiments_enabled():
        # A champion to experiment against: live traffic decides (recloop.online), not this step.
        return _start_experiment(registry, version, decision)
    if current is None or str(current.version) != version:
        skipped = model_plane.load_evaluation(Path(workdir)).extras.get("champions_skipped", [])
        registry.promote(version, decision, unloadable=[s["version"] for s in skipped])
    return Promotion(version, decision, registry.lineage(), _decision_alert(
        "model.promoted", version, decision,
        f":white_check_mark: recloop: version {version} is the new champion: {decision.reasons[0]}", run_id))


def _start_experiment(registry: Registry, version: str, decision: GateDecision) -> Promotion:
    """The gate-passing candidate under the `experiment` alias (`Registry.start_experiment`); while
    another version's experiment runs the candidate waits, said in `note` (a retried step that finds its
    own experiment running changes nothing)."""
    from recloop.registry import RegistryError

    try:
        experiment = registry.start_experiment(version, decision)
    except RegistryError as err:
        log.info("%s", err)
        return Promotion(version, decision, registry.lineage(), None, None, str(err))
    return Promotion(version, decision, registry.lineage(), None, experiment,
                     f"version {version} passed the gate and is under online experiment {experiment} against "
                     f"champion v{registry.lineage()[-1] if registry.lineage() else '?'}")


# --------------------------------------------------------------------------------------------------
# Drift and retraining
# --------------------------------------------------------------------------------------------------


def drift_record_key(partition: str) -> str:
    """The lake key of `partition`'s drift decision (next to its HTML report)."""
    from recloop.drift import REPORT_DATASET
    from recloop.lake import partition_key

    return f"{partition_key(REPORT_DATASET, partition)}/{DRIFT_RECORD}"


def read_drift_record(lake: Lake, partition: str) -> dict[str, Any] | None:
    """The latest drift decision of `partition` (`DriftOutcome.record()`), or None."""
    key = drift_record_key(partition)
    if not lake.exists(key):
        return None
    return json.loads(lake.read_bytes(key))


def episode_start(lake: Lake, partition: str, champion_version: str) -> str:
    """The first day of the drift episode `partition` belongs to: the previous day's episode when that
    day drifted against the same champion, else `partition` itself. Drift comes in episodes: the first
    day alerts and asks for retraining, the days after it are reported only."""
    previous = (datetime.fromisoformat(partition) - timedelta(days=1)).date().isoformat()
    before = read_drift_record(lake, previous)
    if before and before.get("drifted") and str(before.get("champion_version")) == str(champion_version):
        return str(before.get("drift_episode") or previous)
    return partition


@dataclass(frozen=True)
class DriftOutcome:
    """One day's drift decision against the champion's training window, and its alert (the first day of
    a drift episode only)."""

    partition: str
    drifted: bool
    champion_version: str | None
    drift_episode: str | None
    reasons: list[str]
    summary: dict[str, float]
    reference_partitions: list[str]
    report_uri: str | None
    mlflow_run_id: str | None
    status: str
    alert: Alert | None = None
    report_summary_uri: str | None = None

    @property
    def new_episode(self) -> bool:
        """The first drifted day of an episode: the one that alerts and asks for retraining."""
        return self.drifted and self.drift_episode == self.partition

    @property
    def explanation(self) -> str:
        return "; ".join(self.reasons) or self.status

    @property
    def compared(self) -> bool:
        """Whether the day was compared with the champion's training window at all: a champion, validated
        events on the day, enough rows on both sides for a decision, at least one column or signal tested.
        A day that was not says nothing about drift (no `no_drift` verdict)."""
        s = self.summary
        tested = s.get("columns.tested", 0.0) + sum(1 for k in s if k.startswith("signal.") and k.count(".") == 1)
        return self.champion_version is not None and s.get("decided", 0.0) >= 1.0 and tested > 0

    @property
    def nothing_compared(self) -> str:
        """Why nothing was compared ("" when something was)."""
        if self.compared:
            return ""
        return f"nothing compared: {self.explanation}"

    def record(self) -> dict[str, Any]:
        """The decision as plain values: what `read_drift_record` returns, what Airflow passes on."""
        return {
            "partition": self.partition,
            "drifted": self.drifted,
            "drift_episode": self.drift_episode or "",
            "new_episode": self.new_episode,
            "champion_version": self.champion_version,
            "reasons": list(self.reasons),
            "reference_partitions": list(self.reference_partitions),
            "report": self.report_uri or "",
            "report_summary": self.report_summary_uri or "",
            "mlflow_run_id": self.mlflow_run_id,
            "status": self.status,
            "summary": dict(self.summary),
        }


def drift_report(lake: Lake, registry: Registry, partition: str, *, config_path: str | None = None) -> DriftOutcome:
    """Day `partition` against the champion's training window (`recloop.drift.detect_drift`, Evidently):
    the HTML report in the lake, the run in MLflow's `recloop-monitoring` experiment, the decision with
    its drift episode in the lake (`read_drift_record`), and the `drift.detected` alert when the day opens
    a new episode. Without a champion there is nothing to compare with: not drifted, said so; with a
    corrupt one neither, with its `model.corrupt` alert (the same event serving and training send)."""
    from recloop import drift
    from recloop.model_plane.bundle import CorruptModelError, load_bundle, verify_bundle

    champion = registry.champion()
    if champion is None:
        outcome = DriftOutcome(partition, False, None, None, [], {}, [], None, None,
                               "no champion yet: no training window to compare with (the retraining "
                               "schedule trains the first)")
        _write_record(lake, outcome)
        return outcome
    if not lake.has_partition("silver/events", partition):
        outcome = DriftOutcome(partition, False, str(champion.version), None, [], {}, [], None, None,
                               f"no validated events on {partition}: nothing to compare (a day without data)")
        _write_record(lake, outcome)
        return outcome
    version = str(champion.version)
    bundle = registry.bundle_path(version)
    try:
        verify_bundle(bundle)
    except CorruptModelError as err:  # the day's data is fine: no report, and the model.corrupt alert
        outcome = DriftOutcome(partition, False, None, None, [], {}, [], None, None,
                               f"champion v{version} is corrupt ({err.summary}): no drift report until it is "
                               "rolled back (recloop rollback) or replaced",
                               corrupt_model_alert(version, err.problems, seen_by="drift"))
        _write_record(lake, outcome)
        return outcome
    reference = drift.champion_reference(bundle)
    result = drift.detect_drift(lake, partition, reference, config=drift.DriftConfig.load(config_path),
                                champion=load_bundle(bundle), champion_version=version)
    episode = episode_start(lake, partition, version) if result.drifted else None
    html = lake.read_bytes(drift.report_key(partition)).decode() if result.report_uri else None
    run_id = registry.log_drift_report(partition=partition, model_version=version, drifted=result.drifted,
                                       summary=result.summary, report_uri=result.report_uri, report_html=html,
                                       reasons=result.reasons)
    outcome = _drift_outcome(partition, version, episode, reference, result, run_id)
    _write_record(lake, outcome)
    return outcome


def _drift_outcome(partition: str, version: str, episode: str | None, reference: list[str], result: DriftResult,
                   run_id: str) -> DriftOutcome:
    status = ("drifted" if result.drifted else "no drift") if result.decided else "no decision"
    if result.drifted and episode != partition:
        status = f"drift continues the episode that started on {episode}: no new alert or retraining"
    alert = None
    if result.drifted and episode == partition:
        alert = Alert("drift.detected", key=f"{partition}/champion-{version}",
                      text=(f":warning: recloop: drift on {partition} against champion v{version}'s training "
                            "window: " + "; ".join(result.reasons[:3])),
                      fields={"asset": DRIFT_ASSET, "partition": partition, "model_version": version,
                              "numbers": result.summary, "report_url": result.report_uri,
                              "details": {"reasons": result.reasons, "reference_partitions": reference,
                                          "mlflow_run_id": run_id}})
    return DriftOutcome(partition, bool(result.drifted), version, episode, list(result.reasons), dict(result.summary),
                        list(reference), result.report_uri, run_id, status, alert, result.summary_uri)


REPORT_ARTIFACT = "drift_report.html"


def drift_links(registry: Registry, outcome: DriftOutcome) -> dict[str, str]:
    """Where a browser opens the day's drift report: `report_url`, the report in the MLflow UI (the drift
    run's `drift_report.html` artifact; the lake copy as a file:// or s3:// URL when the run is unknown),
    and `mlflow_run_url`, the drift run."""
    from recloop import links

    out = {}
    run_id = outcome.mlflow_run_id
    experiment_id = registry.run_experiment(run_id)  # None: no run, or one the tracking store does not know
    if experiment_id:
        out["mlflow_run_url"] = links.mlflow_run_url(experiment_id, run_id)
    if outcome.report_uri:  # the run carries the HTML only when a report was written
        out["report_url"] = (links.mlflow_run_url(experiment_id, run_id, artifact=REPORT_ARTIFACT) if experiment_id
                             else links.location_url(outcome.report_uri))
    return out


def _write_record(lake: Lake, outcome: DriftOutcome) -> None:
    record = {**outcome.record(), "decided_at": datetime.now(UTC).isoformat()}
    lake.write_bytes(drift_record_key(outcome.partition), json.dumps(record, indent=1, default=str).encode())


def retrain_cooldown() -> timedelta:
    """Minimum time between two drift-triggered retrainings ($RECLOOP_RETRAIN_COOLDOWN_HOURS, default 24)."""
    return timedelta(hours=float(os.environ.get(COOLDOWN_ENV) or "24"))


def retrain_schedule() -> tuple[str, str]:
    """(cron, timezone) of the retraining cadence ($RECLOOP_RETRAIN_CRON, default daily 03:00, in
    $RECLOOP_RETRAIN_TIMEZONE, default UTC): the floor under drift-triggered retraining."""
    return os.environ.get(CRON_ENV) or "0 3 * * *", os.environ.get(TIMEZONE_ENV) or "UTC"


AUTOMATION_ENV = "RECLOOP_DAGSTER_AUTOMATION"


def automation_enabled() -> bool:
    """Whether the code location's automation starts on by itself ($RECLOOP_DAGSTER_AUTOMATION = on /
    off, default off): the retraining schedule, the drift sensor and the failure alerts. Off, a UI left
    running on the demo's home trains nothing by itself: turn each on in the UI (Automation), or set it on
    (the production stack does). Raises ValueError on another value."""
    raw = (os.environ.get(AUTOMATION_ENV) or "off").strip().lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{AUTOMATION_ENV} must be on or off, got {raw!r}")


def retraining_key(partition: str, champion_version: str | int) -> str:
    """One retraining per drift episode and champion: the first drifted day + the champion's version."""
    return f"drift-{partition}-champion-{champion_version}"


@dataclass(frozen=True)
class RetrainingRequest:
    key: str
    partition: str
    champion_version: str


@dataclass
class RetrainingPlan:
    requests: list[RetrainingRequest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def skip_reason(self) -> str:
        return "; ".join(self.skipped) or "no new drift episode"


def plan_retraining(
    reports: Iterable[Mapping[str, Any]],
    *,
    recent_retraining: Callable[[], str | None],
    already_requested: Collection[str] = (),
    cooldown: timedelta | None = None,
) -> RetrainingPlan:
    """Which drift reports ask for a retraining: the first day of each new drift episode, one retraining
    for all of them (the newest data covers every episode), none when a drift-triggered retraining
    started within the cooldown (`recent_retraining()` names it, or returns None), none twice for the
    same episode and champion (`already_requested` holds their `retraining_key`s).

    `reports` are drift decisions in order (`DriftOutcome.record()` or the same fields from metadata:
    `partition`, `drifted`, `drift_episode`, `champion_version`)."""
    cooldown = retrain_cooldown() if cooldown is None else cooldown
    plan = RetrainingPlan()
    for report in reports:
        partition = report.get("partition")
        if not report.get("drifted") or not partition or report.get("drift_episode") != partition:
            continue
        version = str(report.get("champion_version"))
        key = retraining_key(partition, version)
        if key in already_requested:
            plan.skipped.append(f"{partition}: retraining for this drift episode was requested already ({key})")
            continue
        if plan.requests:
            plan.skipped.append(f"{partition}: covered by the retraining requested for {plan.requests[0].partition}")
            continue
        recent = recent_retraining()
        if recent is not None:
            plan.skipped.append(f"{partition}: a drift-triggered run ({recent}) started within the cooldown of {cooldown}")
            continue
        plan.requests.append(RetrainingRequest(key, partition, version))
    return plan


def retraining_failed_alert(*, job: str, run_id: str, trigger: str, failure: str, steps_failed: Sequence[str],
                            partition: str | None = None, model_version: str | None = None,
                            run_label: str | None = None) -> Alert:
    """The `retraining.failed` alert of a failed training run (a refusal by the gate is not a failure)."""
    return Alert("retraining.failed", key=f"run-{run_id}",
                 text=f":x: recloop: retraining run {run_label or run_id[:8]} ({trigger}) failed: {failure}",
                 fields={"asset": job, "partition": partition, "model_version": model_version,
                         "details": {"run_id": run_id, "trigger": trigger, "steps_failed": list(steps_failed)}})


# --------------------------------------------------------------------------------------------------
# Online experiments and the served-traffic monitor (recloop.online)
# --------------------------------------------------------------------------------------------------

EXPERIMENT_ASSET = "online/experiment"
SERVED_TRAFFIC_ASSET = "online/served_traffic"


def online_experiments_enabled() -> bool:
    """Whether a gate-passing candidate goes to an online experiment ($RECLOOP_ONLINE_EXPERIMENTS = on /
    off, default off). Raises ValueError on another value."""
    raw = (os.environ.get(ONLINE_EXPERIMENTS_ENV) or "off").strip().lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{ONLINE_EXPERIMENTS_ENV} must be on or off, got {raw!r}")


@dataclass(frozen=True)
class ExperimentOutcome:
    """A daily look at the running online experiment (`recloop.online.experiment.conclude`) and the alert
    of a final outcome: `model.promoted` (the challenger became champion) or `model.refused` (stopped)."""

    result: Any  # recloop.online.experiment.ExperimentResult
    alert: Alert | None

    @property
    def outcome(self) -> str:
        return self.result.outcome

    def summary(self) -> dict[str, Any]:
        return jsonable(self.result.summary())


def online_experiment_step(lake: Lake, registry: Registry, *, as_of: str | None = None, mode: str | None = None,
                           config: Any = None, run_id: str) -> ExperimentOutcome:
    """The daily look at the online experiment: per-arm metrics, the sequential decision, the MLflow run in
    `recloop-online-experiments`, and on a final outcome the registry changed (promote: champion := the
    experiment's version; stop: alias removed) with its alert. No experiment running: nothing, said so."""
    from recloop.online.experiment import conclude

    result = conclude(lake, registry, as_of=as_of, config=config, mode=mode)
    d = result.decision
    if d is None or not result.applied:
        return ExperimentOutcome(result, None)
    numbers = {k: v for k, v in d.metrics().items() if isinstance(v, (int, float))}
    fields = {"asset": EXPERIMENT_ASSET, "partition": d.as_of, "model_version": result.version, "numbers": numbers,
              "details": {"experiment_id": result.experiment_id, "outcome": d.outcome, "mode": d.mode,
                          "metric": d.metric, "reasons": d.reasons, "mlflow_run_id": result.mlflow_run_id,
                          "champion_version": result.champion_version, "run_id": run_id}}
    if d.promote:
        alert = Alert("model.promoted", key=f"{result.experiment_id}/promote",
                      text=(f":white_check_mark: recloop: version {result.version} is the new champion after online "
                            f"experiment {result.experiment_id}: {d.reasons[0]}"), fields=fields)
    else:
        alert = Alert("model.refused", key=f"{result.experiment_id}/{d.outcome}",
                      text=(f":no_entry: recloop: online experiment {result.experiment_id} stopped, champion "
                            f"v{result.champion_version} stays: {d.reasons[0]}"), fields=fields)
    return ExperimentOutcome(result, alert)


@dataclass(frozen=True)
class TrafficOutcome:
    """One day's served-traffic report (`recloop.online.traffic.monitor`) and its `drift.detected` alert
    when a threshold is breached."""

    report: Any  # recloop.online.traffic.TrafficReport; None on a day without impression outcomes
    alert: Alert | None
    status: str = ""

    @property
    def breached(self) -> bool:
        return bool(self.report is not None and self.report.breached)

    def summary(self) -> dict[str, Any]:
        if self.report is None:
            return {"breached": False, "judged": False, "status": self.status}
        return jsonable({**self.report.record(), "numbers": self.report.summary()})


def served_traffic_step(lake: Lake, partition: str, *, thresholds: Any = None) -> TrafficOutcome:
    """The served-traffic monitor of day `partition` against its reference window; a breach comes with a
    `drift.detected` alert on asset online/served_traffic (keyed by the day: a re-run sends it once). A day
    without impression outcomes is reported as such, not failed."""
    from recloop.online.traffic import monitor

    try:
        report = monitor(lake, partition, thresholds=thresholds)
    except FileNotFoundError as err:
        return TrafficOutcome(None, None, str(err))
    if not report.breached:
        return TrafficOutcome(report, None, report.status)
    failed = [r for r in report.reasons if r.startswith("FAIL")]
    alert = Alert("drift.detected", key=f"served-traffic/{partition}",
                  text=f":warning: recloop: {report.status}: " + "; ".join(failed[:3]),
                  fields={"asset": SERVED_TRAFFIC_ASSET, "partition": partition, "numbers": report.summary(),
                          "details": {"kind": "served_traffic", "reasons": report.reasons,
                                      "reference_days": report.reference_days,
                                      "category_share": report.stats.category_share}})
    return TrafficOutcome(report, alert, report.status)
