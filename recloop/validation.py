"""Validation: run the Great Expectations suites in `expectations/` on a bronze partition.

Two levels, both from one suite file per table:
- schema level (expectations with `meta.level == "schema"`) on the partition as ingested: required
  columns, no unknown columns, rows present. A `critical` failure stops the partition
  (`SchemaValidationError`, with the reasons); a `warning` is reported (unknown columns are dropped from
  the validated table but stay in bronze).
- row level on the typed partition: every row that breaks an expectation goes to the quarantine dataset
  with its reasons; every other row goes to `silver/<table>`. accepted + quarantined = ingested, exactly.

Before the row-level suite runs, DuckDB types the text columns (`_type_errors` names each value that
does not convert) and adds the context row rules need: `_occurrence` (duplicates of a key),
`_user_known`, `_video_known` and `_video_duration_s` (events against the accepted users and videos).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from recloop.data.schemas import TableSchema
from recloop.data.schemas import table as table_schema
from recloop.ingestion import META_COLUMNS, Manifest, read_bronze
from recloop.lake import Lake, WrittenPartition

SILVER = "silver"
QUARANTINE = "quarantine"
log = logging.getLogger(__name__)

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
}


class SchemaValidationError(Exception):
    """A partition that fails a critical schema-level expectation; nothing of it is accepted."""

    def __init__(self, table: str, partition: str, reasons: list[str]) -> None:
        self.table, self.partition, self.reasons = table, partition, reasons
        super().__init__(f"{table} partition {partition} stopped at schema validation: " + "; ".join(reasons))


@dataclass
class SchemaReport:
    table: str
    partition: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)
    rows: int = 0
    expectations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationResult:
    table: str
    partition: str
    ingested: int
    accepted: int
    quarantined: int
    reasons: dict[str, int]
    expectations: list[dict[str, Any]]
    schema: SchemaReport
    accepted_written: WrittenPartition
    quarantine_written: WrittenPartition

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.ingested if self.ingested else 0.0

    @property
    def conserved(self) -> bool:
        return self.accepted + self.quarantined == self.ingested


# --- Great Expectations -----------------------------------------------------------------------------


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


@lru_cache(maxsize=1)
def _context():
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def load_suite_file(expectations_dir: Path, table_name: str) -> dict[str, Any]:
    path = Path(expectations_dir) / f"{table_name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no expectation suite for table {table_name!r} at {path}")
    return json.loads(path.read_text())


def _suite(name: str, expectations: list[dict[str, Any]]):
    """A Great Expectations suite registered in the ephemeral context (replacing an older copy)."""
    gx = _gx()
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    context = _context()
    try:
        context.suites.delete(name)
    except Exception:  # noqa: BLE001 - GX raises various errors for "not there"; nothing to clean up
        pass
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation_configuration(
            ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta", {}), severity=e.get("severity", "critical"))
        )
    return context.suites.add(suite)


def _run_suite(name: str, expectations: list[dict[str, Any]], df, params: dict[str, Any], result_format: dict[str, Any]):
    gx = _gx()
    context = _context()
    suite = _suite(name, expectations)
    try:
        source = context.data_sources.get("recloop")
    except (KeyError, ValueError):
        source = context.data_sources.add_pandas("recloop")
    asset_name = f"{name}_frame"
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(asset_name)
    try:
        batch = asset.get_batch_definition("whole")
    except (KeyError, ValueError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe("whole")
    try:
        context.validation_definitions.delete(name)
    except Exception:  # noqa: BLE001 - absent on first use
        pass
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return vd.run(batch_parameters={"dataframe": df}, expectation_parameters=params, result_format=result_format)


def _describe(result) -> dict[str, Any]:
    cfg = result.expectation_config
    res = result.result or {}
    return {
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_A"),
        "severity": str(getattr(cfg, "severity", "critical")).rsplit(".", 1)[-1].lower(),
        "success": bool(result.success),
        "unexpected_count": res.get("unexpected_count"),
        "observed_value": res.get("observed_value") if not isinstance(res.get("observed_value"), (list, dict)) else None,
        "reason": (cfg.meta or {}).get("reason") or (cfg.meta or {}).get("reason_column"),
    }


# --- schema level ----------------------------------------------------------------------------------


def check_schema(
    lake: Lake, table_name: str, partition: str, *, expectations_dir: Path
) -> tuple[SchemaReport, pa.Table, Manifest]:
    """Run the schema-level expectations on the bronze partition. Never raises for bad data."""
    schema = table_schema(table_name)
    bronze, manifest = read_bronze(lake, table_name, partition)
    suite = load_suite_file(expectations_dir, table_name)
    schema_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") == "schema"]
    report = SchemaReport(table=table_name, partition=partition, passed=True, rows=bronze.num_rows)

    for rejected in manifest.rejected_files:
        report.failures.append(f"file {rejected.name} could not be read: {rejected.reason} (kept at {rejected.kept_at})")
    expected = set(schema.columns) | set(META_COLUMNS)
    for f in manifest.files:
        missing = [c for c in schema.columns if c not in f.columns]
        if missing:
            report.missing_columns.extend(c for c in missing if c not in report.missing_columns)
    report.extra_columns = [c for c in bronze.column_names if c not in expected]

    # Column-set expectations only need the header: validate an empty frame with the bronze columns,
    # plus the real row count for row-count expectations.
    import pandas as pd

    header_df = pd.DataFrame({c: pd.Series([], dtype="object") for c in bronze.column_names})
    count_exps = [e for e in schema_exps if e["type"].startswith("expect_table_row_count")]
    column_exps = [e for e in schema_exps if e not in count_exps]
    results = []
    if column_exps:
        results += list(_run_suite(f"{table_name}_schema", column_exps, header_df, {}, {"result_format": "SUMMARY"}).results)
    if count_exps:
        count_df = bronze.select([bronze.column_names[0]]).to_pandas()
        results += list(_run_suite(f"{table_name}_rowcount", count_exps, count_df, {}, {"result_format": "SUMMARY"}).results)
    for r in results:
        d = _describe(r)
        report.expectations.append(d)
        if r.success:
            continue
        detail = d["reason"] or d["expectation"]
        if r.expectation_config.type == "expect_table_columns_to_match_set":
            cols = report.missing_columns if r.expectation_config.kwargs.get("exact_match") is False else report.extra_columns
            detail = f"{detail}: {', '.join(cols) or '(see GX result)'}"
        if d["severity"] == "critical":
            report.failures.append(detail)
        else:
            report.warnings.append(detail)
    if report.missing_columns and not any("lacks column" in f for f in report.failures):
        # Several files in one partition: GX saw the union of columns; one file may still lack some.
        report.failures.append(f"a file lacks column(s) the {table_name} table requires: {', '.join(report.missing_columns)}")
    report.passed = not report.failures
    return report, bronze, manifest


# --- row level -------------------------------------------------------------------------------------


def _cast_sql(schema: TableSchema, present: set[str]) -> tuple[str, str]:
    """SELECT expressions that type each column and collect the values that would not convert."""
    selects, errors = [], []
    for f in schema.schema:
        name = f.name
        if name not in present:
            selects.append(f"NULL AS {name}")
            continue
        raw = f"NULLIF(trim(b.{name}), '')"
        if f.type == pa.string():
            selects.append(f"{raw} AS {name}")
            continue
        target = "TIMESTAMPTZ" if pa.types.is_timestamp(f.type) else _DUCK_TYPES[f.type]
        selects.append(f"TRY_CAST({raw} AS {target}) AS {name}")
        kind = {"TIMESTAMPTZ": "an ISO-8601 timestamp", "DOUBLE": "a number", "INTEGER": "an integer",
                "BIGINT": "an integer", "BOOLEAN": "true or false"}[target]
        errors.append(
            f"CASE WHEN {raw} IS NOT NULL AND TRY_CAST({raw} AS {target}) IS NULL "
            f"THEN '{name}=' || {raw} || ' is not {kind}' END"
        )
    err_expr = f"NULLIF(concat_ws('; ', {', '.join(errors)}), '')" if errors else "NULL"
    return ", ".join(selects), err_expr


def _accepted_files(lake: Lake, table_name: str, upto: str) -> list[str] | pa.Table | None:
    """The accepted partitions of a dimension up to and including `upto`: local paths, or one table."""
    parts = [p for p in lake.partitions(f"{SILVER}/{table_name}") if p <= upto]
    if not parts:
        return None
    paths = [lake.local_path(f"{SILVER}/{table_name}/date={p}/part-0.parquet") for p in parts]
    if all(p is not None and p.is_file() for p in paths):
        return [str(p) for p in paths]
    return pa.concat_tables([lake.read_partition(f"{SILVER}/{table_name}", p) for p in parts])


def _typed_frame(con: duckdb.DuckDBPyConnection, lake: Lake, schema: TableSchema, bronze: pa.Table, partition: str) -> pa.Table:
    present = set(bronze.column_names)
    select, err_expr = _cast_sql(schema, present)
    con.register("b", bronze)
    base = (
        f"SELECT {select}, {err_expr} AS _type_errors, b._ingest_error AS _ingest_error, "
        f"row_number() OVER () - 1 AS _row FROM b"
    )
    key = schema.key
    sql = (
        f"WITH t AS ({base}) SELECT t.*, CASE WHEN t.{key} IS NULL THEN NULL ELSE "
        f"row_number() OVER (PARTITION BY t.{key} ORDER BY t._row) END AS _occurrence FROM t"
    )
    if schema.name == "events":
        joins = []
        for dim, dkey, extra in (("users", "user_id", ""), ("videos", "video_id", ", duration_s")):
            src = _accepted_files(lake, dim, partition)
            view = f"known_{dim}"
            if src is None:
                con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT NULL::VARCHAR AS {dkey}{', NULL::DOUBLE AS duration_s' if extra else ''} WHERE false")
            elif isinstance(src, list):
                con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT DISTINCT ON ({dkey}) {dkey}{extra} FROM read_parquet({src!r})")
            else:
                con.register(f"{view}_arrow", src)
                con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT DISTINCT ON ({dkey}) {dkey}{extra} FROM {view}_arrow")
            joins.append(view)
        sql = (
            f"WITH e AS ({sql}) SELECT e.*, "
            f"CASE WHEN e.user_id IS NULL THEN NULL ELSE ku.user_id IS NOT NULL END AS _user_known, "
            f"CASE WHEN e.video_id IS NULL THEN NULL ELSE kv.video_id IS NOT NULL END AS _video_known, "
            f"kv.duration_s AS _video_duration_s "
            f"FROM e LEFT JOIN known_users ku ON e.user_id = ku.user_id "
            f"LEFT JOIN known_videos kv ON e.video_id = kv.video_id"
        )
    return con.sql(f"{sql} ORDER BY _row").to_arrow_table()


def validate_partition(
    lake: Lake,
    table_name: str,
    partition: str,
    *,
    expectations_dir: Path,
) -> ValidationResult:
    """Validate one ingested partition: accepted rows to silver, broken rows to quarantine with reasons.

    Raises SchemaValidationError (and writes nothing) when a critical schema-level expectation fails.
    """
    schema = table_schema(table_name)
    report, bronze, manifest = check_schema(lake, table_name, partition, expectations_dir=expectations_dir)
    if not report.passed:
        raise SchemaValidationError(table_name, partition, report.failures)

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone='UTC'")
        typed = _typed_frame(con, lake, schema, bronze, partition)
    finally:
        con.close()

    suite = load_suite_file(expectations_dir, table_name)
    row_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") != "schema"]
    found: dict[int, list[tuple[str, str | None, str, str]]] = {}
    described = []
    if typed.num_rows:
        df = typed.to_pandas(timestamp_as_object=False)
        result = _run_suite(
            f"{table_name}_rows",
            row_exps,
            df,
            {"ingested_at": manifest.ingested_time},
            {"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"], "return_unexpected_index_query": False},
        )
        for r in result.results:
            described.append(_describe(r))
            if r.success:
                continue
            meta = r.expectation_config.meta or {}
            unexpected = (r.result or {}).get("unexpected_index_list")
            if unexpected is None:
                raise RuntimeError(f"GX returned no row indices for {r.expectation_config.type}: {r.exception_info}")
            reason_col = meta.get("reason_column")
            column = r.expectation_config.kwargs.get("column")
            for item in unexpected:
                row = int(item["_row"])
                text = str(item.get(reason_col)) if reason_col else meta.get("reason", r.expectation_config.type)
                found.setdefault(row, []).append((reason_col or "", column, r.expectation_config.type, text))
    reasons_by_row = {row: _root_causes(found_row) for row, found_row in found.items()}

    if not typed.num_rows:
        reasons_by_row = {}
    bad = np.zeros(bronze.num_rows, dtype=bool)
    if reasons_by_row:
        bad[np.fromiter(reasons_by_row.keys(), dtype=np.int64)] = True
    rows = typed.column("_row").to_numpy() if typed.num_rows else np.array([], dtype=np.int64)
    if not np.array_equal(rows, np.arange(bronze.num_rows)):
        raise RuntimeError("typed frame lost the bronze row order; refusing to split")

    accepted = typed.filter(pa.array(~bad)).select(schema.columns).cast(schema.schema)
    keep_cols = [c for c in bronze.column_names]
    quarantined = bronze.filter(pa.array(bad)).select(keep_cols)
    bad_rows = np.nonzero(bad)[0]
    reason_texts = ["; ".join(dict.fromkeys(reasons_by_row[int(i)])) for i in bad_rows]
    quarantined = quarantined.append_column("reason", pa.array(reason_texts, pa.string()))
    quarantined = quarantined.append_column("partition", pa.array([partition] * len(bad_rows), pa.string()))
    quarantined = quarantined.append_column(
        "quarantined_at", pa.array([manifest.ingested_time] * len(bad_rows), pa.timestamp("us", tz="UTC"))
    )
    if accepted.num_rows + quarantined.num_rows != bronze.num_rows:
        raise RuntimeError(
            f"row conservation broken for {table_name}/{partition}: {accepted.num_rows} accepted + "
            f"{quarantined.num_rows} quarantined != {bronze.num_rows} ingested"
        )
    accepted_written = lake.write_partition(f"{SILVER}/{table_name}", partition, accepted)
    quarantine_written = lake.write_partition(f"{QUARANTINE}/{table_name}", partition, quarantined)
    counts: Counter[str] = Counter()
    for texts in reasons_by_row.values():
        for t in dict.fromkeys(texts):
            counts[_reason_kind(t)] += 1
    return ValidationResult(
        table=table_name,
        partition=partition,
        ingested=bronze.num_rows,
        accepted=accepted.num_rows,
        quarantined=quarantined.num_rows,
        reasons=dict(counts.most_common()),
        expectations=described,
        schema=report,
        accepted_written=accepted_written,
        quarantine_written=quarantine_written,
    )


def _root_causes(found: list[tuple[str, str | None, str, str]]) -> list[str]:
    """The reasons worth telling for one row: a line that could not be split into fields is only that
    (its empty columns follow from it), and a value that did not convert is not also reported missing."""
    ingest = [text for source, _, _, text in found if source == "_ingest_error"]
    if any(t.startswith("malformed line") for t in ingest):
        return [t for t in ingest if t.startswith("malformed line")]
    uncast = {
        error.split("=", 1)[0]
        for source, _, _, text in found
        if source == "_type_errors"
        for error in text.split("; ")
    }
    return [
        text
        for source, column, kind, text in found
        if not (kind == "expect_column_values_to_not_be_null" and column in uncast)
    ]


def _reason_kind(text: str) -> str:
    """A reason with its row-specific values removed, for counting (e.g. 'watched_s=abc is not a number')."""
    if text.startswith("malformed line"):
        return "malformed line"
    if "is not valid UTF-8" in text:
        return "not valid UTF-8"
    if " is not " in text and "=" in text.split(" is not ", 1)[0]:
        col = text.split("=", 1)[0]
        return f"{col}: wrong type"
    return text


def read_quarantine(lake: Lake, table_name: str, partition: str) -> pa.Table:
    return lake.read_partition(f"{QUARANTINE}/{table_name}", partition)


def quarantine_summary(lake: Lake, table_name: str, partition: str) -> dict[str, int]:
    """Quarantined rows of a partition counted by reason kind."""
    t = read_quarantine(lake, table_name, partition)
    counts: Counter[str] = Counter()
    for text in t.column("reason").to_pylist():
        for part in text.split("; "):
            counts[_reason_kind(part)] += 1
    return dict(counts.most_common())
