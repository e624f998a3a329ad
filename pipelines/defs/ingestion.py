"""Ingestion: one daily-partitioned asset per table landing raw files into the lake's bronze layer, and
the blocking schema check (Great Expectations, schema-level expectations) that guards everything after.
"""


import dagster as dg

from pipelines.defs.partitions import DAILY
from pipelines.defs.resources import AlertsResource, GreatExpectationsResource, LakeResource
from recloop.data.schemas import TABLE_ORDER
from recloop.ingestion import ingest_partition


def bronze_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["bronze", table])


def _bronze_asset(table: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=bronze_key(table),
        group_name="ingestion",
        partitions_def=DAILY,
        kinds={"parquet"},
        description=(
            f"Raw `{table}` files of the day, landed as they came (every column as text, with source file, "
            "row and any read error). Re-running replaces the partition."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, landing: LakeResource, lake: LakeResource) -> dg.MaterializeResult:
        result = ingest_partition(table, context.partition_key, landing=landing.open(), lake=lake.open())
        m = result.manifest
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": m.rows,
                "bytes": result.written.bytes,
                "path": dg.MetadataValue.path(result.written.uri),
                "files": len(m.files),
                "malformed_lines": sum(f.malformed_rows for f in m.files),
                "encoding_errors": sum(f.encoding_errors for f in m.files),
                "rejected_files": dg.MetadataValue.json([r.__dict__ for r in m.rejected_files]),
                "ingested_at": m.ingested_at,
            }
        )

    return _asset


def _schema_check(table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=bronze_key(table),
        name="gx_schema",
        blocking=True,
        partitions_def=DAILY,
        description=(
            f"Great Expectations schema-level expectations of expectations/{table}.json on the ingested "
            "partition: readable files, required columns, rows present. A failure stops the partition."
        ),
    )
    def _check(context: dg.AssetCheckExecutionContext, lake: LakeResource, gx: GreatExpectationsResource,
               alerts: AlertsResource) -> dg.AssetCheckResult:
        partition = context.partition_key
        report = gx.check_schema(lake=lake.open(), table=table, partition=partition)
        if not report.passed:
            alerts.send(context.log, "validation.failed", key=f"{bronze_key(table).to_user_string()}/gx_schema/{partition}/{context.run.run_id}",
                        text=f":x: recloop: {table} of {partition} failed its schema check: {'; '.join(report.failures)}",
                        asset=bronze_key(table).to_user_string(), partition=partition,
                        numbers={"rows": report.rows}, details={"check": "gx_schema", "failures": report.failures,
                                                                 "missing_columns": report.missing_columns})
        return dg.AssetCheckResult(
            passed=report.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(report.failures) if report.failures else "schema conforms",
            metadata={
                "partition": partition,
                "rows": report.rows,
                "failures": dg.MetadataValue.json(report.failures),
                "warnings": dg.MetadataValue.json(report.warnings),
                "missing_columns": dg.MetadataValue.json(report.missing_columns),
                "extra_columns_dropped": dg.MetadataValue.json(report.extra_columns),
            },
        )

    return _check


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        assets=[_bronze_asset(t) for t in TABLE_ORDER],
        asset_checks=[_schema_check(t) for t in TABLE_ORDER],
    )
