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
`_user_known`, `_video_known` and `_video_duration_s` (events against the accepted users and videos),
`_day_error` (an event's or impression's time off its day), `_duplicate_of` (a key accepted on an earlier
day: events, impressions).

A table's optional columns (`TableSchema.optional`: the events' `request_id`, which only the serving
feedback files carry) are neither required nor reported as unknown; absent, they are typed as nulls, and
silver always stores them (`TableSchema.silver_schema`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import date as date_type
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recloop.data.schemas import TableSchema
from recloop.data.schemas import table as table_schema
from recloop.ingestion import FEEDBACK_PREFIX, META_COLUMNS, Manifest, read_bronze
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


def _validation_definition(name: str, expectations: list[dict[str, Any]]):
    """A GX validation definition of `expectations` on one pandas batch definition (a dataframe passed at
    run time): built once, then run on as many frames as needed (a large day batch by batch)."""
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
    return context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))


def _run_suite(name: str, expectations: list[dict[str, Any]], df, params: dict[str, Any], result_format: dict[str, Any]):
    vd = _validation_definition(name, expectations)
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


def _bronze_footer(lake: Lake, table_name: str, partition: str) -> tuple[pa.Schema, Manifest, int]:
    """The bronze partition's schema (with its manifest), manifest and row count, from the Parquet
    footer only: no row is read."""
    from recloop.ingestion import BRONZE, MANIFEST_KEY
    from recloop.lake import PART_FILE, partition_key

    key = f"{partition_key(f'{BRONZE}/{table_name}', partition)}/{PART_FILE}"
    path = lake.local_path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no bronze partition {partition} of {table_name} at {path}")
        meta = pq.read_metadata(path)
    else:
        import io

        meta = pq.read_metadata(io.BytesIO(lake.read_bytes(key)))
    schema = meta.schema.to_arrow_schema()
    if MANIFEST_KEY not in (schema.metadata or {}):
        raise ValueError(f"bronze partition {table_name}/{partition} has no manifest; re-ingest it")
    return schema, Manifest.from_json(schema.metadata[MANIFEST_KEY]), meta.num_rows


def check_schema(
    lake: Lake, table_name: str, partition: str, *, expectations_dir: Path
) -> tuple[SchemaReport, pa.Schema, Manifest]:
    """Run the schema-level expectations on the bronze partition: its columns and row count, read from
    the Parquet footer (no row is loaded, whatever the day's size). Returns the report, the bronze schema
    and the manifest. Never raises for bad data."""
    schema = table_schema(table_name)
    bronze, manifest, rows = _bronze_footer(lake, table_name, partition)
    suite = load_suite_file(expectations_dir, table_name)
    schema_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") == "schema"]
    report = SchemaReport(table=table_name, partition=partition, passed=True, rows=rows)

    for rejected in manifest.rejected_files:
        report.failures.append(f"file {rejected.name} could not be read: {rejected.reason} (kept at {rejected.kept_at})")
    expected = set(schema.silver_columns) | set(META_COLUMNS)
    for f in manifest.files:
        missing = [c for c in schema.columns if c not in f.columns]
        if missing:
            report.missing_columns.extend(c for c in missing if c not in report.missing_columns)
    report.extra_columns = [c for c in bronze.names if c not in expected]

    # Column-set expectations only need the header: validate an empty frame with the bronze columns;
    # row-count expectations a one-byte column with the real row count (2 MB for 2 million rows).
    header_df = _header_frame(schema, bronze.names)
    count_exps = [e for e in schema_exps if e["type"].startswith("expect_table_row_count")]
    column_exps = [e for e in schema_exps if e not in count_exps]
    results = []
    if column_exps:
        results += list(_run_suite(f"{table_name}_schema", column_exps, header_df, {}, {"result_format": "SUMMARY"}).results)
    if count_exps:
        import pandas as pd

        count_df = pd.DataFrame({"_rows": np.zeros(rows, dtype=np.int8)})
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


def _header_frame(schema: TableSchema, names: list[str]):
    """An empty frame with the bronze columns `names`, and the table's optional columns a file may leave
    out (`TableSchema.optional`: null when absent, like validation types them), so the column-set
    expectations neither require them nor warn about a partition without them."""
    import pandas as pd

    names = [*names, *(f.name for f in schema.optional if f.name not in names)]
    return pd.DataFrame({c: pd.Series([], dtype="object") for c in names})


# --- row level -------------------------------------------------------------------------------------


# A value longer than this is cut (with "…") in the reason text; the quarantined row keeps it whole.
REASON_VALUE_CHARS = 60


def _typed_sql(target: str, raw: str) -> str:
    """The DuckDB expression typing the text `raw` as `target`, NULL when it is not exactly a value of it:
    integers only as digits (`1.5` and `1e1` are not rounded), booleans only `true`/`false` in any case
    (`yes`, `1`, `T` are not booleans), numbers only finite (`NaN`, `inf` are not)."""
    if target in ("INTEGER", "BIGINT"):
        return f"CASE WHEN regexp_full_match({raw}, '[+-]?[0-9]+') THEN TRY_CAST({raw} AS {target}) END"
    if target == "BOOLEAN":
        return f"CASE lower({raw}) WHEN 'true' THEN true WHEN 'false' THEN false END"
    if target == "DOUBLE":
        return f"CASE WHEN isfinite(TRY_CAST({raw} AS DOUBLE)) THEN TRY_CAST({raw} AS DOUBLE) END"
    return f"TRY_CAST({raw} AS {target})"


