"""The data plane of one day (partition): landing files into bronze, the GX schema check, validation
into silver and quarantine, the served join and impression outcomes, the feature snapshots, and Feast's
`apply` and online materialization."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import Settings
from recloop.lifecycle.alerts import Alert

if TYPE_CHECKING:
    from recloop.lake import Lake
    from recloop.validation import SchemaReport, ValidationResult

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