def _cast_sql(schema: TableSchema, present: set[str]) -> tuple[str, str]:
    """SELECT expressions that type each column and collect the values that would not convert."""
    selects, errors = [], []
    for f in schema.silver_schema:
        name = f.name
        if name not in present:
            selects.append(f"NULL AS {name}")
            continue
        raw = f"NULLIF(trim(b.{name}), '')"
        if f.type == pa.string():
            selects.append(f"{raw} AS {name}")
            continue
        target = "TIMESTAMPTZ" if pa.types.is_timestamp(f.type) else _DUCK_TYPES[f.type]
        typed = _typed_sql(target, raw)
        selects.append(f"{typed} AS {name}")
        kind = {"TIMESTAMPTZ": "an ISO-8601 timestamp", "DOUBLE": "a number", "INTEGER": "an integer",
                "BIGINT": "an integer", "BOOLEAN": "true or false"}[target]
        shown = (f"CASE WHEN length({raw}) > {REASON_VALUE_CHARS} THEN left({raw}, {REASON_VALUE_CHARS}) || '…' "
                 f"ELSE {raw} END")
        what = f"' is not {kind}'"
        if target == "DOUBLE":
            what = f"CASE WHEN TRY_CAST({raw} AS DOUBLE) IS NULL THEN {what} ELSE ' is not a finite number' END"
        errors.append(f"CASE WHEN {raw} IS NOT NULL AND ({typed}) IS NULL THEN '{name}=' || {shown} || {what} END")
    err_expr = f"NULLIF(concat_ws('; ', {', '.join(errors)}), '')" if errors else "NULL"
    return ", ".join(selects), err_expr


# Which copy of a duplicated key a partition keeps: the first in this order. Ingestion already lands
# delivered files before feedback files (`recloop.ingestion.ingestion_order`); the order is repeated here
# so a bronze partition ingested before that rule still lets a delivered row win.
_FEEDBACK_LAST = f"regexp_matches(coalesce(b._source_file, ''), '(^|/){FEEDBACK_PREFIX}[^/]*$')"


def _day_error_sql(day_expr: str, day_text: str, column: str = "event_time") -> str:
    """The reason of a row whose time `column` (an event's `event_time`, an impression's `served_at`) is
    not on its partition's (UTC) day."""
    c = f"t.{column}"
    return (f"CASE WHEN {c} IS NOT NULL AND CAST({c} AS DATE) <> {day_expr} "
            f"THEN '{column} ' || strftime({c}, '%Y-%m-%dT%H:%M:%S') || "
            f"CASE WHEN microsecond({c}) % 1000000 <> 0 "
            f"THEN '.' || lpad(CAST(microsecond({c}) % 1000000 AS VARCHAR), 6, '0') ELSE '' END || "
            f"'Z is not on the partition''s day ' || {day_text} || ' (UTC)' END")


_ACCEPTED_EARLIER_REASON = "duplicate event_id: an event accepted on "


def _register_accepted_before(con: duckdb.DuckDBPyConnection, lake: Lake, before: str) -> None:
    """`accepted_events(event_id, _p)`: the event ids of `silver/events` on days before `before` (only the
    column event_id of those Parquet files is read)."""
    from recloop.data.schemas import EVENTS
    from recloop.lake import local_partition_files, register_partitions

    dataset = f"{SILVER}/events"
    parts = [p for p in lake.partitions(dataset) if p < before]
    register_partitions(con, "accepted_events", lake, dataset, parts, pa.schema([EVENTS.schema.field("event_id")]),
                        local_partition_files(lake, dataset))


def _accepted_join(keys: str) -> str:
    """A LEFT JOIN naming `acc.first_day`, the first earlier day an event id of `keys` was accepted on."""
    return (f"LEFT JOIN (SELECT event_id, min(_p) AS first_day FROM accepted_events "
            f"WHERE event_id IN (SELECT event_id FROM {keys}) GROUP BY event_id) acc ON e.event_id = acc.event_id")


def _accepted_reason() -> str:
    return (f"CASE WHEN acc.first_day IS NOT NULL THEN '{_ACCEPTED_EARLIER_REASON}' || strftime(acc.first_day, '%Y-%m-%d') "
            f"|| ' has the same event_id' END")


def _accepted_files(lake: Lake, table_name: str, upto: str) -> list[str] | pa.Table | None:
    """The accepted partitions of a dimension up to and including `upto`: local paths, or one table."""
    parts = [p for p in lake.partitions(f"{SILVER}/{table_name}") if p <= upto]
    if not parts:
        return None
    paths = [lake.local_path(f"{SILVER}/{table_name}/date={p}/part-0.parquet") for p in parts]
    if all(p is not None and p.is_file() for p in paths):
        return [str(p) for p in paths]
    return pa.concat_tables([lake.read_partition(f"{SILVER}/{table_name}", p) for p in parts])


def _typed_query(con: duckdb.DuckDBPyConnection, lake: Lake, schema: TableSchema, present: set[str], partition: str) -> str:
    """The DuckDB query typing the bronze view `b` (its columns `present`, and `_row`, the row's position
    in bronze) with the context the row rules need, in bronze order. Registers the views it reads."""
    select, err_expr = _cast_sql(schema, present)
    day = date_type.fromisoformat(partition).isoformat()
    base = (
        f"SELECT {select}, {err_expr} AS _type_errors, b._ingest_error AS _ingest_error, "
        f"{_FEEDBACK_LAST} AS _feedback, b._row AS _row FROM b"
    )
    key = schema.key
    day_error = (", " + _day_error_sql(f"DATE '{day}'", f"'{day}'", schema.time_column) + " AS _day_error"
                 if schema.name in _ON_THEIR_DAY else "")
    sql = (
        f"WITH t AS ({base}) SELECT t.* EXCLUDE (_feedback), CASE WHEN t.{key} IS NULL THEN NULL ELSE "
        f"row_number() OVER (PARTITION BY t.{key} ORDER BY t._feedback, t._row) END AS _occurrence{day_error} FROM t"
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
            f"kv.duration_s AS _video_duration_s, "
            f"{_accepted_reason()} AS _duplicate_of "
            f"FROM e LEFT JOIN known_users ku ON e.user_id = ku.user_id "
            f"LEFT JOIN known_videos kv ON e.video_id = kv.video_id "
            f"{_accepted_join('e')}"
        )
        # An event id accepted on an earlier day (never the partition's own day: re-running it is idempotent).
        _register_accepted_before(con, lake, day)
    elif schema.name == "impressions":
        sql = _impressions_before_sql(con, lake, sql, day)
    return f"{sql} ORDER BY _row"


# Tables whose rows must be on their partition's (UTC) day (`_day_error`), by their time column.
_ON_THEIR_DAY = ("events", "impressions")
_IMPRESSION_ACCEPTED_REASON = "duplicate impression_id: an impression accepted on "


def _impressions_before_sql(con: duckdb.DuckDBPyConnection, lake: Lake, sql: str, day: str) -> str:
    """`sql` (typed impressions) with `_duplicate_of`: the reason of an impression whose id was accepted
    into `silver/impressions` on an earlier day (a re-sent spool segment, a replayed answer); the earlier
    day's row is kept. Only the impression_id column of those days is read."""
    from recloop.data.schemas import IMPRESSIONS
    from recloop.lake import local_partition_files, register_partitions

    dataset = f"{SILVER}/impressions"
    parts = [p for p in lake.partitions(dataset) if p < day]
    register_partitions(con, "accepted_impressions", lake, dataset, parts,
                        pa.schema([IMPRESSIONS.schema.field("impression_id")]), local_partition_files(lake, dataset))
    return (f"WITH i AS ({sql}) SELECT i.*, CASE WHEN acc.first_day IS NOT NULL THEN "
            f"'{_IMPRESSION_ACCEPTED_REASON}' || strftime(acc.first_day, '%Y-%m-%d') || ' has the same impression_id' "
            f"END AS _duplicate_of FROM i LEFT JOIN (SELECT impression_id, min(_p) AS first_day FROM accepted_impressions "
            f"WHERE impression_id IN (SELECT impression_id FROM i) GROUP BY impression_id) acc "
            f"ON i.impression_id = acc.impression_id")


# A day is validated this many rows at a time: DuckDB streams its typed rows in record batches of this
# size through the GX suite (as a pandas frame) and into the silver and quarantine Parquet writers, so
# memory does not grow with the day's size. Every row-level expectation judges a row alone; the rules
# that need the whole day (a duplicated key, an id accepted on an earlier day, unknown users and videos)
# are computed once in DuckDB as columns of the typed rows.
VALIDATE_CHUNK_ROWS = 50_000

# DuckDB's memory for typing a day (sorting it, finding duplicates): beyond this it spills to a temporary
# folder. Settable through the environment (`RECLOOP_DUCKDB_MEMORY_LIMIT`, e.g. "1GB";
# `RECLOOP_DUCKDB_THREADS`).
DUCKDB_MEMORY_LIMIT = "128MB"
DUCKDB_THREADS = 2


def _duckdb(spill_dir: str, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for validation: UTC, bounded memory, spilling to `spill_dir`."""
    con = duckdb.connect(config={
        "memory_limit": memory_limit or os.environ.get("RECLOOP_DUCKDB_MEMORY_LIMIT") or DUCKDB_MEMORY_LIMIT,
        "threads": int(os.environ.get("RECLOOP_DUCKDB_THREADS") or DUCKDB_THREADS),
        "temp_directory": spill_dir,
    })
    con.execute("SET TimeZone='UTC'")
    return con


# When an operator cannot spill within the limit, the typing is tried again with more memory, up to this.
DUCKDB_MAX_MEMORY_LIMIT_MB = 8192


def _copy_typed(spill: str, prepare: Any, target: Path) -> None:
    """Run the typing query `prepare(con)` returns into the Parquet file `target`, in a memory-limited
    DuckDB connection; when DuckDB runs out of memory, again with twice the limit (up to 8 GB)."""
    limit = None
    while True:
        con = _duckdb(spill, limit)
        try:
            sql, row_group = prepare(con)
            con.execute(f"COPY ({sql}) TO '{target}' (FORMAT parquet, COMPRESSION lz4_raw, ROW_GROUP_SIZE {row_group})")
            return
        except duckdb.OutOfMemoryException:
            current = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
            mb = _megabytes(current)
            if mb * 2 > DUCKDB_MAX_MEMORY_LIMIT_MB:
                raise
            limit = f"{mb * 2}MiB"
            log.warning("DuckDB needed more than %s to type the partition; trying again with %s", current, limit)
        finally:
            con.close()


def _megabytes(setting: str) -> int:
    """DuckDB's memory setting ('122.0 MiB', '1.8 GiB') in whole megabytes."""
    number, unit = setting.split()
    return int(float(number) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "TiB": 1 << 20}.get(unit, 1)) or 1


def _row_groups(path: Path, max_rows: int | None = None):
    """The tables of a Parquet file's row groups, one at a time (pyarrow's batch reader buffers far more),
    cut into pieces of at most `max_rows` rows."""
    source = pq.ParquetFile(path)
    for i in range(source.num_row_groups):
        table = source.read_row_group(i, use_threads=False)
        step = max_rows or table.num_rows or 1
        for lo in range(0, table.num_rows, step):
            yield table.slice(lo, step)


class _RowSlicer:
    """Consecutive slices of exactly the asked number of rows from a stream of record batches."""

    def __init__(self, tables: Any, schema: pa.Schema) -> None:
        self._batches = (b for t in tables for b in t.to_batches())
        self._schema = schema
        self._buffer: list[pa.RecordBatch] = []
        self._rows = 0

    def take(self, n: int) -> pa.Table:
        while self._rows < n:
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError("the bronze partition has fewer rows than its typed rows; refusing to split")
            self._buffer.append(batch)
            self._rows += batch.num_rows
        table = pa.Table.from_batches(self._buffer, schema=self._schema)
        rest = table.slice(n)
        self._buffer, self._rows = rest.to_batches(), rest.num_rows
        return table.slice(0, n)

    def exhausted(self) -> bool:
        return self._rows == 0 and next(self._batches, None) is None


def _merge_described(described: dict[tuple[str, str | None], dict[str, Any]], d: dict[str, Any]) -> None:
    """One batch's result of an expectation added to the day's: failed if any batch failed, the
    unexpected rows summed."""
    key = (d["expectation"], d["column"])
    if key not in described:
        described[key] = d
        return
    prev = described[key]
    prev["success"] = prev["success"] and d["success"]
    if prev["unexpected_count"] is not None or d["unexpected_count"] is not None:
        prev["unexpected_count"] = (prev["unexpected_count"] or 0) + (d["unexpected_count"] or 0)


def _pandas_types(t: pa.DataType):
    """Text columns stay Arrow-backed in the frame GX reads (no Python string per value)."""
    import pandas as pd

    return pd.StringDtype("pyarrow") if t == pa.string() else None


def _gx_columns(expectations: list[dict[str, Any]]) -> set[str] | None:
    """The columns the row-level expectations read (with `_row` and their reason columns), so a batch's
    frame holds only those; None when one of them may read any column."""
    columns = {"_row"}
    for e in expectations:
        kwargs, meta = e.get("kwargs", {}), e.get("meta", {})
        named = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
        named += list(kwargs.get("column_list", []))
        if not named:
            return None
        columns.update(named)
        if meta.get("reason_column"):
            columns.add(meta["reason_column"])
    return columns


_ROW_RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"],
                      "return_unexpected_index_query": False}


def validate_partition(
    lake: Lake,
    table_name: str,
    partition: str,
    *,
    expectations_dir: Path,
    waive_empty: bool = False,
    chunk_rows: int = VALIDATE_CHUNK_ROWS,
) -> ValidationResult:
    """Validate one ingested partition: accepted rows to silver, broken rows to quarantine with reasons.

    Raises SchemaValidationError (and writes nothing) when a critical schema-level expectation fails;
    with `waive_empty`, a partition whose only failure is having no rows is validated (a day without data
    inside an imported history: zero rows accepted, zero quarantined).

    The day is streamed: DuckDB reads the bronze Parquet, types it and computes the whole-day rules
    (memory-limited, spilling to disk), then hands over `chunk_rows` rows at a time, in bronze order; each
    batch goes through the GX row-level suite and its rows are appended to the silver or quarantine
    Parquet file, which replace the partitions' earlier content only when the whole day is done.
    """
    import contextlib
    import shutil
    import tempfile

    from recloop.ingestion import BRONZE
    from recloop.lake import PART_FILE, partition_key

    schema = table_schema(table_name)
    report, bronze_schema, manifest = check_schema(lake, table_name, partition, expectations_dir=expectations_dir)
    if waive_empty and not report.passed and report.rows == 0 and not report.missing_columns \
            and not manifest.rejected_files:
        report.failures.clear()
        report.passed = True
    if not report.passed:
        raise SchemaValidationError(table_name, partition, report.failures)

    suite = load_suite_file(expectations_dir, table_name)
    row_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") != "schema"]
    params = {"ingested_at": manifest.ingested_time}
    q_schema = bronze_schema.append(pa.field("reason", pa.string())).append(pa.field("partition", pa.string())) \
        .append(pa.field("quarantined_at", pa.timestamp("us", tz="UTC")))
    counts: Counter[str] = Counter()
    described: dict[tuple[str, str | None], dict[str, Any]] = {}
    vd = None
    ingested = accepted_rows = quarantined_rows = 0

    with contextlib.ExitStack() as stack:
        spill = tempfile.mkdtemp(prefix="recloop-duckdb-")
        stack.callback(shutil.rmtree, spill, True)
        bronze_path = stack.enter_context(lake.local_file(f"{partition_key(f'{BRONZE}/{table_name}', partition)}/{PART_FILE}"))
        listing = "'" + str(bronze_path).replace("'", "''") + "'"
        if "file_row_number" in bronze_schema.names:
            raise SchemaValidationError(table_name, partition, ["a file has a column named file_row_number, "
                                                                "which recloop reserves; rename it"])

        def prepare(con: duckdb.DuckDBPyConnection) -> tuple[str, int]:
            con.execute(f"CREATE TEMP VIEW b AS SELECT * EXCLUDE (file_row_number), file_row_number AS _row "
                        f"FROM read_parquet({listing}, file_row_number = true)")
            return _typed_query(con, lake, schema, set(bronze_schema.names), partition), int(chunk_rows)

        # DuckDB's work ends here: the typed day goes to a local Parquet file and the connection closes,
        # so its memory is free before the batches go through GX.
        typed_path = Path(spill) / "typed.parquet"
        _copy_typed(spill, prepare, typed_path)
        reader = _row_groups(typed_path, chunk_rows)
        bronze_rows = _RowSlicer(_row_groups(bronze_path), bronze_schema)
        # (entered quarantine first: the block's end commits silver first, then quarantine)
        quarantine = stack.enter_context(lake.partition_writer(f"{QUARANTINE}/{table_name}", partition, q_schema))
        silver = stack.enter_context(lake.partition_writer(f"{SILVER}/{table_name}", partition, schema.silver_schema))
        gx_columns = _gx_columns(row_exps)
        for typed in reader:
            n = typed.num_rows
            if not n:
                continue
            if not np.array_equal(typed.column("_row").to_numpy(), np.arange(ingested, ingested + n)):
                raise RuntimeError("typed frame lost the bronze row order; refusing to split")
            bronze = bronze_rows.take(n)
            if vd is None:
                vd = _validation_definition(f"{table_name}_rows", row_exps)
            df = (typed if gx_columns is None else typed.select([c for c in typed.column_names if c in gx_columns])
                  ).to_pandas(timestamp_as_object=False, types_mapper=_pandas_types)
            result = vd.run(batch_parameters={"dataframe": df}, expectation_parameters=params,
                            result_format=_ROW_RESULT_FORMAT)
            del df
            found: dict[int, list[tuple[str, str | None, str, str]]] = {}
            for r in result.results:
                _merge_described(described, _describe(r))
                _collect_failures(r, found)
            del result
            reasons_by_row = {row - ingested: _root_causes(f) for row, f in found.items()}
            bad = np.zeros(n, dtype=bool)
            if reasons_by_row:
                bad[np.fromiter(reasons_by_row.keys(), dtype=np.int64)] = True
            accepted = typed.filter(pa.array(~bad)).select(schema.silver_columns).cast(schema.silver_schema)
            bad_rows = np.nonzero(bad)[0]
            texts = ["; ".join(dict.fromkeys(reasons_by_row[int(i)])) for i in bad_rows]
            quarantined = bronze.filter(pa.array(bad))
            quarantined = quarantined.append_column("reason", pa.array(texts, pa.string()))
            quarantined = quarantined.append_column("partition", pa.array([partition] * len(texts), pa.string()))
            quarantined = quarantined.append_column(
                "quarantined_at", pa.array([manifest.ingested_time] * len(texts), pa.timestamp("us", tz="UTC")))
            if accepted.num_rows:
                silver.write_table(accepted)
            if quarantined.num_rows:
                quarantine.write_table(quarantined)
            for reasons in reasons_by_row.values():
                for t in dict.fromkeys(reasons):
                    counts[_reason_kind(t)] += 1
            ingested += n
            accepted_rows += accepted.num_rows
            quarantined_rows += quarantined.num_rows
        if not bronze_rows.exhausted() or ingested != report.rows:
            raise RuntimeError("typed frame lost the bronze row order; refusing to split")
        if accepted_rows + quarantined_rows != ingested:
            raise RuntimeError(
                f"row conservation broken for {table_name}/{partition}: {accepted_rows} accepted + "
                f"{quarantined_rows} quarantined != {ingested} ingested"
            )
    # Arrow keeps freed buffers for reuse; give them back, so the next step of the day starts lower.
    pa.default_memory_pool().release_unused()
    return ValidationResult(
        table=table_name,
        partition=partition,
        ingested=ingested,
        accepted=accepted_rows,
        quarantined=quarantined_rows,
        reasons=dict(counts.most_common()),
        expectations=list(described.values()),
        schema=report,
        accepted_written=lake.partition_written(f"{SILVER}/{table_name}", partition, accepted_rows),
        quarantine_written=lake.partition_written(f"{QUARANTINE}/{table_name}", partition, quarantined_rows),
    )


def _collect_failures(r: Any, found: dict[int, list[tuple[str, str | None, str, str]]]) -> None:
    """The rows one expectation's result failed, with the reason its suite gives, added to `found`."""
    if r.success:
        return
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
    future = any(" is in the future " in text for _, _, _, text in found)
    return [
        text
        for source, column, kind, text in found
        if not (kind == "expect_column_values_to_not_be_null" and column in uncast)
        # an event later than the ingestion time is also off its partition's day: the future is the cause
        and not (future and source == "_day_error")
    ]


def _reason_kind(text: str) -> str:
    """A reason with its row-specific values removed, for counting (e.g. 'watched_s=abc is not a number')."""
    if text.startswith("malformed line"):
        return "malformed line"
    if text.startswith(_EARLIER_DAY_REASON):
        return "duplicate event_id: a row of an earlier day of the range has the same event_id"
    if text.startswith(_ACCEPTED_EARLIER_REASON):
        return "duplicate event_id: an event accepted on an earlier day has the same event_id"
    if text.startswith(_IMPRESSION_ACCEPTED_REASON):
        return "duplicate impression_id: an impression accepted on an earlier day has the same impression_id"
    for column in ("event_time", "served_at"):
        if text.startswith(f"{column} ") and " is not on the partition's day " in text:
            return f"{column} is not on the partition's day"
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
    return reason_counts(read_quarantine(lake, table_name, partition))


def reason_counts(quarantined: pa.Table) -> dict[str, int]:
    """Quarantined rows counted by reason kind (a row with two reasons counts for both), most frequent
    first: e.g. {"watched_s=<value> is not a number": 3, ...}."""
    counts: Counter[str] = Counter()
    for text in quarantined.column("reason").to_pylist():
        for part in (text or "").split("; "):
            counts[_reason_kind(part)] += 1
    return dict(counts.most_common())


# --- a range of days in one pass (history imports, `recloop run --start --end`) ---------------------


@dataclass
class DayValidation:
    """One day of a range validation: the same numbers a daily `ValidationResult` holds."""

    ingested: int
    accepted: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def conserved(self) -> bool:
        return self.accepted + self.quarantined == self.ingested

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.ingested if self.ingested else 0.0


@dataclass
class RangeValidationResult:
    """A table validated over a range of days: per day what `validate_partition` would have found, the
    reasons and expectations over the whole range, and what was written or removed."""

    table: str
    first: str
    last: str
    days: dict[str, DayValidation]
    reasons: dict[str, int]
    expectations: list[dict[str, Any]]
    extra_columns: list[str]
    silver_partitions: int = 0
    quarantine_partitions: int = 0
    removed_partitions: int = 0

    @property
    def ingested(self) -> int:
        return sum(d.ingested for d in self.days.values())

    @property
    def accepted(self) -> int:
        return sum(d.accepted for d in self.days.values())

    @property
    def quarantined(self) -> int:
        return sum(d.quarantined for d in self.days.values())

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.ingested if self.ingested else 0.0

    @property
    def conserved(self) -> bool:
        return all(d.conserved for d in self.days.values())


def schema_reports_range(
    lake: Lake, table_name: str, days: list[str], *, expectations_dir: Path,
    bronze: Mapping[str, tuple[pa.Table, Manifest]] | None = None,
) -> dict[str, SchemaReport]:
    """The schema-level check of every ingested day of `days`, as `check_schema` makes it, from the
    partitions' footers (columns and manifest) and one GX run per distinct column set. The row-count
    expectation is left out: in a range, a day whose files hold no rows is a day without data, not a
    failed delivery."""
    from recloop.ingestion import read_manifest

    import pandas as pd

    schema = table_schema(table_name)
    suite = load_suite_file(expectations_dir, table_name)
    column_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") == "schema"
                   and not e["type"].startswith("expect_table_row_count")]
    expected = set(schema.silver_columns) | set(META_COLUMNS)
    by_columns: dict[tuple[str, ...], list] = {}
    reports: dict[str, SchemaReport] = {}
    for day in days:
        if bronze is not None and day in bronze:
            columns, manifest = bronze[day][0].column_names, bronze[day][1]
        else:
            columns, manifest = read_manifest(lake, table_name, day)
        report = SchemaReport(table=table_name, partition=day, passed=True, rows=manifest.rows)
        for rejected in manifest.rejected_files:
            report.failures.append(f"file {rejected.name} could not be read: {rejected.reason} (kept at {rejected.kept_at})")
        for f in manifest.files:
            for c in schema.columns:
                if c not in f.columns and c not in report.missing_columns:
                    report.missing_columns.append(c)
        report.extra_columns = [c for c in columns if c not in expected]
        reports[day] = report
        by_columns.setdefault(tuple(columns), []).append(report)
    for columns, group in by_columns.items():
        if not column_exps:
            break
        header_df = _header_frame(schema, list(columns))
        results = list(_run_suite(f"{table_name}_schema", column_exps, header_df, {}, {"result_format": "SUMMARY"}).results)
        for report in group:
            for r in results:
                d = _describe(r)
                report.expectations.append(d)
                if r.success:
                    continue
                detail = d["reason"] or d["expectation"]
                if r.expectation_config.type == "expect_table_columns_to_match_set":
                    cols = report.missing_columns if r.expectation_config.kwargs.get("exact_match") is False else report.extra_columns
                    detail = f"{detail}: {', '.join(cols) or '(see GX result)'}"
                (report.failures if d["severity"] == "critical" else report.warnings).append(detail)
    for report in reports.values():
        if report.missing_columns and not any("lacks column" in f for f in report.failures):
            report.failures.append(f"a file lacks column(s) the {table_name} table requires: {', '.join(report.missing_columns)}")
        report.passed = not report.failures
    return reports


# Rows of bronze validated in one GX pass: a long history is validated a few hundred thousand rows at a
# time (days are never split); duplicates across chunks are still found (`_earlier_day` below).
RANGE_CHUNK_ROWS = 1_000_000

_EARLIER_DAY_REASON = "duplicate event_id: a row of an earlier day of the range ("


def _range_typed_frame(
    con: duckdb.DuckDBPyConnection, schema: TableSchema, bronze: pa.Table, *, seen: bool
) -> pa.Table:
    """`_typed_frame` for the rows of several days (`_day`, `_row` = position in `bronze`): duplicates of
    a key within a day (`_occurrence`); for events, an event time off its day (`_day_error`), a key accepted
    before the range (`accepted_events`) or already used on an earlier day of the range (`_duplicate_of`,
    against this chunk and the `seen` table of earlier chunks), and the users and videos
    accepted on the event's day or before (`known_users(user_id, first_day)`, `known_videos`)."""
    present = set(bronze.column_names)
    select, err_expr = _cast_sql(schema, present)
    con.register("b", bronze)
    key = schema.key
    base = (f"SELECT {select}, {err_expr} AS _type_errors, b._ingest_error AS _ingest_error, "
            f"{_FEEDBACK_LAST} AS _feedback, b._day AS _day, b._row AS _row FROM b")
    day_error = (", " + _day_error_sql("t._day", "strftime(t._day, '%Y-%m-%d')") + " AS _day_error"
                 if schema.name == "events" else "")
    sql = (f"WITH t AS ({base}) SELECT t.* EXCLUDE (_feedback), CASE WHEN t.{key} IS NULL THEN NULL ELSE "
           f"row_number() OVER (PARTITION BY t._day, t.{key} ORDER BY t._feedback, t._row) END AS _occurrence"
           f"{day_error} FROM t")
    if schema.name != "events":
        return con.sql(f"{sql} ORDER BY _row").to_arrow_table()
    first_seen = ("LEFT JOIN seen ON e.event_id = seen.event_id" if seen else
                  "LEFT JOIN (SELECT NULL::VARCHAR AS event_id, NULL::DATE AS first_day) seen ON false")
    sql = f"""
WITH e AS ({sql}),
f AS (
  SELECT e.*, CASE WHEN e.event_id IS NULL THEN NULL
                   ELSE least(seen.first_day, min(e._day) OVER (PARTITION BY e.event_id)) END AS _first_day,
         {_accepted_reason()} AS _accepted_before
  FROM e {first_seen} {_accepted_join('e')}
),
j AS (
  SELECT f.*,
         CASE WHEN f.user_id IS NULL THEN NULL ELSE ku.user_id IS NOT NULL END AS _user_known,
         CASE WHEN f.video_id IS NULL THEN NULL ELSE kv.video_id IS NOT NULL END AS _video_known,
         kv.duration_s AS _video_duration_s
  FROM f
  LEFT JOIN known_users ku ON f.user_id = ku.user_id AND ku.first_day <= f._day
  LEFT JOIN known_videos kv ON f.video_id = kv.video_id AND kv._p <= f._day
  QUALIFY row_number() OVER (PARTITION BY f._row ORDER BY kv._p DESC NULLS LAST) = 1
)
SELECT j.* EXCLUDE (_first_day, _accepted_before),
       coalesce(j._accepted_before, CASE WHEN j._first_day < j._day
            THEN '{_EARLIER_DAY_REASON}' || strftime(j._first_day, '%Y-%m-%d') || ') has the same event_id' END)
            AS _duplicate_of
FROM j ORDER BY _row
"""
    return con.sql(sql).to_arrow_table()


def _align(tables: list[pa.Table]) -> pa.Table:
    """Concatenate bronze partitions whose column sets differ (extra columns of one day): missing columns
    become nulls of the type the other days have."""
    types: dict[str, pa.DataType] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, f.type)
    aligned = [pa.table({c: (t.column(c) if c in t.column_names else pa.nulls(t.num_rows, types[c])) for c in types})
               for t in tables]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in aligned])


def validate_range(
    lake: Lake,
    table_name: str,
    days: list[str],
    *,
    expectations_dir: Path,
    chunk_rows: int = RANGE_CHUNK_ROWS,
    bronze: Mapping[str, tuple[pa.Table, Manifest]] | None = None,
) -> RangeValidationResult:
    """Validate the ingested `days` of `table_name` in one pass: the same row-level rules as
    `validate_partition` day by day (duplicates of a key within a day, users and videos accepted on the
    event's day or before, the future against each day's ingestion time), plus, for events, a key already
    used on an earlier day of the range (the later rows are quarantined, once each).

    Writes `silver/<table>/date=D` for each day with accepted rows and `quarantine/<table>/date=D` for each
    day with quarantined rows; a partition of those days the new split leaves empty is removed (so a re-run
    gives exactly the same lake). Raises SchemaValidationError (writing nothing) when a day fails its
    schema check. `bronze` holds days' bronze tables already in memory (`ingest_range(keep_rows=...)`)."""
    from recloop import progress
    from recloop.ingestion import read_bronze

    schema = table_schema(table_name)
    days = sorted(days)
    first, last = (days[0], days[-1]) if days else ("", "")
    reports = schema_reports_range(lake, table_name, days, expectations_dir=expectations_dir, bronze=bronze)
    failed = [f"{d}: {'; '.join(r.failures)}" for d, r in reports.items() if not r.passed]
    if failed:
        raise SchemaValidationError(table_name, f"{first}..{last}", failed)
    suite = load_suite_file(expectations_dir, table_name)
    row_exps = [e for e in suite["expectations"] if e.get("meta", {}).get("level") != "schema"]
    existing = {kind: {p for p in lake.partitions(f"{kind}/{table_name}") if first <= p <= last}
                for kind in (SILVER, QUARANTINE)}
    out = RangeValidationResult(table_name, first, last, {}, {}, [], sorted({c for r in reports.values() for c in r.extra_columns}))
    counts: Counter[str] = Counter()
    described: dict[tuple[str, str | None], dict[str, Any]] = {}

    # Chunks of whole days of about `chunk_rows` rows.
    chunks: list[list[str]] = [[]]
    rows = 0
    for d in days:
        if chunks[-1] and rows + reports[d].rows > chunk_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(d)
        rows += reports[d].rows

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone='UTC'")
        if table_name == "events":
            from recloop.data.schemas import USERS, VIDEOS
            from recloop.lake import local_partition_files, register_partitions

            for dim, dschema in (("users", USERS), ("videos", VIDEOS)):
                parts = [p for p in lake.partitions(f"{SILVER}/{dim}") if p <= last]
                register_partitions(con, f"{dim}_src", lake, f"{SILVER}/{dim}", parts, dschema.schema,
                                    local_partition_files(lake, f"{SILVER}/{dim}"))
            con.execute("CREATE TEMP TABLE known_users AS SELECT user_id, min(_p) AS first_day FROM users_src "
                        "WHERE user_id IS NOT NULL GROUP BY user_id")
            con.execute("CREATE TEMP TABLE known_videos AS SELECT video_id, _p, any_value(duration_s) AS duration_s "
                        "FROM videos_src WHERE video_id IS NOT NULL GROUP BY video_id, _p")
            con.execute("CREATE TEMP TABLE seen (event_id VARCHAR, first_day DATE)")
            # Event ids accepted before the range (the range's own days are being replaced).
            _register_accepted_before(con, lake, first)
        with progress.stage(f"validate {table_name}", len(days), "day") as bar:
            for chunk_no, chunk in enumerate(c for c in chunks if c):
                bronzes = [bronze[d] if bronze is not None and d in bronze else read_bronze(lake, table_name, d)
                           for d in chunk]
                offsets = np.cumsum([0] + [b.num_rows for b, _ in bronzes])
                parts = []
                for (b, _), d, lo in zip(bronzes, chunk, offsets[:-1].tolist()):
                    b = b.append_column("_day", pa.array([date_type.fromisoformat(d)] * b.num_rows, pa.date32()))
                    parts.append(b.append_column("_row", pa.array(np.arange(lo, lo + b.num_rows), pa.int64())))
                chunk_table = _align(parts)
                typed = _range_typed_frame(con, schema, chunk_table, seen=chunk_no > 0)
                if typed.num_rows != chunk_table.num_rows or not np.array_equal(
                        typed.column("_row").to_numpy(), np.arange(chunk_table.num_rows)):
                    raise RuntimeError("typed frame lost the bronze row order; refusing to split")
                if table_name == "events":
                    con.register("chunk_keys", typed.select(["event_id", "_day"]))
                    con.execute("INSERT INTO seen SELECT event_id, min(_day) FROM chunk_keys "
                                "WHERE event_id IS NOT NULL AND event_id NOT IN (SELECT event_id FROM seen) "
                                "GROUP BY event_id")
                    con.unregister("chunk_keys")
                typed = typed.drop_columns(["_day"])
                reasons_by_row = _range_reasons(table_name, typed, bronzes, row_exps, offsets, described)
                bad = np.zeros(chunk_table.num_rows, dtype=bool)
                if reasons_by_row:
                    bad[np.fromiter(reasons_by_row.keys(), dtype=np.int64)] = True
                accepted_all = typed.select(schema.silver_columns).cast(schema.silver_schema)
                for i, (d, (b, manifest)) in enumerate(zip(chunk, bronzes)):
                    lo, hi = int(offsets[i]), int(offsets[i + 1])
                    day_bad = bad[lo:hi]
                    accepted = accepted_all.slice(lo, hi - lo).filter(pa.array(~day_bad))
                    quarantined = b.filter(pa.array(day_bad))
                    bad_rows = np.nonzero(day_bad)[0] + lo
                    texts = ["; ".join(dict.fromkeys(reasons_by_row[int(r)])) for r in bad_rows]
                    quarantined = quarantined.append_column("reason", pa.array(texts, pa.string()))
                    quarantined = quarantined.append_column("partition", pa.array([d] * len(texts), pa.string()))
                    quarantined = quarantined.append_column(
                        "quarantined_at", pa.array([manifest.ingested_time] * len(texts), pa.timestamp("us", tz="UTC")))
                    if accepted.num_rows + quarantined.num_rows != b.num_rows:
                        raise RuntimeError(f"row conservation broken for {table_name}/{d}: {accepted.num_rows} accepted "
                                           f"+ {quarantined.num_rows} quarantined != {b.num_rows} ingested")
                    day_counts: Counter[str] = Counter()
                    for r in bad_rows:
                        for t in dict.fromkeys(reasons_by_row[int(r)]):
                            day_counts[_reason_kind(t)] += 1
                    counts.update(day_counts)
                    for kind, table, n in ((SILVER, accepted, accepted.num_rows), (QUARANTINE, quarantined, quarantined.num_rows)):
                        if n:
                            lake.write_partition(f"{kind}/{table_name}", d, table)
                            if kind == SILVER:
                                out.silver_partitions += 1
                            else:
                                out.quarantine_partitions += 1
                        elif d in existing[kind]:
                            lake.delete_partition(f"{kind}/{table_name}", d)
                            out.removed_partitions += 1
                    out.days[d] = DayValidation(b.num_rows, accepted.num_rows, quarantined.num_rows,
                                                dict(day_counts.most_common()))
                    bar.update(1)
    finally:
        con.close()
    out.reasons = dict(counts.most_common())
    out.expectations = list(described.values())
    return out


def _range_reasons(
    table_name: str, typed: pa.Table, bronzes: list, row_exps: list[dict[str, Any]], offsets: np.ndarray,
    described: dict[tuple[str, str | None], dict[str, Any]],
) -> dict[int, list[str]]:
    """The row-level suite on a chunk's typed rows, one GX run per ingestion time (the "future" rule
    compares with it; a range ingested in one run has one); returns row -> reasons and sums the
    expectations' results into `described`."""
    if not typed.num_rows:
        return {}
    groups: dict[str, list[int]] = {}
    for i, (_, manifest) in enumerate(bronzes):
        groups.setdefault(manifest.ingested_at, []).append(i)
    columns = _gx_columns(row_exps)
    frame_of = typed if columns is None else typed.select([c for c in typed.column_names if c in columns])
    vd = _validation_definition(f"{table_name}_rows_range", row_exps)
    found: dict[int, list[tuple[str, str | None, str, str]]] = {}
    for ingested_at, members in groups.items():
        # The group's rows (whole days, consecutive in `typed`), VALIDATE_CHUNK_ROWS at a time.
        spans: list[tuple[int, int]] = []
        for i in members:
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            if spans and spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], hi)
            elif hi > lo:
                spans.append((lo, hi))
        pieces = [(lo, min(lo + VALIDATE_CHUNK_ROWS, hi) - lo) for start, hi in spans
                  for lo in range(start, hi, VALIDATE_CHUNK_ROWS)]
        for lo, n in pieces:
            df = frame_of.slice(lo, n).to_pandas(timestamp_as_object=False, types_mapper=_pandas_types)
            result = vd.run(batch_parameters={"dataframe": df},
                            expectation_parameters={"ingested_at": datetime.fromisoformat(ingested_at)},
                            result_format=_ROW_RESULT_FORMAT)
            del df
            for r in result.results:
                _merge_described(described, _describe(r))
                _collect_failures(r, found)
    return {row: _root_causes(f) for row, f in found.items()}
